"""Block maps: which (query block, key block) tiles of a pattern hold any allowed pair.

A :class:`BlockMap` classifies every tile of an ``(N, S)`` attention matrix cut into
``block_q x block_k`` tiles as

* ``EMPTY`` (0): no query in the tile may see any key in it; kernels skip the tile;
* ``PARTIAL`` (1): some pairs are allowed; kernels evaluate the element mask there;
* ``FULL`` (2): every pair is allowed; kernels run the tile with no mask at all.

The last row and column of tiles may be shorter than the block size when ``N`` or ``S`` is
not a multiple of it. Block maps live on the CPU (they are small: one byte per tile) and are
built by :meth:`attnkit.patterns.Pattern.block_map`, which caches them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["EMPTY", "FULL", "PARTIAL", "BlockMap"]

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True, eq=False)
class BlockMap:
    """Three-state tile classification of a pattern for one ``(N, S)`` and block size.

    Attributes:
        n: Query length ``N``.
        s: Key length ``S``.
        block_q: Rows per tile.
        block_k: Columns per tile.
        states: ``(ceil(N / block_q), ceil(S / block_k))`` int8 tensor of ``EMPTY``,
            ``PARTIAL`` and ``FULL``.
    """

    n: int
    s: int
    block_q: int
    block_k: int
    states: Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_q_blocks(self) -> int:
        return self.states.shape[0]

    @property
    def num_k_blocks(self) -> int:
        return self.states.shape[1]

    def q_range(self, row: int) -> tuple[int, int]:
        """``[start, end)`` of the queries in tile row ``row``."""
        start = row * self.block_q
        return start, min(start + self.block_q, self.n)

    def k_range(self, col: int) -> tuple[int, int]:
        """``[start, end)`` of the keys in tile column ``col``."""
        start = col * self.block_k
        return start, min(start + self.block_k, self.s)

    @cached_property
    def counts(self) -> dict[str, int]:
        """Number of tiles in each state."""
        flat = self.states.flatten().long()
        c = torch.bincount(flat, minlength=3).tolist()
        return {"empty": c[EMPTY], "partial": c[PARTIAL], "full": c[FULL]}

    @cached_property
    def rows(self) -> list[list[tuple[int, bool]]]:
        """For each tile row, its non-empty tile columns as ``(col, is_full)``, in order."""
        out: list[list[tuple[int, bool]]] = [[] for _ in range(self.num_q_blocks)]
        nz = (self.states != EMPTY).nonzero().tolist()
        full = self.states == FULL
        for r, c in nz:
            out[r].append((c, bool(full[r, c])))
        return out

    @cached_property
    def cols(self) -> list[list[tuple[int, bool]]]:
        """For each tile column, its non-empty tile rows as ``(row, is_full)``, in order."""
        out: list[list[tuple[int, bool]]] = [[] for _ in range(self.num_k_blocks)]
        nz = (self.states.T != EMPTY).nonzero().tolist()
        full = self.states.T == FULL
        for c, r in nz:
            out[c].append((r, bool(full[c, r])))
        return out

    def visited_fraction(self) -> float:
        """Fraction of the ``N x S`` matrix inside non-empty tiles: the work a tile kernel does."""
        q_len = torch.full((self.num_q_blocks,), self.block_q, dtype=torch.float64)
        q_len[-1] = self.n - (self.num_q_blocks - 1) * self.block_q
        k_len = torch.full((self.num_k_blocks,), self.block_k, dtype=torch.float64)
        k_len[-1] = self.s - (self.num_k_blocks - 1) * self.block_k
        area = q_len[:, None] * k_len[None, :]
        return float((area * (self.states != EMPTY)).sum() / (self.n * self.s))

    def __repr__(self) -> str:
        c = self.counts
        return (
            f"BlockMap(n={self.n}, s={self.s}, block=({self.block_q}, {self.block_k}), "
            f"tiles={self.num_q_blocks}x{self.num_k_blocks}, full={c['full']}, "
            f"partial={c['partial']}, empty={c['empty']})"
        )
