"""English→German (or French, Spanish) sentence pairs from the LibreOffice help pages.

Debian ships the same help pages in many languages (``libreoffice-help-en-us``,
``libreoffice-help-de``, ...; MPL-2.0). Paragraphs and headings carry stable ids
(``<p id="par_id3153663">``, ``<h2 id="hd_id3143284">``) that are the same in every language, so
the element with a given id on a given page in English and in German are translations of each
other. Of the hidden alternatives inside ``switchinline`` spans (macOS vs other systems, Writer
vs Calc, ...) only the default one is kept, as the help viewer shows it.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from .._files import atomic_write
from ._apt import DataError, download_and_unpack, downloaded_debs, fingerprint
from .catalogs import GETTEXT_PACKAGES, catalog_pairs
from .corpus import Pair, assign_splits, split_of, write_corpus

__all__ = ["LANGUAGES", "SOURCES", "build_translation_corpus", "page_texts", "pair_pages", "parse_sources"]

LANGUAGES = ("de", "fr", "es")
#: What ``attnkit data translate --sources`` may combine (see :func:`build_translation_corpus`).
SOURCES = ("help", "ui", "gettext")
_ID = re.compile(r"^(par|hd)_id\w+")
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_SPACE = re.compile(r"\s+")


class _HelpPage(HTMLParser):
    """Collects ``{id: text}`` for paragraph and heading elements, skipping hidden text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: dict[str, str] = {}
        self._stack: list[tuple[str, str | None, bool]] = []  # (tag, collecting id, hidden)
        self._parts: dict[str, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            return
        a = dict(attrs)
        # switchinline alternatives are all hidden; the help viewer shows the "default..." one
        # unless it knows the platform (MAC/WIN/UNIX) or module (WRITER/CALC/...)
        own = "hidden" in a and not (a.get("id") or "").startswith("default")
        hidden = own or (bool(self._stack) and self._stack[-1][2])
        ident = a.get("id")
        ident = ident if ident and _ID.match(ident) and ident not in self._parts else None
        if ident is not None:
            self._parts[ident] = []
        self._stack.append((tag, ident, hidden))

    def handle_endtag(self, tag):
        # pop to the matching tag (tolerates unclosed children, as browsers do)
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                for _, ident, _ in self._stack[i:]:
                    if ident is not None:
                        self.texts[ident] = _SPACE.sub(" ", "".join(self._parts[ident])).strip()
                del self._stack[i:]
                return

    def handle_data(self, data):
        if self._stack and self._stack[-1][2]:
            return
        for _, ident, _ in self._stack:
            if ident is not None and ident not in self.texts:
                self._parts[ident].append(data)


def page_texts(path: Path) -> dict[str, str]:
    """``{element id: text}`` of one help page."""
    parser = _HelpPage()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return parser.texts


def _words(text: str) -> int:
    return len(text.split())


def pair_pages(en_root: Path, xx_root: Path) -> tuple[list[Pair], dict[str, int]]:
    """Pairs from every page present in both trees (``.../help/en-US`` and ``.../help/de``),
    with the counts of what was dropped and why."""
    pairs: list[Pair] = []
    dropped = {"short": 0, "untranslated": 0, "empty": 0}
    pages = sorted(p.relative_to(en_root) for p in en_root.rglob("*.html"))
    for rel in pages:
        other = xx_root / rel
        if not other.is_file():
            continue
        src, tgt = page_texts(en_root / rel), page_texts(other)
        for ident, en in src.items():
            xx = tgt.get(ident)
            if not en or not xx:
                dropped["empty"] += 1
            elif _words(en) <= 2 or _words(xx) <= 2:
                dropped["short"] += 1
            elif en == xx:
                dropped["untranslated"] += 1
            else:
                pairs.append(Pair(en, xx, rel.as_posix()))
    return pairs, dropped


def parse_sources(text: str) -> tuple[str, ...]:
    """Comma-separated source names (``"ui,gettext"``) as a tuple that starts with ``"help"``
    (the help pages are always used: they define the valid and test splits)."""
    sources = tuple(s.strip() for s in text.split(",") if s.strip())
    if "help" not in sources:
        sources = ("help", *sources)
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ValueError(f"expected names from {SOURCES}, but got {text!r} (unknown: {unknown})")
    return sources


def build_translation_corpus(
    cache: Path, lang: str = "de", *, unpacked: Path | None = None, sources: tuple[str, ...] = ("help",)
) -> dict:
    """Fetch (unless ``unpacked`` holds the extracted packages), pair, split and write the
    en→``lang`` corpus under ``cache/translate-en-{lang}``; returns its ``meta.json``.

    ``sources``: ``"help"`` (the help pages; always, they define the valid and test splits),
    ``"ui"`` (LibreOffice's user-interface catalogs, ``libreoffice-l10n-{lang}``) and
    ``"gettext"`` (the catalogs of :data:`~attnkit.data.catalogs.GETTEXT_PACKAGES`). Catalog
    pairs go to the training split, except those of catalogs whose file name falls in the test
    bucket (:func:`~attnkit.data.corpus.split_of`), which form a second test set from outside
    the help pages, ``other-test.tsv``. Catalog pairs whose English is a valid or test sentence
    of the help pages are dropped, and the help pages' split is the same as without them."""
    if lang not in LANGUAGES:
        raise ValueError(f"expected lang in {LANGUAGES}, but got {lang!r}.")
    sources = tuple(sources)
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown or "help" not in sources:
        raise ValueError(
            f"expected sources from {SOURCES} including 'help' (it defines the valid and test splits), "
            f"but got {list(sources)}."
        )
    packages = ["libreoffice-help-en-us", f"libreoffice-help-{lang}"]
    if "ui" in sources:
        packages.append(f"libreoffice-l10n-{lang}")
    if "gettext" in sources:
        packages += list(GETTEXT_PACKAGES)
    inputs = None  # the unpacked directory given by the caller: no archive files to record
    if unpacked is None:
        unpacked = download_and_unpack(packages, cache / "apt", cache / "apt" / "root")
        inputs = fingerprint(downloaded_debs(packages, cache / "apt"))
    help_dir = unpacked / "usr" / "share" / "libreoffice" / "help"
    en_root, xx_root = help_dir / "en-US" / "text", help_dir / lang / "text"
    for root in (en_root, xx_root):
        if not root.is_dir():
            raise DataError(f"expected the help pages under {str(root)!r}, but it does not exist.")
    pairs, dropped = pair_pages(en_root, xx_root)
    unique = len({(p.src, p.tgt) for p in pairs})
    splits = assign_splits(pairs)
    catalogs = {
        "ui": unpacked / "usr" / "lib" / "libreoffice" / "program" / "resource" / lang / "LC_MESSAGES",
        "gettext": unpacked / "usr" / "share" / "locale" / lang / "LC_MESSAGES",
    }
    held = {p.src for split in ("valid", "test") for p in splits[split]}
    seen = {(p.src, p.tgt) for p in splits["train"]}
    other_test: list[Pair] = []
    by_source: dict[str, dict] = {"help": {"pages": len({p.doc for p in pairs}), "pairs": unique}}
    for source in (s for s in sources if s != "help"):
        files = sorted(catalogs[source].glob("*.mo"))
        if not files:
            raise DataError(f"expected {source!r} catalogs under {str(catalogs[source])!r}, but found none.")
        found, why = catalog_pairs(files, unpacked)
        counts = {"catalogs": len(files), "train": 0, "other_test": 0, "dropped": {**why, "help_heldout": 0,
                  "duplicate": 0}}  # fmt: skip
        for p in found:
            if p.src in held:
                counts["dropped"]["help_heldout"] += 1
            elif (p.src, p.tgt) in seen:
                counts["dropped"]["duplicate"] += 1
            else:
                seen.add((p.src, p.tgt))
                bucket = "other_test" if split_of(p.doc) == "test" else "train"
                (other_test if bucket == "other_test" else splits["train"]).append(p)
                counts[bucket] += 1
        by_source[source] = counts
    meta = {
        "task": "translate", "source_lang": "en", "target_lang": lang, "packages": packages, "inputs": inputs,
        "sources": list(sources), "by_source": by_source,
        "pages": len({p.doc for p in pairs}), "pairs_found": len(pairs), "unique_pairs": unique,
        "dropped": dropped, "split": "sha1(page path) % 100: <5 test, <10 valid, else train; "
        "duplicates and sources seen in an earlier split removed; catalog pairs: train, or "
        "other-test.tsv for catalogs whose file name hashes to test",
    }  # fmt: skip
    directory = cache / f"translate-en-{lang}"
    meta = write_corpus(directory, splits, meta)
    text = "".join(f"{_SPACE.sub(' ', p.src)}\t{_SPACE.sub(' ', p.tgt)}\n" for p in other_test)
    atomic_write(directory / "other-test.tsv", lambda f: f.write_text(text, encoding="utf-8"))
    return meta
