"""Helpers shared by backends: combining pattern, boolean mask and bias."""

from __future__ import annotations

import torch
from torch import Tensor

from ..patterns import Pattern
from .base import AttentionInputs

__all__ = ["dense_allowed", "heads_as_groups", "pattern_mask", "reduce_to", "tile"]


def dense_allowed(inp: AttentionInputs) -> Tensor | None:
    """The materialized ``allowed`` mask (pattern AND mask), broadcastable to ``(B, H, N, S)``.

    ``None`` when nothing is masked. Costs ``N * S`` bytes (times ``B`` for per-batch parts).
    """
    allowed = None
    if inp.pattern is not None:
        allowed = pattern_mask(inp.pattern, inp.N, inp.S, inp.device)
    if inp.mask is not None:
        allowed = inp.mask if allowed is None else allowed & inp.mask
    return allowed


def pattern_mask(pattern: Pattern, n: int, s: int, device: torch.device) -> Tensor:
    """A pattern's mask in its smallest 4-D broadcastable shape.

    ``(1, 1, N, S)`` for most patterns, ``(B, 1, 1, S)`` for :class:`KeyPadding`: the rule is
    evaluated on broadcast index vectors, so a pattern that ignores the query index stays a
    row.
    """
    m = pattern.evaluate(
        torch.arange(n, device=device).view(n, 1), torch.arange(s, device=device).view(1, s), n, s
    )
    if pattern.batch_size is None:
        return m.view(1, 1, *m.shape)
    return m.view(m.shape[0], 1, *m.shape[1:])


def tile(t: Tensor, i0: int, i1: int, j0: int, j1: int) -> Tensor:
    """Rows ``i0:i1`` and columns ``j0:j1`` of the last two dims, leaving size-1 dims whole."""
    rows = slice(i0, i1) if t.shape[-2] > 1 else slice(None)
    cols = slice(j0, j1) if t.shape[-1] > 1 else slice(None)
    return t[..., rows, cols]


def heads_as_groups(t: Tensor, hkv: int) -> Tensor:
    """View a 4-D ``(b, h, n, s)`` mask or bias as 5-D ``(b, Hkv, G, n, s)`` (or with 1s)."""
    b, h, n, s = t.shape
    if h == 1:
        return t.view(b, 1, 1, n, s)
    return t.view(b, hkv, h // hkv, n, s)


def reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``grad`` over the dims where ``shape`` is 1 (the inverse of broadcasting)."""
    pairs = enumerate(zip(grad.shape, shape, strict=True))
    dims = tuple(d for d, (g, s) in pairs if s == 1 and g != 1)
    return grad.sum(dims, keepdim=True) if dims else grad
