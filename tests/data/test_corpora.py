"""Corpus builders on small real samples (committed under tests/data/samples): the LibreOffice
help pages (en-US and de) and an excerpt of Debian's Translation-en index."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from attnkit.data import (
    DataError,
    Pair,
    build_summarization_corpus,
    build_translation_corpus,
    load_pairs,
    page_texts,
    pair_pages,
    parse_descriptions,
    read_meta,
    split_of,
    train_tokenizer,
)
from attnkit.data.corpus import assign_splits, cache_root

SAMPLES = Path(__file__).parent / "samples"
HELP = SAMPLES / "libreoffice" / "usr" / "share" / "libreoffice" / "help"


def test_page_texts_keeps_default_alternatives_and_skips_platform_ones():
    de = page_texts(HELP / "de" / "text" / "swriter" / "01" / "04090000.html")
    en = page_texts(HELP / "en-US" / "text" / "swriter" / "01" / "04090000.html")
    # "Strg"/"Ctrl" is the default alternative; the macOS "Befehl"/"Command" is hidden
    assert de["par_id3155990"] == "Tastatur: Strg+F2"
    assert en["par_id3155990"] == "Ctrl+F2"
    assert all(k.startswith(("par_id", "hd_id")) for k in en)
    assert en["hd_id3151171"] == "Fields"


def test_pair_pages_pairs_by_id_and_drops_short_and_untranslated():
    pairs, dropped = pair_pages(HELP / "en-US" / "text", HELP / "de" / "text")
    assert {p.doc for p in pairs} == {
        "shared/optionen/01020000.html",
        "swriter/01/04090000.html",
    }  # en-only page skipped
    by_src = {p.src: p.tgt for p in pairs}
    assert by_src["Specifies general Load/Save settings."] == (
        "Hier legen Sie allgemeine Einstellungen für das Laden und Speichern fest."
    )
    assert all(len(p.src.split()) > 2 and len(p.tgt.split()) > 2 and p.src != p.tgt for p in pairs)
    assert dropped["short"] > 0  # headings such as "Fields" / "Feldbefehle"
    assert "Ctrl+F2" not in by_src  # one word: dropped


def test_build_translation_corpus_from_unpacked_packages(tmp_path):
    meta = build_translation_corpus(tmp_path, "de", unpacked=SAMPLES / "libreoffice")
    d = tmp_path / "translate-en-de"
    assert read_meta(d) == meta and meta["pages"] == 2
    total = sum(meta["counts"].values())
    assert total == meta["unique_pairs"] and total > 10
    pairs = [p for s in ("train", "valid", "test") for p in load_pairs(d, s)]
    assert len(pairs) == total and all(split_of(p.doc) in ("train", "valid", "test") for p in pairs)
    assert json.loads((d / "train.jsonl").read_text().splitlines()[0])["doc"].endswith(".html")
    # rebuilding gives byte-identical files
    build_translation_corpus(tmp_path / "again", "de", unpacked=SAMPLES / "libreoffice")
    for split in ("train", "valid", "test"):
        assert (d / f"{split}.jsonl").read_bytes() == (
            tmp_path / "again" / "translate-en-de" / f"{split}.jsonl"
        ).read_bytes()


def test_parse_descriptions_and_summarization_corpus(tmp_path):
    entries = parse_descriptions((SAMPLES / "Translation-en").read_text())
    assert len(entries) == 24
    pkg, synopsis, doc = entries[0]
    assert pkg == "0ad" and synopsis == "Real-time strategy game of ancient warfare"
    assert doc.startswith(
        '0 A.D. (pronounced "zero ey-dee") is a free, open-source, cross-platform real-time'
    )
    assert "\n" not in doc and "  " not in doc
    meta = build_summarization_corpus(tmp_path, index_files=[SAMPLES / "Translation-en"])
    d = tmp_path / "summarize-debian"
    pairs = {s: load_pairs(d, s) for s in ("train", "valid", "test")}
    assert sum(map(len, pairs.values())) == meta["unique_pairs"]
    # 0ad and 0ad-data share the first paragraph but not the whole description: both kept
    docs = [p for ps in pairs.values() for p in ps if p.src.startswith("0 A.D.")]
    assert {p.tgt for p in docs} == {synopsis, "Real-time strategy game of ancient warfare (data files)"}


def test_split_is_deterministic_by_document_and_leak_free():
    docs = [f"page{i}.html" for i in range(2000)]
    splits = [split_of(d) for d in docs]
    assert splits == [split_of(d) for d in docs]  # stable (sha1, not Python's salted hash)
    frac = {s: splits.count(s) / len(docs) for s in ("train", "valid", "test")}
    assert 0.85 < frac["train"] < 0.95 and 0.03 < frac["test"] < 0.07
    # a sentence repeated on pages of different splits is kept in the earliest split only
    test_doc = next(d for d in docs if split_of(d) == "test")
    train_doc = next(d for d in docs if split_of(d) == "train")
    pairs = [Pair("Click OK.", "Klicken Sie auf OK.", test_doc), Pair("Click OK.", "Klicken Sie auf OK.", train_doc),
             Pair("Only in test.", "Nur im Test.", test_doc), Pair("Click OK.", "Klicken Sie auf OK.", train_doc)]  # fmt: skip
    out = assign_splits(pairs)
    assert [p.src for p in out["train"]] == ["Click OK."]  # duplicate dropped too
    assert [p.src for p in out["test"]] == ["Only in test."]
    train_src = {p.src for p in out["train"]}
    assert not any(p.src in train_src for p in out["valid"] + out["test"])


def test_tokenizer_keeps_german_typography(tmp_path):
    from attnkit.models import Tokenizer

    pairs, _ = pair_pages(HELP / "en-US" / "text", HELP / "de" / "text")
    texts = [x for p in pairs for x in (p.src, p.tgt)] * 3 + ["Wählen Sie „Extras – Optionen…“."]
    path = train_tokenizer(texts, tmp_path / "tok" / "tokenizer.json", vocab_size=300, min_frequency=1)
    tok = Tokenizer(path)
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    s = "Wählen Sie „Extras – Optionen…“."
    assert tok.decode(tok.encode(s)) == s  # NFC, not NFKC: "…" stays "…"
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, tmp_path / "x.json", vocab_size=10)


def test_missing_apt_get_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    with pytest.raises(DataError, match="'apt-get' was not found on PATH"):
        build_translation_corpus(tmp_path / "cache", "de")
    with pytest.raises(DataError, match="'apt-get' was not found"):
        build_summarization_corpus(tmp_path / "cache")


def test_unreachable_archive_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apt-get").write_text(
        "#!/bin/sh\necho 'E: Failed to fetch http://deb.debian.org/ Temporary failure' >&2\nexit 100\n"
    )
    (fake / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(
        DataError, match=r"apt-get update failed \(is the Debian archive reachable.*Temporary failure"
    ):
        build_summarization_corpus(tmp_path / "cache")


def test_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="attnkit data"):
        load_pairs(tmp_path, "train")
    with pytest.raises(ValueError, match="lang"):
        build_translation_corpus(tmp_path, "xx", unpacked=SAMPLES / "libreoffice")
    with pytest.raises(DataError, match="help pages"):
        build_translation_corpus(tmp_path, "fr", unpacked=SAMPLES / "libreoffice")


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_DATA", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" and cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("ATTNKIT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "attnkit"


def test_corpora_are_built_from_release_indexes_and_record_their_inputs(tmp_path):
    from attnkit.data._apt import fingerprint, release_indexes

    names = [
        "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en",
        "deb.debian.org_debian_dists_bookworm-updates_main_i18n_Translation-en",
        "deb.debian.org_debian_dists_bookworm-backports_main_i18n_Translation-en",
        "security.debian.org_debian-security_dists_bookworm-security_main_i18n_Translation-en",
        "deb.debian.org_debian_dists_trixie_main_i18n_Translation-en.lz4",
    ]
    kept = release_indexes([tmp_path / n for n in names])
    assert [p.name for p in kept] == [names[0], names[4]]
    index = tmp_path / "index" / "Translation-en"
    index.parent.mkdir()
    index.write_bytes((SAMPLES / "Translation-en").read_bytes())
    meta = build_summarization_corpus(tmp_path, index_files=[index])
    (entry,) = meta["inputs"]
    assert entry == fingerprint([SAMPLES / "Translation-en"])[0] and len(entry["sha256"]) == 64
    recorded = json.loads((tmp_path / "summarize-debian" / "meta.json").read_text())
    assert recorded["inputs"] == meta["inputs"] and "inputs_changed" not in recorded
    # the same inputs again: silent; changed inputs: a warning naming the file, recorded in meta
    build_summarization_corpus(tmp_path, index_files=[index])
    index.write_bytes(index.read_bytes().replace(b"Real-time strategy", b"Real time strategy"))
    with pytest.warns(UserWarning, match=r"differ from the recorded corpus \(Translation-en\)"):
        meta = build_summarization_corpus(tmp_path, index_files=[index])
    assert meta["inputs_changed"] == ["Translation-en"]


CATALOGS = SAMPLES / "catalogs"


def test_catalog_pairs_from_a_real_mo_file():
    from attnkit.data.catalogs import catalog_pairs, read_catalog

    mo = CATALOGS / "de" / "LC_MESSAGES" / "gtk30-excerpt.mo"
    entries = read_catalog(mo)
    assert len(entries) == 10 and ("Activates the cell", "Aktiviert das Feld") in entries  # context dropped
    pairs, dropped = catalog_pairs([mo], CATALOGS)
    assert {(p.src, p.tgt) for p in pairs} == {
        ("Activates the cell", "Aktiviert das Feld"),
        ("Animals & Nature", "Natur und Tiere"),
        ("Authentication is required to get attributes of a printer",
         "Das Auslesen von Attributen eines Druckers erfordert Legitimation"),
        ("Current Page", "Aktuelle Seite"),
        ("Copy Link Address", "Link-Adresse kopieren"),
    }  # fmt: skip
    assert dropped == {"placeholder": 2, "markup": 0, "untranslated": 1, "short": 2, "length_ratio": 0}
    assert {p.doc for p in pairs} == {"de/LC_MESSAGES/gtk30-excerpt.mo"}


def _write_mo(path, entries: dict[str, str]) -> None:
    """A GNU ``.mo`` file of ``entries`` (``"context\x04msgid"`` keys for a msgctxt), in the
    layout gettext reads: magic, revision, count, the two string tables, no hash table."""
    import struct

    keys = sorted(entries)
    ids, strs = [k.encode() for k in keys], [entries[k].encode() for k in keys]
    start = 28 + 16 * len(keys)
    blob, id_table, str_table = b"", [], []
    for table, items in ((id_table, ids), (str_table, strs)):
        for s in items:
            table.append((len(s), start + len(blob)))
            blob += s + b"\0"
    head = struct.pack("<7I", 0x950412DE, 0, len(keys), 28, 28 + 8 * len(keys), 0, 0)
    pairs = b"".join(struct.pack("<2I", *e) for e in (*id_table, *str_table))
    path.write_bytes(head + pairs + blob)


def test_one_english_string_in_two_contexts_gives_both_translations(tmp_path):
    from attnkit.data.catalogs import catalog_pairs, read_catalog

    mo = tmp_path / "two-contexts.mo"
    _write_mo(mo, {
        "": "Content-Type: text/plain; charset=UTF-8\n",
        "file menu\x04Open the file": "Die Datei öffnen",
        "dialog\x04Open the file": "Datei öffnen",
        "toolbar\x04Open the file": "Die Datei öffnen",  # the same translation again: one pair
        "Zoom to 100% of the page": "Auf 100 % der Seite zoomen",
    })  # fmt: skip
    assert read_catalog(mo) == [
        ("Open the file", "Datei öffnen"), ("Open the file", "Die Datei öffnen"),
        ("Zoom to 100% of the page", "Auf 100 % der Seite zoomen"),
    ]  # fmt: skip
    pairs, dropped = catalog_pairs([mo], tmp_path)
    assert len(pairs) == 3 and dropped["placeholder"] == 0


@pytest.mark.parametrize(
    ("en", "xx", "want"),
    [
        ("Zoom to 100% of the page", "Auf 100 % der Seite zoomen",
         ("Zoom to 100% of the page", "Auf 100 % der Seite zoomen")),
        ("Use 50% or more", "Verwenden Sie 50 % oder mehr", ("Use 50% or more", "Verwenden Sie 50 % oder mehr")),
        ("Progress: %d%% done", "Fortschritt: %d%% erledigt", "placeholder"),
        ("Size %5.1f MB", "Größe %5.1f MB", "placeholder"),
        ("Save _As…", "Speichern _unter …", ("Save As…", "Speichern unter …")),
        ("~Open File", "Datei ~öffnen", ("Open File", "Datei öffnen")),
        ("&Print Preview", "&Druckvorschau anzeigen", ("Print Preview", "Druckvorschau anzeigen")),
        ("Search && Replace", "Suchen && Ersetzen", ("Search & Replace", "Suchen & Ersetzen")),
        ("Cannot open %1$s for reading", "Kann %1$s nicht lesen", "placeholder"),
        ("Deleted {0} files", "{0} Dateien gelöscht", "placeholder"),
        ("Press <b>Enter</b> now", "Jetzt <b>Eingabe</b> drücken", "markup"),
        ("Open", "Öffnen", "short"),
        ("Copy", "Copy", "untranslated"),
        ("Quit now", "Das Programm wird jetzt sofort und ohne weitere Rückfrage beendet", "length_ratio"),
        ("lookup a SRV record (e.g. _http._tcp.ftp.debian.org)",
         "einen SRV-Eintrag abfragen (z.B. _http._tcp.ftp.debian.org)",
         ("lookup a SRV record (e.g. _http._tcp.ftp.debian.org)",
          "einen SRV-Eintrag abfragen (z.B. _http._tcp.ftp.debian.org)")),
    ],
)  # fmt: skip
def test_clean_pair_filters(en, xx, want):
    from attnkit.data.catalogs import clean_pair

    assert clean_pair(en, xx) == want


def test_translation_corpus_with_catalogs_keeps_the_help_split(tmp_path, monkeypatch):
    import shutil

    from attnkit.data import libreoffice
    from attnkit.data.corpus import Pair

    root = tmp_path / "root"
    shutil.copytree(SAMPLES / "libreoffice", root)
    mo = CATALOGS / "de" / "LC_MESSAGES" / "gtk30-excerpt.mo"
    ui = root / "usr/lib/libreoffice/program/resource/de/LC_MESSAGES"
    gt = root / "usr/share/locale/de/LC_MESSAGES"
    for d, name in ((ui, "vcl.mo"), (gt, "gtk30.mo"), (gt, "zz-same-strings.mo")):
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(mo, d / name)
    # the sample has two pages (hash buckets 75 and 79): make the first a validation page
    real_split = libreoffice.assign_splits
    monkeypatch.setattr(libreoffice, "assign_splits", lambda pairs: real_split(pairs, 40, 38))
    plain = build_translation_corpus(tmp_path / "plain", "de", unpacked=root)
    assert plain["counts"]["valid"] > 0 and plain["counts"]["train"] > 0
    held = load_pairs(tmp_path / "plain" / "translate-en-de", "valid")[0]
    real = libreoffice.catalog_pairs

    def with_a_held_sentence(files, base):  # a catalog string equal to a help test sentence
        pairs, dropped = real(files, base)
        return [*pairs, Pair(held.src, "irgendwas anderes", files[0].relative_to(base).as_posix())], dropped

    monkeypatch.setattr(libreoffice, "catalog_pairs", with_a_held_sentence)
    meta = build_translation_corpus(tmp_path / "more", "de", unpacked=root, sources=("help", "ui", "gettext"))
    a, b = tmp_path / "plain" / "translate-en-de", tmp_path / "more" / "translate-en-de"
    for split in ("valid", "test"):  # the help pages' held-out splits are untouched
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    ui_counts, gt_counts = meta["by_source"]["ui"], meta["by_source"]["gettext"]
    assert ui_counts["catalogs"] == 1 and gt_counts["catalogs"] == 2
    assert ui_counts["dropped"]["help_heldout"] == 1 and gt_counts["dropped"]["help_heldout"] == 1
    # the same five strings again in gettext: all duplicates of ui's
    assert (
        ui_counts["train"] + ui_counts["other_test"] == 5
        and gt_counts["train"] + gt_counts["other_test"] == 0
    )
    assert gt_counts["dropped"]["duplicate"] == 10
    assert meta["counts"]["train"] == plain["counts"]["train"] + ui_counts["train"]
    other = (b / "other-test.tsv").read_text().splitlines()
    assert len(other) == ui_counts["other_test"] and all(line.count("\t") == 1 for line in other)
    assert meta["sources"] == ["help", "ui", "gettext"]
    with pytest.raises(ValueError, match="including 'help'"):
        build_translation_corpus(tmp_path / "x", "de", unpacked=root, sources=("ui",))
