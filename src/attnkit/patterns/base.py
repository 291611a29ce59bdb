"""The :class:`Pattern` protocol: which keys each query may see.

Shape legend: ``N`` query length, ``S`` key length, ``B`` batch. Query ``i`` (``0 <= i < N``)
sits at position ``p`` on the key axis. With ``align="bottom_right"`` (the default)
``p = i + (S - N)``, so the last query lines up with the last key, as in a decoder that has
cached ``S - N`` earlier tokens; with ``align="top_left"``, ``p = i``. When ``N == S`` the two
agree.

A pattern is an object, not a tensor. Every pattern answers:

* :meth:`Pattern.mask_mod` -- the element rule on (broadcastable) index tensors;
* :meth:`Pattern.to_dense` -- the ``(N, S)`` boolean matrix (``True`` = may attend), or
  ``(B, 1, N, S)`` for per-batch patterns such as :class:`KeyPadding`;
* :meth:`Pattern.block_map` -- the tile classification that block kernels use, computed from
  the pattern's structure (never by materializing ``N x S`` for structured patterns), cached;
* :meth:`Pattern.num_allowed`, :meth:`Pattern.density`, :meth:`Pattern.sparsity`;
* :meth:`Pattern.to_string` -- terminal art; and a readable ``repr``.

Patterns compose: ``a & b`` lets a pair through when both do, ``a | b`` when either does.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from .. import caches
from .blockmap import EMPTY, FULL, PARTIAL, BlockMap

__all__ = ["And", "Or", "Pattern"]

Align = Literal["bottom_right", "top_left"]
_ALIGNS = ("bottom_right", "top_left")

# Bound on the number of int64 elements a block-state computation materializes at once.
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Grid:
    """Tile geometry of an ``(n, s)`` matrix cut into ``bq x bk`` tiles (CPU int64 tensors).

    By default the tiles cover the whole matrix. A grid may cover only the rectangle of rows
    ``[q_lo, q_hi)`` and columns ``[k_lo, k_hi)`` (tiles starting at ``q_lo`` and ``k_lo``);
    ``n`` and ``s`` stay the whole matrix's sizes, so a pattern's alignment is unchanged and
    its tile states come out for that rectangle alone (see :class:`attnkit.patterns.Crop`).
    """

    n: int
    s: int
    bq: int
    bk: int
    q_lo: int = 0
    k_lo: int = 0
    q_hi: int | None = None
    k_hi: int | None = None

    @property
    def q_end(self) -> int:
        return self.n if self.q_hi is None else self.q_hi

    @property
    def k_end(self) -> int:
        return self.s if self.k_hi is None else self.k_hi

    @property
    def nqb(self) -> int:
        return -(-(self.q_end - self.q_lo) // self.bq)

    @property
    def nkb(self) -> int:
        return -(-(self.k_end - self.k_lo) // self.bk)

    def q_bounds(self) -> tuple[Tensor, Tensor]:
        """First and last (inclusive) query index of each tile row, ``(nqb,)`` each."""
        start = self.q_lo + torch.arange(self.nqb) * self.bq
        return start, torch.clamp(start + self.bq, max=self.q_end) - 1

    def k_bounds(self) -> tuple[Tensor, Tensor]:
        """First and last (inclusive) key index of each tile column, ``(nkb,)`` each."""
        start = self.k_lo + torch.arange(self.nkb) * self.bk
        return start, torch.clamp(start + self.bk, max=self.k_end) - 1


def classify(count: Tensor, area: Tensor) -> Tensor:
    """Tile state from the number of allowed pairs in a tile and the tile's area."""
    states = torch.full(count.shape, PARTIAL, dtype=torch.int8)
    states[count == 0] = EMPTY
    states[count == area] = FULL
    return states


def _offset(align: str, n: int, s: int) -> int:
    """``p - i`` for the given alignment."""
    return s - n if align == "bottom_right" else 0


