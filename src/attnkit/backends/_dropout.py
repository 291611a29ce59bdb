"""Counter-based attention dropout: the keep decision is a pure function of its coordinates.

``keep(seed, b, h, i, j)`` hashes the batch, head, query and key index with a per-call seed,
so any backend -- materialized or tiled, forward or backward -- drops exactly the same
weights without storing a mask. The seed is drawn from torch's default generator, so
``torch.manual_seed`` makes runs reproducible. The hash is the 32-bit "lowbias32" integer
mixer (Chris Wellons, 2018), computed in int64 arithmetic that never overflows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["draw_seed", "keep_grid", "keep_mask"]

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def draw_seed() -> int:
    """A 31-bit seed from torch's default generator (reproducible under ``torch.manual_seed``)."""
    return int(torch.randint(0, 2**31 - 1, ()))


def keep_mask(seed: int, b: Tensor, h: Tensor, i: Tensor, j: Tensor, dropout_p: float) -> Tensor:
    """Boolean keep mask (``True`` = keep) for the broadcast of index tensors ``b, h, i, j``.

    Each element is kept with probability ``1 - dropout_p``. The hash is applied per
    coordinate level so the costly last level runs once per element.
    """
    x = _hash32((b * 0x10001 + h + seed) & _MASK32)
    x = _hash32(x ^ (i & _MASK32))
    x = _hash32(x ^ (j & _MASK32))
    threshold = round(dropout_p * (1 << 24))
    return (x >> 8) >= threshold


def keep_grid(
    seed: int, dropout_p: float, batch: Tensor, heads: Tensor, queries: Tensor, keys: Tensor
) -> Tensor:
    """Keep mask ``(len(batch), len(heads), len(queries), len(keys))`` over the grid of the
    given 1-D index vectors (the materialized and tiled layouts; the block-sparse backend's
    gathered keys call :func:`keep_mask` with its own index tensors)."""
    b, h = batch.view(-1, 1, 1, 1), heads.view(1, -1, 1, 1)
    return keep_mask(seed, b, h, queries.view(1, 1, -1, 1), keys.view(1, 1, 1, -1), dropout_p)
