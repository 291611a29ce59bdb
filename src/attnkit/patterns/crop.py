"""A rectangle of a pattern: rows ``[r0, r1)`` and columns ``[c0, c1)`` of its ``(N, S)`` matrix.

Context parallelism computes attention one (query shard, key shard) pair at a time; each pair
is an ordinary attention call whose pattern is the cropped rectangle of the whole one. A crop
keeps the whole matrix's sizes for the rule (so alignment and document boundaries stay global)
and gets its tile states from the base pattern's structure on the shifted tiles, so it costs
no more to plan than the base (see :class:`~attnkit.patterns.base.Grid`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import And, Grid, Or, Pattern, _sizes
from .basic import Full
from .document import KeyPadding

__all__ = ["Crop", "crop"]


@dataclass(frozen=True, repr=False)
class Crop(Pattern):
    """Rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]`` of ``base`` on an ``(n, s)``
    matrix, as a pattern on an ``(rows[1] - rows[0], cols[1] - cols[0])`` matrix.

    Local query ``i`` and key ``j`` are the base's query ``rows[0] + i`` and key
    ``cols[0] + j``. Build with :func:`crop`, which keeps crops of simple patterns simple.
    """

    base: Pattern
    n: int
    s: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    def __post_init__(self) -> None:
        _check_rect(self.n, self.s, self.rows, self.cols)

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, S)`` of the cropped matrix."""
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]

    @property
    def is_toeplitz(self) -> bool:  # type: ignore[override]
        return self.base.is_toeplitz

    @property
    def batch_size(self) -> int | None:
        return self.base.batch_size

    def check(self, n: int, s: int) -> None:
        if (n, s) != self.shape:
            raise ValueError(
                f"Crop: expected an attention matrix of (N, S) = {self.shape} (rows {self.rows}, "
                f"columns {self.cols} of {self.n} x {self.s}), but got N={n}, S={s}."
            )

    def mask_mod(self, q_idx: Tensor, kv_idx: Tensor, n: int, s: int, b: Tensor | None = None) -> Tensor:
        return self.base.mask_mod(q_idx + self.rows[0], kv_idx + self.cols[0], self.n, self.s, b)

    def _offset_rule(self, t: Tensor, n: int, s: int) -> Tensor:
        return self.base._offset_rule(t + (self.rows[0] - self.cols[0]), self.n, self.s)

    def _block_states(self, grid: Grid) -> tuple[Tensor, Tensor | None]:
        shifted = Grid(
            self.n,
            self.s,
            grid.bq,
            grid.bk,
            q_lo=self.rows[0] + grid.q_lo,
            k_lo=self.cols[0] + grid.k_lo,
            q_hi=self.rows[0] + grid.q_end,
            k_hi=self.cols[0] + grid.k_end,
        )
        return self.base._block_states(shifted)

    def __repr__(self) -> str:
        return f"Crop({self.base!r}, N={self.n}, S={self.s}, rows={self.rows}, cols={self.cols})"


def crop(pattern: Pattern, n: int, s: int, rows: tuple[int, int], cols: tuple[int, int]) -> Pattern:
    """The rectangle ``rows x cols`` of ``pattern`` on an ``(n, s)`` matrix, as a pattern.

    ``attention(q[..., r0:r1, :], k[..., c0:c1, :], v[..., c0:c1, :], pattern=crop(p, N, S,
    (r0, r1), (c0, c1)))`` computes what those queries would get from those keys in
    ``attention(q, k, v, pattern=p)`` before the softmax is normalized over the other keys.

    ``Full`` stays ``Full``; ``KeyPadding`` becomes ``KeyPadding`` of the shifted lengths;
    ``And``/``Or`` crop their parts (so call-time key lengths still split off); everything
    else becomes a :class:`Crop`. The whole rectangle gives ``pattern`` itself.

    Raises:
        ValueError: The rectangle is empty or outside the ``(n, s)`` matrix, or ``pattern``
            cannot describe an ``(n, s)`` matrix.
    """
    n, s = _sizes(n, s)
    rows, cols = (int(rows[0]), int(rows[1])), (int(cols[0]), int(cols[1]))
    _check_rect(n, s, rows, cols)
    pattern.check(n, s)
    if rows == (0, n) and cols == (0, s):
        return pattern
    if isinstance(pattern, Full):
        return pattern
    if isinstance(pattern, KeyPadding):
        width = cols[1] - cols[0]
        return KeyPadding(tuple(min(max(x - cols[0], 0), width) for x in pattern.lengths))
    if isinstance(pattern, (And, Or)):
        return type(pattern)(*(crop(p, n, s, rows, cols) for p in pattern.parts))
    return Crop(pattern, n, s, rows, cols)


def _check_rect(n: int, s: int, rows: tuple[int, int], cols: tuple[int, int]) -> None:
    for name, (lo, hi), size in (("rows", rows, n), ("cols", cols, s)):
        if not 0 <= lo < hi <= size:
            raise ValueError(
                f"crop(): expected {name} = (start, stop) with 0 <= start < stop <= {size}, "
                f"but got {name}={(lo, hi)}."
            )
