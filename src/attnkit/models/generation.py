"""Choosing the next token: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingConfig", "next_token"]


@dataclass(frozen=True)
class SamplingConfig:
    """How :func:`next_token` picks: greedy unless ``do_sample``.

    ``temperature`` divides the logits; ``top_k`` keeps the k most likely tokens; ``top_p``
    keeps the smallest set of most likely tokens whose probability reaches ``p`` (Holtzman et
    al. 2020, https://arxiv.org/abs/1904.09751). Applied in that order, as ``transformers`` does.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"generate: expected temperature > 0, but got temperature={self.temperature}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"generate: expected top_k >= 1 or None, but got top_k={self.top_k}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"generate: expected 0 < top_p <= 1 or None, but got top_p={self.top_p}.")


def filter_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """``logits (B, V)`` after temperature, top-k and top-p; removed tokens get ``-inf``."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first is always kept)
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """The next token per row of ``logits (B, V)``: ``(B,)`` int64."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits, cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
