"""``Random``: BigBird's random key blocks, reproducible across runs and machines."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .base import Grid, Pattern, _offset, check_align, check_int, query_positions, rect_states

__all__ = ["Random"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer (Steele et al. 2014) on uint64 arrays; wraps modulo 2**64."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass(frozen=True, repr=False)
class Random(Pattern):
    """Each query block sees ``blocks`` distinct key blocks chosen at random with ``seed``.

    Blocks are ``block`` positions wide on both axes; a query's block is ``p // block``
    (``p`` its position on the key axis, see :class:`Causal`). The choice for query block
    ``r`` ranks the ``ceil(S / block)`` key blocks by a SplitMix64 hash of
    ``(seed, r, key block)`` and keeps the ``blocks`` lowest, so it is identical on every run
    and machine; it depends on ``S`` (a longer key axis offers more blocks). With fewer key
    blocks than ``blocks``, every key block is kept. BigBird's random attention, Zaheer et
    al. 2020, https://arxiv.org/abs/2007.14062.

    Picture, ``Random(1, 2, seed=0)`` with N=6, S=6::

        ··██··
        ··██··
        ██····
        ██····
        ██····
        ██····
    """

    blocks: int
    block: int
    seed: int = 0
    align: str = field(default="bottom_right", kw_only=True)

    def __post_init__(self) -> None:
        check_int("Random", "blocks", self.blocks, 1)
        check_int("Random", "block", self.block, 1)
        check_int("Random", "seed", self.seed, 0)
        check_align("Random", self.align)

    def cells(self, n: int, s: int) -> tuple[int, torch.Tensor]:
        """The chosen cells: ``(first_row, table)`` with ``table[r - first_row, c]`` True when
        query block ``r`` sees key block ``c``."""
        return _cell_table(self, n, s)

    def mask_mod(self, q_idx, kv_idx, n, s, b=None):
        first, table = self.cells(n, s)
        table = table.to(q_idx.device)
        p = query_positions(q_idx, self.align, n, s)
        row = torch.div(p, self.block, rounding_mode="floor") - first
        return table[row, torch.div(kv_idx, self.block, rounding_mode="floor")]

    def _block_states(self, grid: Grid):
        first, table = self.cells(grid.n, grid.s)
        off = _offset(self.align, grid.n, grid.s)
        q0, q1 = grid.q_bounds()
        k0, k1 = grid.k_bounds()
        rows0 = torch.div(q0 + off, self.block, rounding_mode="floor") - first
        rows1 = torch.div(q1 + off, self.block, rounding_mode="floor") - first
        return rect_states(table, rows0, rows1, k0 // self.block, k1 // self.block), None


@lru_cache(maxsize=32)
def _cell_table(pattern: Random, n: int, s: int) -> tuple[int, torch.Tensor]:
    off = _offset(pattern.align, n, s)
    first = (off) // pattern.block
    last = (n - 1 + off) // pattern.block
    n_key_blocks = -(-s // pattern.block)
    rows = np.arange(first, last + 1, dtype=np.int64).astype(np.uint64)[:, None]
    cols = np.arange(n_key_blocks, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(np.uint64(pattern.seed) ^ rows) ^ cols)
    keep = min(pattern.blocks, n_key_blocks)
    order = np.argsort(key, axis=1, kind="stable")[:, :keep]
    table = np.zeros(key.shape, dtype=bool)
    np.put_along_axis(table, order, True, axis=1)
    return first, torch.from_numpy(table)
