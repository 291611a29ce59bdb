"""The factorized patterns of the Sparse Transformer: ``Strided`` and ``Fixed``.

Child et al. 2019, "Generating Long Sequences with Sparse Transformers",
https://arxiv.org/abs/1904.10509. The paper splits each pattern over two heads; attnkit's
patterns are the union of the two, which is what one head sees when both are merged.
Compose with :class:`Causal` for autoregressive models: ``Strided(128) & Causal()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import Grid, Pattern, _offset, check_align, check_int, line_states, query_positions
from .blockmap import EMPTY, FULL, PARTIAL

__all__ = ["Fixed", "Strided"]


@dataclass(frozen=True, repr=False)
class Strided(Pattern):
    """Query at ``p`` sees keys with ``|p - j| < stride`` or ``(p - j) % stride == 0``.

    The first condition is the local head, the second the strided head of the Sparse
    Transformer's strided pattern.

    Picture, ``Strided(3)`` with N=7, S=7::

        ████··█
        █████··
        ██████·
        ███████
        ·██████
        ··█████
        █··████

    Picture, ``Strided(3) & Causal()`` with N=7, S=7::

        █······
        ██·····
        ███····
        ████···
        ·████··
        ··████·
        █··████
    """

    stride: int
    align: str = field(default="bottom_right", kw_only=True)
    is_toeplitz = True

    def __post_init__(self) -> None:
        check_int("Strided", "stride", self.stride, 1)
        check_align("Strided", self.align)

    def _offset_rule(self, t: Tensor, n: int, s: int) -> Tensor:
        d = t + _offset(self.align, n, s)
        return (d.abs() < self.stride) | (torch.remainder(d, self.stride) == 0)

    def _periods(self) -> tuple[int, ...]:
        return (self.stride,)


@dataclass(frozen=True, repr=False)
class Fixed(Pattern):
    """Query at ``p`` sees its own chunk, ``j // block == p // block``, and every chunk's last
    ``summary`` keys, ``j % block >= block - summary``.

    Picture, ``Fixed(3, 1)`` with N=7, S=7::

        ███··█·
        ███··█·
        ███··█·
        ··████·
        ··████·
        ··████·
        ··█··██

    Picture, ``Fixed(3, 1) & Causal()`` with N=7, S=7::

        █······
        ██·····
        ███····
        ··██···
        ··███··
        ··████·
        ··█··██
    """

    block: int
    summary: int
    align: str = field(default="bottom_right", kw_only=True)

    def __post_init__(self) -> None:
        check_int("Fixed", "block", self.block, 1)
        check_int("Fixed", "summary", self.summary, 0)
        if self.summary > self.block:
            raise ValueError(
                f"Fixed: expected summary <= block, but got summary={self.summary}, block={self.block}."
            )
        check_align("Fixed", self.align)

    def mask_mod(self, q_idx, kv_idx, n, s, b=None):
        p = query_positions(q_idx, self.align, n, s)
        same_chunk = torch.div(p, self.block, rounding_mode="floor") == kv_idx // self.block
        return same_chunk | (kv_idx % self.block >= self.block - self.summary)

    def _block_states(self, grid: Grid):
        # Summary columns depend on j only (exact per tile); the own-chunk term is exact too,
        # but OR-ing two PARTIAL terms can hide a FULL tile, so such tiles stay uncertain.
        k0, k1 = grid.k_bounds()
        j = torch.arange(grid.s)
        summary = line_states(j % self.block >= self.block - self.summary, k0, k1)[None, :]
        q0, q1 = grid.q_bounds()
        off = _offset(self.align, grid.n, grid.s)
        qc0 = torch.div(q0 + off, self.block, rounding_mode="floor")[:, None]
        qc1 = torch.div(q1 + off, self.block, rounding_mode="floor")[:, None]
        kc0, kc1 = (k0 // self.block)[None, :], (k1 // self.block)[None, :]
        own = torch.full((grid.nqb, grid.nkb), PARTIAL, dtype=torch.int8)
        own[(qc1 < kc0) | (kc1 < qc0)] = EMPTY
        own[(qc0 == qc1) & (kc0 == kc1) & (qc0 == kc0)] = FULL
        states = torch.maximum(own, summary)
        uncertain = (own == PARTIAL) & (summary == PARTIAL)
        return states, uncertain
