"""Summarization pairs from Debian's package descriptions.

Every Debian package has a one-line synopsis and a long description, written by people for
people. The ``Translation-en`` index that ``apt-get update`` fetches holds both: the long
description is the document and the synopsis its summary. Packages built from one source often
share a long description with different synopses (``foo``, ``foo-data``, ``foo-doc``); the split
hashes the long description, so all of them land on the same side.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ._apt import DataError, apt_update, fingerprint, read_index, release_indexes
from .corpus import Pair, assign_splits, write_corpus

__all__ = ["build_summarization_corpus", "parse_descriptions"]

_SPACE = re.compile(r"\s+")
MIN_DOC_WORDS = 8


def parse_descriptions(text: str) -> list[tuple[str, str, str]]:
    """``(package, synopsis, long description)`` for every stanza of a ``Translation-en`` file.

    Continuation lines start with one space; a line holding only ``.`` separates paragraphs.
    Paragraphs are joined with a space, runs of whitespace collapsed."""
    out = []
    for stanza in text.split("\n\n"):
        package, synopsis, body, in_desc = None, None, [], False
        for line in stanza.splitlines():
            if line.startswith("Package:"):
                package, in_desc = line.split(":", 1)[1].strip(), False
            elif line.startswith("Description-en:"):
                synopsis, in_desc = line.split(":", 1)[1].strip(), True
            elif line.startswith(" ") and in_desc:
                body.append("" if line.strip() == "." else line.strip())
            else:
                in_desc = False
        if package and synopsis and body:
            out.append((package, synopsis, _SPACE.sub(" ", " ".join(body)).strip()))
    return out


def build_summarization_corpus(cache: Path, *, index_files: list[Path] | None = None) -> dict:
    """Fetch the indexes (unless ``index_files`` are given), build, split and write the corpus
    under ``cache/summarize-debian``; returns its ``meta.json``."""
    if index_files is None:
        lists = apt_update(cache / "apt")
        index_files = release_indexes(sorted(lists.glob("*_i18n_Translation-en*")))
        if not index_files:
            raise DataError(f"apt-get update fetched no release Translation-en index into {str(lists)!r}.")
    pairs, seen, short = [], set(), 0
    for path in index_files:
        for _package, synopsis, doc in parse_descriptions(read_index(path)):
            if len(doc.split()) < MIN_DOC_WORDS:
                short += 1
                continue
            if (doc, synopsis) in seen:
                continue
            seen.add((doc, synopsis))
            # the document is named by the description's hash: identical ones share a split
            pairs.append(Pair(doc, synopsis, hashlib.sha1(doc.encode("utf-8")).hexdigest()[:16]))
    splits = assign_splits(pairs)
    meta = {
        "task": "summarize", "source": "Debian Translation-en package descriptions",
        "index_files": [p.name for p in index_files], "inputs": fingerprint(index_files),
        "unique_pairs": len(pairs),
        "dropped": {"short_description": short},
        "split": "sha1(long description) % 100: <5 test, <10 valid, else train; sources seen in an "
        "earlier split removed",
    }  # fmt: skip
    return write_corpus(cache / "summarize-debian", splits, meta)
