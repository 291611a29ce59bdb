"""Parallel corpora on disk: ``{train,valid,test}.jsonl`` plus ``meta.json``, split by document.

Every pair carries the document it came from (a help page, a package description). The split is
a hash of that document's name, so it is deterministic, does not depend on the order the files
were read in, and never puts parts of one document on both sides. Pairs whose source text also
occurs in an earlier split (train, then valid) are dropped from the later one, so no test source
sentence was seen in training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from .._files import atomic_write, user_cache_dir
from ._apt import DataError

__all__ = ["SPLITS", "Pair", "cache_root", "load_pairs", "read_meta", "split_of", "write_corpus"]

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One example: ``src`` text, ``tgt`` text and the ``doc`` it comes from."""

    src: str
    tgt: str
    doc: str


def cache_root(path: str | os.PathLike | None = None) -> Path:
    """Where corpora live: ``path``, else ``$ATTNKIT_DATA``, else ``$XDG_CACHE_HOME/attnkit``
    (default ``~/.cache/attnkit``)."""
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get("ATTNKIT_DATA"):
        return Path(os.environ["ATTNKIT_DATA"]).expanduser()
    return user_cache_dir()


def split_of(doc: str, valid_percent: int = 5, test_percent: int = 5) -> str:
    """``'train'``, ``'valid'`` or ``'test'`` for a document name, from its SHA-1 (stable across
    machines and Python versions, unlike ``hash``)."""
    bucket = int(hashlib.sha1(doc.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < test_percent:
        return "test"
    if bucket < test_percent + valid_percent:
        return "valid"
    return "train"


def assign_splits(
    pairs: Iterable[Pair], valid_percent: int = 5, test_percent: int = 5
) -> dict[str, list[Pair]]:
    """Split by document, drop exact duplicates, and drop later-split pairs whose source
    occurs in an earlier split."""
    by_split: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for p in pairs:
        by_split[split_of(p.doc, valid_percent, test_percent)].append(p)
    seen_src: set[str] = set()
    out: dict[str, list[Pair]] = {}
    for split in SPLITS:
        kept, seen_pair = [], set()
        for p in by_split[split]:
            key = (p.src, p.tgt)
            if key in seen_pair or (split != "train" and p.src in seen_src):
                continue
            seen_pair.add(key)
            kept.append(p)
        seen_src.update(p.src for p in kept)
        out[split] = kept
    return out


def write_corpus(directory: Path, splits: dict[str, list[Pair]], meta: dict) -> dict:
    """Write the three ``.jsonl`` files and ``meta.json`` (with the counts) atomically.

    ``meta["inputs"]`` (see ``_apt.fingerprint``) records the files the corpus was built from.
    When a corpus recorded there was built from other inputs, the rebuild warns (its splits and
    every score on them change) and ``meta["inputs_changed"]`` lists the files that differ."""
    directory.mkdir(parents=True, exist_ok=True)
    previous = directory / "meta.json"
    if meta.get("inputs") and previous.is_file():
        before = json.loads(previous.read_text(encoding="utf-8")).get("inputs")
        if before and before != meta["inputs"]:
            old = {i["file"]: i["sha256"] for i in before}
            new = {i["file"]: i["sha256"] for i in meta["inputs"]}
            changed = sorted(f for f in old.keys() | new.keys() if old.get(f) != new.get(f))
            meta = {**meta, "inputs_changed": changed}
            warnings.warn(
                f"rebuilding {directory.name} from inputs that differ from the recorded corpus "
                f"({', '.join(changed)}): its splits, and every score measured on them, change.",
                stacklevel=2,
            )
    for split, pairs in splits.items():
        lines = "".join(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n" for p in pairs)
        atomic_write(directory / f"{split}.jsonl", lambda f, text=lines: f.write_text(text, encoding="utf-8"))
    meta = {**meta, "counts": {s: len(p) for s, p in splits.items()}}
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    atomic_write(directory / "meta.json", lambda f: f.write_text(text, encoding="utf-8"))
    return meta


def read_meta(directory: Path) -> dict:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise DataError(
            f"no corpus at {str(directory)!r} (meta.json missing); build it with `attnkit data translate` "
            "or `attnkit data summarize`."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def iter_pairs(directory: Path, split: str) -> Iterator[Pair]:
    if split not in SPLITS:
        raise ValueError(f"expected split in {SPLITS}, but got {split!r}.")
    read_meta(directory)
    with open(Path(directory) / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            yield Pair(**json.loads(line))


def load_pairs(directory: str | os.PathLike, split: str) -> list[Pair]:
    """All pairs of one split of the corpus in ``directory``."""
    return list(iter_pairs(Path(directory), split))
