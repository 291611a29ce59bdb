"""English→German pairs from programs' translation catalogs (gettext ``.mo`` files).

Every translated program ships compiled catalogs, ``LC_MESSAGES/<domain>.mo``: each entry maps an
English source string (``msgid``, optionally with a context, ``msgctxt``) to its translation.
LibreOffice's user-interface catalogs (``libreoffice-l10n-de``) and the catalogs of common Debian
packages (coreutils, apt, GTK, ...) are real, reviewed parallel text: menu labels, messages and
descriptions. They are read with Python's :mod:`gettext` and filtered:

* **placeholders** (``%s``, ``%1$d``, ``{0}``, ``$(VAR)``): the pair is dropped (a model must not
  learn to invent or drop them);
* **markup** (``<b>``, ``<%s>``): dropped;
* **accelerators** (``_File``, ``&File``, ``~File``: the underlined letter of a menu item): the
  marker is removed, on each side independently (``C_urrent Page`` / ``Aktue_lle Seite`` becomes
  ``Current Page`` / ``Aktuelle Seite``);
* **untranslated** (the same text on both sides), **short** (one English word) and **length
  ratio** (one side over 3x the other's words): dropped.
"""

from __future__ import annotations

import gettext
import re
from pathlib import Path

from .corpus import Pair

__all__ = ["GETTEXT_PACKAGES", "catalog_pairs", "clean_pair", "read_catalog"]

#: Debian packages whose German catalogs (``usr/share/locale/de/LC_MESSAGES/*.mo``) are read by
#: ``attnkit data translate --sources gettext``: command-line tools, the package manager, and the
#: desktop libraries' user-interface strings.
GETTEXT_PACKAGES = (
    "coreutils", "tar", "grep", "sed", "diffutils", "findutils", "wget", "make", "bash", "apt",
    "libapt-pkg6.0", "dpkg", "adduser", "gnupg-l10n", "libglib2.0-data", "libgtk-3-common",
    "libgtk2.0-common", "at-spi2-common", "shared-mime-info", "xdg-user-dirs", "procps", "psmisc",
    "man-db", "gettext", "xz-utils", "systemd", "polkitd", "packagekit", "appstream", "git",
)  # fmt: skip

# printf conversions (flags without the space flag: "100% of the page" and "50% or more" are
# percentages, not "% o" conversions), %NAME% and %1-style, {0}, $(VAR) and ${VAR}
_PLACEHOLDER = re.compile(
    r"%(?:\d+\$)?[-+#0']*(?:\d+|\*)?(?:\.\d+)?(?:hh|h|ll|l|L|q|j|z|t|I64)?[diouxXeEfFgGaAcspnm%]"
    r"|%\w+%|\{\w*\}|\$\(?\{?\w+\}?\)?|%\d+"
)
_MARKUP = re.compile(r"<[^<>]*>")
_ACCELERATOR = re.compile(r"[_~&](?=\w)")
_SPACE = re.compile(r"\s+")


def read_catalog(path: Path) -> list[tuple[str, str]]:
    """The distinct ``(English, translation)`` pairs of one ``.mo`` file, sorted: singular entries
    with a translation (plural forms and the header are skipped). A context (``msgctxt``) is
    dropped from the English, so one English string translated differently in two contexts
    gives two pairs, and the same translation in two contexts one."""
    with open(path, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog  # the parsed entries, keyed by msgid
    out = set()
    for key, value in catalog.items():
        if not isinstance(key, str) or not key or not value:  # plural forms, header, empty
            continue
        out.add((key.split("\x04", 1)[-1], value))
    return sorted(out)


def _accelerator_free(text: str) -> str:
    """``text`` without its one accelerator marker (``_``, ``~`` or ``&`` before a letter). Only
    labels (up to 6 words) have accelerators; longer messages, and strings with several such
    characters (``_http._tcp``), are left as they are (``use_pty`` is an identifier there)."""
    text = text.replace("&&", "\x00")
    markers = _ACCELERATOR.findall(text)
    if len(markers) == 1 and len(text.split()) <= 6:
        text = _ACCELERATOR.sub("", text, count=1)
    return text.replace("\x00", "&")


def clean_pair(en: str, xx: str) -> tuple[str, str] | str:
    """The cleaned pair, or the reason it is dropped (``"placeholder"``, ``"markup"``,
    ``"untranslated"``, ``"short"``, ``"length_ratio"``)."""
    if _PLACEHOLDER.search(en) or _PLACEHOLDER.search(xx):
        return "placeholder"
    if _MARKUP.search(en) or _MARKUP.search(xx):
        return "markup"
    en = _SPACE.sub(" ", _accelerator_free(en)).strip()
    xx = _SPACE.sub(" ", _accelerator_free(xx)).strip()
    if en == xx:
        return "untranslated"
    n_en, n_xx = len(en.split()), len(xx.split())
    if n_en < 2:
        return "short"
    if max(n_en, n_xx) > 3 * min(n_en, n_xx):
        return "length_ratio"
    return en, xx


def catalog_pairs(files: list[Path], root: Path) -> tuple[list[Pair], dict[str, int]]:
    """Cleaned pairs of every catalog in ``files`` (each pair's ``doc`` is its file's path under
    ``root``, so a whole catalog lands in one split), with the counts of what was dropped."""
    pairs: list[Pair] = []
    dropped = {"placeholder": 0, "markup": 0, "untranslated": 0, "short": 0, "length_ratio": 0}
    for path in files:
        doc = path.relative_to(root).as_posix()
        for en, xx in read_catalog(path):
            cleaned = clean_pair(en, xx)
            if isinstance(cleaned, str):
                dropped[cleaned] += 1
            else:
                pairs.append(Pair(*cleaned, doc))
    return pairs, dropped
