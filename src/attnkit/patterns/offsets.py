"""Offset-only building blocks of the block-sparse backend's periodic split (``_residue.py``).

Both are Toeplitz patterns on ``N = S`` positions, defined by which offsets ``t = i - j`` they
allow. They are patterns like any other (block maps, dense masks, composition), so the
backend plans them with the same machinery; they live here, in the pattern layer, rather than
inside the backend that builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Pattern

__all__ = ["OffsetRange", "Without"]


@dataclass(frozen=True, repr=False)
class OffsetRange(Pattern):
    """``lo <= i - j <= hi`` (``N = S``): a band, possibly excluding the diagonal."""

    lo: int
    hi: int
    is_toeplitz = True

    def _offset_rule(self, t: Tensor, n: int, s: int) -> Tensor:
        return (t >= self.lo) & (t <= self.hi)


@dataclass(frozen=True, repr=False)
class Without(Pattern):
    """``base`` without the offsets ``stride * m`` for ``lo <= m <= hi`` (``N = S``)."""

    base: Pattern
    stride: int
    lo: int
    hi: int
    is_toeplitz = True

    def _offset_rule(self, t: Tensor, n: int, s: int) -> Tensor:
        m = torch.div(t, self.stride, rounding_mode="floor")
        periodic = (torch.remainder(t, self.stride) == 0) & (m >= self.lo) & (m <= self.hi)
        return self.base._offset_rule(t, n, s) & ~periodic
