"""Subword tokenizers trained on a corpus's training split (BPE, Hugging Face ``tokenizers``).

One shared vocabulary for source and target (so the model can tie its embeddings and copy
names, numbers and code between languages). Normalization is NFC only: NFKC would turn "…"
into "...", while the German help pages use "…" throughout. Pre-tokenization is Metaspace
(word starts marked with "▁"), so decoding restores the original spacing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .._files import atomic_write

__all__ = ["SPECIAL_TOKENS", "train_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3: Seq2SeqConfig's defaults


def train_tokenizer(
    texts: Iterable[str], path: Path, *, vocab_size: int = 8000, min_frequency: int = 2
) -> Path:
    """Train a BPE tokenizer on ``texts`` and write it to ``path`` (a ``tokenizer.json``)
    atomically. ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` get ids 0-3."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 100:
        raise ValueError(f"train_tokenizer: expected vocab_size >= 100, but got {vocab_size}.")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    atomic_write(Path(path), lambda p: tok.save(str(p)))
    return Path(path)
