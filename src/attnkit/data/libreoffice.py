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

from ._apt import DataError, download_and_unpack, downloaded_debs, fingerprint
from .corpus import Pair, assign_splits, write_corpus

__all__ = ["LANGUAGES", "build_translation_corpus", "page_texts", "pair_pages"]

LANGUAGES = ("de", "fr", "es")
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


def build_translation_corpus(cache: Path, lang: str = "de", *, unpacked: Path | None = None) -> dict:
    """Fetch (unless ``unpacked`` holds the extracted packages), pair, split and write the
    en→``lang`` corpus under ``cache/translate-en-{lang}``; returns its ``meta.json``."""
    if lang not in LANGUAGES:
        raise ValueError(f"expected lang in {LANGUAGES}, but got {lang!r}.")
    packages = ["libreoffice-help-en-us", f"libreoffice-help-{lang}"]
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
    meta = {
        "task": "translate", "source_lang": "en", "target_lang": lang, "packages": packages, "inputs": inputs,
        "pages": len({p.doc for p in pairs}), "pairs_found": len(pairs), "unique_pairs": unique,
        "dropped": dropped, "split": "sha1(page path) % 100: <5 test, <10 valid, else train; "
        "duplicates and sources seen in an earlier split removed",
    }  # fmt: skip
    return write_corpus(cache / f"translate-en-{lang}", splits, meta)
