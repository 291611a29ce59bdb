"""``Global``: tokens that see everything and are seen by everything (Longformer, ETC, BigBird)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .base import Grid, Pattern, _offset, check_align, line_states, query_positions
from .blockmap import EMPTY, FULL, PARTIAL

__all__ = ["Global"]


@dataclass(frozen=True, repr=False)
class Global(Pattern):
    """A query or key whose index is listed sees and is seen by every position.

    A query's index is its position ``p`` on the key axis (see :class:`Causal` for
    ``align``), so the same tokens stay global when decoding with a KV cache. Usually
    combined with a window: ``SlidingWindow(256, 256) | Global(range(16))``.

    Args:
        indices: Global positions (any iterable of non-negative ints; stored sorted, unique).

    Picture, ``Global((0, 3))`` with N=6, S=6::

        ██████
        █··█··
        █··█··
        ██████
        █··█··
        █··█··
    """

    indices: tuple[int, ...]
    align: str = field(default="bottom_right", kw_only=True)

    def __post_init__(self) -> None:
        raw = self.indices
        if isinstance(raw, int) or not isinstance(raw, Iterable):
            raise TypeError(
                f"Global: expected indices to be an iterable of ints (e.g. range(16)), "
                f"but got indices={raw!r}."
            )
        values = list(raw.tolist() if isinstance(raw, torch.Tensor) else raw)
        if not values:
            raise ValueError("Global: expected at least one index, but got an empty indices.")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Global: expected every index to be an int >= 0, but got {v!r} in indices.")
        object.__setattr__(self, "indices", tuple(sorted(set(values))))
        check_align("Global", self.align)

    def __repr__(self) -> str:
        idx = self.indices
        contiguous = idx == tuple(range(idx[0], idx[-1] + 1))
        shown = f"range({idx[0]}, {idx[-1] + 1})" if contiguous and len(idx) > 3 else repr(idx)
        shown = shown.replace("range(0, ", "range(")
        extra = "" if self.align == "bottom_right" else f", align={self.align!r}"
        return f"Global({shown}{extra})"

    def check(self, n: int, s: int) -> None:
        limit = max(n, s) if self.align == "top_left" else s
        if self.indices[-1] >= limit:
            raise ValueError(
                f"Global: expected every index < {limit} (the positions of an N={n}, S={s} "
                f"attention), but got index {self.indices[-1]}."
            )

    def _members(self, device) -> torch.Tensor:
        return torch.tensor(self.indices, device=device)

    def mask_mod(self, q_idx, kv_idx, n, s, b=None):
        g = self._members(q_idx.device)
        p = query_positions(q_idx, self.align, n, s)
        return torch.isin(p, g) | torch.isin(kv_idx, g)

    def _block_states(self, grid: Grid):
        g = self._members("cpu")
        off = _offset(self.align, grid.n, grid.s)
        q0, q1 = grid.q_bounds()
        k0, k1 = grid.k_bounds()
        rows = line_states(torch.isin(torch.arange(grid.n) + off, g), q0, q1)[:, None]
        cols = line_states(torch.isin(torch.arange(grid.s), g), k0, k1)[None, :]
        # FULL iff every row or every column of the tile is global; EMPTY iff none is.
        states = torch.full((grid.nqb, grid.nkb), PARTIAL, dtype=torch.int8)
        states[(rows == EMPTY) & (cols == EMPTY)] = EMPTY
        states[(rows == FULL) | (cols == FULL)] = FULL
        return states, None