class Pattern:
    """Base class of attention patterns. Subclasses are frozen dataclasses.

    A subclass implements :meth:`mask_mod` and :meth:`_block_states`, or, when it depends
    only on the offset ``i - j`` (a Toeplitz pattern such as a window), sets
    ``is_toeplitz = True`` and implements :meth:`_offset_rule`; its block map is then exact
    in ``O(N + S + tiles)``.
    """

    is_toeplitz: bool = False

    # ----------------------------------------------------------------- subclass hooks
    @property
    def batch_size(self) -> int | None:
        """Number of batch items the pattern is defined for, or ``None`` if it is per-batch-free."""
        return None

    def check(self, n: int, s: int) -> None:
        """Raise ``ValueError`` if the pattern cannot describe an ``(n, s)`` attention matrix."""

    def mask_mod(self, q_idx: Tensor, kv_idx: Tensor, n: int, s: int, b: Tensor | None = None) -> Tensor:
        """The element rule: ``True`` where query ``q_idx`` may see key ``kv_idx``.

        Args:
            q_idx: Integer query indices (``0 <= q_idx < n``), any shape.
            kv_idx: Integer key indices (``0 <= kv_idx < s``), broadcastable with ``q_idx``.
            n: Query length ``N``.
            s: Key length ``S``.
            b: Batch indices broadcastable with the others; only per-batch patterns read it.

        Returns:
            A boolean tensor of the broadcast shape (with ``b``'s dimensions for per-batch
            patterns).
        """
        if self.is_toeplitz:
            return self._offset_rule(q_idx - kv_idx, n, s)
        raise NotImplementedError(f"{type(self).__name__} must implement mask_mod")

    def _offset_rule(self, t: Tensor, n: int, s: int) -> Tensor:
        """Toeplitz patterns: ``True`` where offset ``t = i - j`` is allowed."""
        raise NotImplementedError

    def _periods(self) -> tuple[int, ...]:
        """Periods of the offsets this pattern allows (``Strided``, ``Dilated``): a hint that
        kernels may regroup positions by residue (see ``backends/_residue.py``)."""
        return ()

    def _block_states(self, grid: Grid) -> tuple[Tensor, Tensor | None]:
        """Tile states ``(nqb, nkb)`` or ``(B, nqb, nkb)``, and which PARTIAL ones are uncertain.

        ``PARTIAL`` is always safe (kernels apply the element mask there). A state is
        *uncertain* when the tile might really be ``EMPTY`` or ``FULL``; :meth:`block_map`
        refines uncertain tiles element by element. Return ``None`` when all are certain.
        """
        if self.is_toeplitz:
            return _toeplitz_states(self._offset_rule, grid), None
        raise NotImplementedError(f"{type(self).__name__} must implement _block_states")

    # ----------------------------------------------------------------- public API
    def evaluate(self, q_idx: Tensor, kv_idx: Tensor, n: int, s: int) -> Tensor:
        """:meth:`mask_mod` on broadcastable index tensors, batch items included: the result
        has the broadcast shape of ``q_idx`` and ``kv_idx``, with a leading ``B`` dimension for
        per-batch patterns. The one place where a pattern's rule is evaluated on indices (dense
        masks, tile masks and the backends' masks all come through here)."""
        if self.batch_size is None:
            return self.mask_mod(q_idx, kv_idx, n, s)
        rank = max(q_idx.dim(), kv_idx.dim())
        b = torch.arange(self.batch_size, device=q_idx.device).view(-1, *([1] * rank))
        return self.mask_mod(q_idx, kv_idx, n, s, b).expand(
            self.batch_size, *torch.broadcast_shapes(q_idx.shape, kv_idx.shape)
        )

    def to_dense(self, n: int, s: int | None = None, device: torch.device | str | None = None) -> Tensor:
        """Materialize the pattern: ``(N, S)`` bool, or ``(B, 1, N, S)`` for per-batch patterns.

        ``True`` means "may attend". Costs ``N * S`` bytes; meant for tests, pictures and the
        reference backend.
        """
        n, s = _sizes(n, s)
        self.check(n, s)
        dense = self.evaluate(
            torch.arange(n, device=device).view(n, 1), torch.arange(s, device=device).view(1, s), n, s
        )
        if self.batch_size is None:
            return dense.expand(n, s).contiguous()
        return dense.expand(self.batch_size, n, s).unsqueeze(1).contiguous()

    def block_map(self, n: int, s: int | None = None, block: int | tuple[int, int] = 64) -> BlockMap:
        """Classify the ``block x block`` tiles of an ``(N, S)`` matrix as empty, partial or full.

        Computed from the pattern's structure and cached per ``(pattern, N, S, block)``. For
        per-batch patterns a tile is ``FULL`` (``EMPTY``) only if it is so for every batch item.
        """
        n, s = _sizes(n, s)
        bq, bk = (block, block) if isinstance(block, int) else tuple(block)
        if bq < 1 or bk < 1:
            raise ValueError(f"block_map(): expected block sizes >= 1, but got block={block!r}.")
        self.check(n, s)
        return _BLOCK_MAPS.get((self, n, s, bq, bk), lambda: self._build_block_map(n, s, bq, bk))

    def tile_masks(
        self, n: int, s: int, block: tuple[int, int], rows: Tensor, cols: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Element masks of the tiles ``(rows[t], cols[t])`` of a ``block``-tiled ``(N, S)`` matrix.

        Returns ``(masks, valid)``: ``masks`` is ``(T, bq, bk)`` bool (``(B, T, bq, bk)`` for
        per-batch patterns), already False outside the matrix; ``valid`` ``(T, bq, bk)`` marks
        the elements inside it (ragged last tiles). Indices are CPU int64 tensors.
        """
        return _tile_masks(self, Grid(n, s, *block), rows, cols)

    def num_allowed(self, n: int, s: int | None = None) -> int:
        """Number of allowed (query, key) pairs; summed over batch items for per-batch patterns."""
        n, s = _sizes(n, s)
        self.check(n, s)
        if self.is_toeplitz:
            t = torch.arange(-(s - 1), n)
            diag_len = torch.clamp(torch.clamp(t + s, max=n) - torch.clamp(t, min=0), min=0)
            return int((self._offset_rule(t, n, s) * diag_len).sum())
        bm = self.block_map(n, s, _counting_block(n, s))
        return _count_allowed(self, bm)

    def density(self, n: int, s: int | None = None) -> float:
        """Fraction of the ``N x S`` pairs that are allowed (averaged over batch items)."""
        n, s = _sizes(n, s)
        return self.num_allowed(n, s) / (n * s * (self.batch_size or 1))

    def sparsity(self, n: int, s: int | None = None) -> float:
        """Fraction of the ``N x S`` pairs that are masked out: ``1 - density``."""
        return 1.0 - self.density(n, s)

    def to_string(self, n: int, s: int | None = None, block: int | None = None, width: int = 64) -> str:
        """Terminal art of the pattern: ``█`` full tile, ``░`` partial tile, ``·`` empty tile.

        Rows are queries (top to bottom), columns are keys (left to right). By default the tile
        size is the smallest that fits ``width`` columns; for ``N, S <= width`` every character
        is one (query, key) pair.
        """
        n, s = _sizes(n, s)
        if block is None:
            block = max(1, math.ceil(max(n, s) / width))
        bm = self.block_map(n, s, block)
        glyph = {EMPTY: "·", PARTIAL: "░", FULL: "█"}
        lines = [f"{self!r}   N={n} S={s}   tile={block}x{block}   density={100 * self.density(n, s):.2f}%"]
        for row in bm.states.tolist():
            lines.append("".join(glyph[v] for v in row))
        return "\n".join(lines)

    # ----------------------------------------------------------------- composition
    #: ``True`` for :class:`~attnkit.patterns.PerHead` (a pattern per attention head).
    per_head: bool = False

    def __and__(self, other: Pattern) -> Pattern:
        if not isinstance(other, Pattern) or other.per_head:  # PerHead distributes over heads
            return NotImplemented
        return And(*_flatten(And, self), *_flatten(And, other))

    def __or__(self, other: Pattern) -> Pattern:
        if not isinstance(other, Pattern) or other.per_head:
            return NotImplemented
        return Or(*_flatten(Or, self), *_flatten(Or, other))

    def __repr__(self) -> str:
        """``Name(arg=value, ...)``, leaving out arguments that equal their defaults."""
        parts = []
        for f in fields(self):  # type: ignore[arg-type]
            if not f.repr:
                continue
            value = getattr(self, f.name)
            if f.default is not MISSING and value == f.default:
                continue
            parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # ----------------------------------------------------------------- internals
    def _build_block_map(self, n: int, s: int, bq: int, bk: int) -> BlockMap:
        grid = Grid(n, s, bq, bk)
        states, uncertain = self._block_states(grid)
        if states.dim() == 3:  # per-batch: FULL/EMPTY only if so for every batch item
            merged = torch.full(states.shape[1:], PARTIAL, dtype=torch.int8)
            merged[(states == EMPTY).all(0)] = EMPTY
            merged[(states == FULL).all(0)] = FULL
            if uncertain is not None:
                uncertain = uncertain.expand_as(states).any(0) & (merged == PARTIAL)
            states = merged
        states = states.expand(grid.nqb, grid.nkb).clone()
        if uncertain is not None and bool(uncertain.any()):
            _refine(self, grid, states, uncertain.expand_as(states))
        return BlockMap(n=n, s=s, block_q=bq, block_k=bk, states=states)


def _sizes(n: int, s: int | None) -> tuple[int, int]:
    s = n if s is None else s
    for name, value in (("N", n), ("S", s)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Pattern: expected {name} to be a positive int, but got {name}={value!r}.")
    return n, s


def _flatten(kind: type, p: Pattern) -> tuple[Pattern, ...]:
    return p.parts if isinstance(p, kind) else (p,)


def _counting_block(n: int, s: int) -> int:
    """A tile size that keeps block maps small when counting allowed pairs."""
    return max(64, 1 << math.ceil(math.log2(max(1, math.isqrt(n * s) // 256))))


_BLOCK_MAPS = caches.register("block_maps", 64 * caches.MiB)


def _toeplitz_states(rule, grid: Grid) -> Tensor:
    """Exact tile states of a pattern that depends only on ``t = i - j``.

    A tile with rows ``[i0, i1]`` and columns ``[j0, j1]`` contains exactly the offsets
    ``t in [i0 - j1, i1 - j0]``, each at least once, so it is FULL iff every offset in that
    range is allowed and EMPTY iff none is: a prefix sum over the ``N + S - 1`` offsets answers
    both for every tile.
    """
    n, s = grid.n, grid.s
    t = torch.arange(-(s - 1), n)
    csum = torch.zeros(t.numel() + 1, dtype=torch.int64)
    csum[1:] = torch.cumsum(rule(t, n, s).to(torch.int64), 0)
    q0, q1 = grid.q_bounds()
    k0, k1 = grid.k_bounds()
    states = torch.empty(grid.nqb, grid.nkb, dtype=torch.int8)
    rows = max(1, _CHUNK_ELEMENTS // grid.nkb)
    for r in range(0, grid.nqb, rows):
        lo = q0[r : r + rows, None] - k1[None, :] + (s - 1)  # index of the smallest offset
        hi = q1[r : r + rows, None] - k0[None, :] + (s - 1)
        count = csum[hi + 1] - csum[lo]
        states[r : r + rows] = classify(count, hi - lo + 1)
    return states


def rect_states(table: Tensor, row_lo: Tensor, row_hi: Tensor, col_lo: Tensor, col_hi: Tensor) -> Tensor:
    """Tile states of a pattern given as a boolean grid of cells (a coarser or finer grid).

    ``table`` is ``(R, C)``; tile row ``r`` covers cell rows ``row_lo[r]..row_hi[r]`` and tile
    column ``c`` covers cell columns ``col_lo[c]..col_hi[c]`` (inclusive, already clipped to
    the table). Each covered cell holds at least one element of the tile, so the tile is FULL
    iff all covered cells are set and EMPTY iff none is: exact, via a 2-D prefix sum.
    """
    R, C = table.shape
    csum = torch.zeros(R + 1, C + 1, dtype=torch.int64)
    csum[1:, 1:] = table.to(torch.int64).cumsum(0).cumsum(1)
    states = torch.empty(row_lo.numel(), col_lo.numel(), dtype=torch.int8)
    rows = max(1, _CHUNK_ELEMENTS // max(1, col_lo.numel()))
    for r in range(0, row_lo.numel(), rows):
        r0, r1 = row_lo[r : r + rows, None], row_hi[r : r + rows, None] + 1
        c0, c1 = col_lo[None, :], col_hi[None, :] + 1
        count = csum[r1, c1] - csum[r0, c1] - csum[r1, c0] + csum[r0, c0]
        states[r : r + rows] = classify(count, (r1 - r0) * (c1 - c0))
    return states


def line_states(flag: Tensor, grid_lo: Tensor, grid_hi: Tensor) -> Tensor:
    """Per-tile count of set ``flag`` entries in ``[grid_lo, grid_hi]`` classified as a state."""
    csum = torch.zeros(flag.numel() + 1, dtype=torch.int64)
    csum[1:] = flag.to(torch.int64).cumsum(0)
    return classify(csum[grid_hi + 1] - csum[grid_lo], grid_hi - grid_lo + 1)


def _tile_masks(pattern: Pattern, grid: Grid, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Element masks of the tiles ``(rows[t], cols[t])``: ``(T, bq, bk)`` or ``(B, T, bq, bk)``.

    Returns the masks and the ``(T, bq, bk)`` validity of each element (ragged last tiles).
    """
    q = rows[:, None] * grid.bq + torch.arange(grid.bq)  # (T, bq)
    k = cols[:, None] * grid.bk + torch.arange(grid.bk)  # (T, bk)
    valid = (q < grid.n)[:, :, None] & (k < grid.s)[:, None, :]
    q = q.clamp(max=grid.n - 1)[:, :, None]
    k = k.clamp(max=grid.s - 1)[:, None, :]
    return pattern.evaluate(q, k, grid.n, grid.s) & valid, valid


def _refine(pattern: Pattern, grid: Grid, states: Tensor, uncertain: Tensor) -> None:
    """Re-classify the uncertain PARTIAL tiles by evaluating their element masks."""
    idx = uncertain.nonzero()
    per_chunk = max(1, _CHUNK_ELEMENTS // (grid.bq * grid.bk * (pattern.batch_size or 1)))
    for c in range(0, idx.shape[0], per_chunk):
        rows, cols = idx[c : c + per_chunk, 0], idx[c : c + per_chunk, 1]
        m, valid = _tile_masks(pattern, grid, rows, cols)
        area = valid.sum((-1, -2))
        count = m.sum((-1, -2))
        st = classify(count, area.expand_as(count))
        if st.dim() == 2:  # per-batch
            merged = torch.full(st.shape[1:], PARTIAL, dtype=torch.int8)
            merged[(st == EMPTY).all(0)] = EMPTY
            merged[(st == FULL).all(0)] = FULL
            st = merged
        states[rows, cols] = st


def _count_allowed(pattern: Pattern, bm: BlockMap) -> int:
    grid = Grid(bm.n, bm.s, bm.block_q, bm.block_k)
    q0, q1 = grid.q_bounds()
    k0, k1 = grid.k_bounds()
    area = (q1 - q0 + 1)[:, None] * (k1 - k0 + 1)[None, :]
    total = int(area[bm.states == FULL].sum()) * (pattern.batch_size or 1)
    idx = (bm.states == PARTIAL).nonzero()
    per_chunk = max(1, _CHUNK_ELEMENTS // (grid.bq * grid.bk * (pattern.batch_size or 1)))
    for c in range(0, idx.shape[0], per_chunk):
        m, _ = _tile_masks(pattern, grid, idx[c : c + per_chunk, 0], idx[c : c + per_chunk, 1])
        total += int(m.sum())
    return total


def check_align(owner: str, align: str) -> None:
    if align not in _ALIGNS:
        raise ValueError(f"{owner}: expected align to be one of {_ALIGNS}, but got align={align!r}.")


def check_int(owner: str, name: str, value: object, minimum: int) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: expected {name} to be an int, but got {name}={value!r}.")
    if value < minimum:
        raise ValueError(f"{owner}: expected {name} >= {minimum}, but got {name}={value}.")


def query_positions(q_idx: Tensor, align: str, n: int, s: int) -> Tensor:
    """``p``: the position of each query on the key axis."""
    return q_idx + _offset(align, n, s)


class _Composite(Pattern):
    parts: tuple[Pattern, ...]

    def __init__(self, *parts: Pattern) -> None:
        name = type(self).__name__
        if len(parts) < 2:
            raise ValueError(f"{name}: expected at least 2 patterns, but got {len(parts)}.")
        for p in parts:
            if not isinstance(p, Pattern):
                raise TypeError(f"{name}: expected Pattern operands, but got {type(p).__name__}.")
            if p.per_head:
                raise TypeError(f"{name}: combine a PerHead with & or |, which apply it to every head.")
        sizes = {p.batch_size for p in parts} - {None}
        if len(sizes) > 1:
            raise ValueError(f"{name}: per-batch patterns disagree on the batch size: {sorted(sizes)}.")
        object.__setattr__(self, "parts", tuple(parts))

    def __setattr__(self, key, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.parts == other.parts  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.parts))

    @property
    def is_toeplitz(self) -> bool:  # type: ignore[override]
        return all(p.is_toeplitz for p in self.parts)

    @property
    def batch_size(self) -> int | None:
        sizes = {p.batch_size for p in self.parts} - {None}
        return sizes.pop() if sizes else None

    def check(self, n: int, s: int) -> None:
        for p in self.parts:
            p.check(n, s)

    def __repr__(self) -> str:
        sep = " & " if isinstance(self, And) else " | "
        return sep.join(f"({p!r})" if isinstance(p, _Composite) else repr(p) for p in self.parts)

    def _combine(self, tensors: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def _offset_rule(self, t: Tensor, n: int, s: int) -> Tensor:
        return self._combine([p._offset_rule(t, n, s) for p in self.parts])

    def _periods(self) -> tuple[int, ...]:
        return tuple(period for p in self.parts for period in p._periods())

    def mask_mod(self, q_idx, kv_idx, n, s, b=None):
        return self._combine([p.mask_mod(q_idx, kv_idx, n, s, b) for p in self.parts])

    def _block_states(self, grid: Grid) -> tuple[Tensor, Tensor | None]:
        # Fold every offset-only part into one exact Toeplitz term, then combine the rest with
        # min (AND) / max (OR) over EMPTY < PARTIAL < FULL.
        toeplitz = [p for p in self.parts if p.is_toeplitz]
        others = [p for p in self.parts if not p.is_toeplitz]
        items: list[tuple[Tensor, Tensor | None]] = []
        if toeplitz:
            rule = toeplitz[0]._offset_rule if len(toeplitz) == 1 else type(self)(*toeplitz)._offset_rule
            items.append((_toeplitz_states(rule, grid), None))
        items.extend(p._block_states(grid) for p in others)
        states = items[0][0]
        for st, _ in items[1:]:
            states = self._reduce(states, st)
        if len(items) == 1:
            return states, items[0][1]
        # A PARTIAL result is certain only when exactly one part was PARTIAL, and certainly so.
        n_partial = sum((st == PARTIAL).to(torch.int8) for st, _ in items)
        shaky = sum(((st == PARTIAL) & unc).to(torch.int8) for st, unc in items if unc is not None)
        uncertain = (states == PARTIAL) & ((n_partial > 1) | (torch.as_tensor(shaky) > 0))
        return states, uncertain

    @staticmethod
    def _reduce(a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError


class And(_Composite):
    """Pairs allowed by every part: ``a & b & ...``."""

    def _combine(self, tensors):
        out = tensors[0]
        for t in tensors[1:]:
            out = out & t
        return out

    @staticmethod
    def _reduce(a, b):
        return torch.minimum(a, b)


class Or(_Composite):
    """Pairs allowed by any part: ``a | b | ...``."""

    def _combine(self, tensors):
        out = tensors[0]
        for t in tensors[1:]:
            out = out | t
        return out

    @staticmethod
    def _reduce(a, b):
        return torch.maximum(a, b)
