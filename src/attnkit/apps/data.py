"""``attnkit data``: build a translation or summarization corpus from Debian's archive."""

from __future__ import annotations

import warnings

from ..data import build_summarization_corpus, build_translation_corpus, cache_root
from ..data.libreoffice import parse_sources
from .errors import argument, warn

__all__ = ["run"]


def run(
    task: str, *, lang: str = "de", sources: str = "help,ui,gettext", cache_dir: str | None = None
) -> int:
    """Build the corpus of ``task`` under the data cache and print its split sizes."""
    if task == "translate":
        with argument("--sources"):
            chosen = parse_sources(sources)
    root = cache_root(cache_dir)
    print(f"building under {root} (set with --cache-dir or ATTNKIT_DATA)")
    with warnings.catch_warnings(record=True) as caught:  # shown as one line each, below
        warnings.simplefilter("always", UserWarning)
        if task == "translate":
            meta = build_translation_corpus(root, lang, sources=chosen)
            where = root / f"translate-en-{lang}"
        else:
            meta = build_summarization_corpus(root)
            where = root / "summarize-debian"
    for w in caught:
        warn(str(w.message))
    c = meta["counts"]
    print(f"{where}: {meta['unique_pairs']:,} unique pairs -> train {c['train']:,}, valid {c['valid']:,}, "
          f"test {c['test']:,} (dropped: {meta['dropped']})")  # fmt: skip
    for source, n in meta.get("by_source", {}).items():
        if source != "help":
            print(f"  + {source}: {n['catalogs']} catalogs -> train {n['train']:,}, other-test.tsv "
                  f"{n['other_test']:,} (dropped: {n['dropped']})")  # fmt: skip
    return 0
