"""A tiny translation run on the committed sample pages, shared by the training tests."""

from __future__ import annotations

from pathlib import Path

from attnkit.data import build_translation_corpus

SAMPLES = Path(__file__).parent / "data" / "samples"

TINY = dict(
    task="translate", corpus="translate-en-de", vocab_size=300, max_src_tokens=48, max_tgt_tokens=48,
    model={"dim": 32, "num_heads": 4, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1, "dropout": 0.1},
    batch_tokens=400, lr=3e-3, warmup_steps=2, max_steps=6, eval_every=3, valid_pairs=8, beam_size=2,
    precision="fp32",  # "auto" measures at start-up: runs compared with each other must not differ
)  # fmt: skip


def build_cache(root: Path) -> dict:
    """Build the en->de corpus of the sample pages under ``root``; returns its meta."""
    meta = build_translation_corpus(root, "de", unpacked=SAMPLES / "libreoffice")
    # the sample has two pages, both of which may hash to one split: make valid/test non-empty
    d = root / "translate-en-de"
    train = (d / "train.jsonl").read_text().splitlines()
    for split in ("valid", "test"):
        if not (d / f"{split}.jsonl").read_text().strip():
            (d / f"{split}.jsonl").write_text("\n".join(train[:6]) + "\n")
    return meta
