"""Training batches: pairs encoded, grouped by length into batches of a token budget, padded."""

from __future__ import annotations

import dataclasses
import random

import torch
from torch import Tensor

from ...models import Tokenizer
from .config import BATCH_SORTS, BOS, EOS, PAD, TrainConfig

__all__ = ["Batch", "collate", "encode_pairs", "source_batch", "token_batches"]


@dataclasses.dataclass
class Batch:
    src: Tensor  # (B, S) with eos, padded
    tgt: Tensor  # (B, T) bos ... eos, padded
    tokens: int  # real tokens, both sides
    #: Factor of the summed token loss; None: 1 / this batch's predicted tokens (the mean).
    #: A data-parallel rank's share of a batch gets ``ranks / the whole batch's tokens``.
    weight: float | None = None


def encode_pairs(
    tok: Tokenizer, pairs, cfg: TrainConfig, *, drop_long: bool
) -> list[tuple[list[int], list[int]]]:
    """``(src ids + eos, bos + tgt ids + eos)`` per pair; sources are truncated to
    ``max_src_tokens``; over-long targets are truncated, or dropped with ``drop_long``."""
    srcs = tok.encode_many([p.src for p in pairs], add_special_tokens=False)
    tgts = tok.encode_many([p.tgt for p in pairs], add_special_tokens=False)
    out = []
    for s, t in zip(srcs, tgts, strict=True):
        if drop_long and len(t) > cfg.max_tgt_tokens - 2:
            continue
        out.append(([*s[: cfg.max_src_tokens - 1], EOS], [BOS, *t[: cfg.max_tgt_tokens - 2], EOS]))
    return out


def source_batch(tok: Tokenizer, texts: list[str], max_src_tokens: int) -> Tensor:
    """Right-padded source ids ``(B, S)``: each text's ids, truncated, then ``eos``."""
    ids = [[*x[: max_src_tokens - 1], EOS] for x in tok.encode_many(texts, add_special_tokens=False)]
    out = torch.full((len(ids), max(map(len, ids))), PAD, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x)
    return out


def token_batches(
    lengths: list[tuple[int, int]], batch_tokens: int, seed: int, epoch: int, sort: str = "source"
) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size (rows x longest, both
    sides) stays within ``batch_tokens``; the order depends only on ``(seed, epoch)``.

    The indices are shuffled, then sorted within chunks of a few thousand, so that a batch holds
    pairs of similar length and the batches still differ from epoch to epoch. ``sort="source"``
    sorts by source length, then target length; ``"longer"`` by the longer of the two, then
    source, then target: where target lengths vary among pairs of equal source length (as in
    translation), that leaves less padding, so a batch of the same padded size holds more real
    tokens."""
    if sort not in BATCH_SORTS:
        raise ValueError(f"token_batches: expected sort in {BATCH_SORTS}, got {sort!r}.")
    key = (lambda i: lengths[i]) if sort == "source" else (lambda i: (max(lengths[i]), *lengths[i]))
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    chunk = 64 * max(1, batch_tokens // 32)  # sort within chunks: similar lengths, still shuffled
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=key)
        cur: list[int] = []
        longest_s = longest_t = 0
        for i in part:
            s, t = lengths[i]
            ls, lt = max(longest_s, s), max(longest_t, t)
            if cur and (len(cur) + 1) * (ls + lt) > batch_tokens:
                batches.append(cur)
                cur, ls, lt = [], s, t
            cur.append(i)
            longest_s, longest_t = ls, lt
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(examples: list[tuple[list[int], list[int]]]) -> Batch:
    S = max(len(s) for s, _ in examples)
    T = max(len(t) for _, t in examples)
    src = torch.full((len(examples), S), PAD, dtype=torch.long)
    tgt = torch.full((len(examples), T), PAD, dtype=torch.long)
    for i, (s, t) in enumerate(examples):
        src[i, : len(s)] = torch.tensor(s)
        tgt[i, : len(t)] = torch.tensor(t)
    return Batch(src, tgt, sum(len(s) + len(t) for s, t in examples))
