"""Execution plans for block-sparse attention: which batched calls cover a pattern's tiles.

A plan cuts the ``(N, S)`` matrix into ``b x b`` tiles (the pattern's :class:`BlockMap`) and
covers every non-empty tile with *segments*. Each segment is a set of query-tile rows that all
attend to ``L`` key tiles, so one batched attention call computes it:

* the **band**: the diagonals ``c - r`` in ``[lo, hi]`` that most rows use (a sliding window,
  the local part of BigBird, a causal Sparse Transformer...). Row ``r`` reads key tiles
  ``r + lo .. r + hi``; where those lie inside the keys, the keys of all rows are one strided
  view of ``K``: nothing is copied. The few rows at the ends, whose range sticks out, are
  gathered instead;
* **gathered** buckets: every other non-empty tile (global columns, random blocks, irregular
  layouts), copied per row and grouped by how many each row has.

The band is chosen by a cost model: a diagonal joins it when computing it for every row
(wasted where empty) is cheaper than gathering its non-empty tiles (``Tuning.gather_cost``
band tiles each); the best contiguous range is a maximum-sum subarray. Each segment stores the pattern's
element mask over its keys (``allowed``); tiles outside the matrix and missing tiles are False.

The tile size is chosen per pattern and dtype (:func:`choose_block`): each candidate's plan is
priced with the speed of torch's kernel on band and gathered layouts, measured on the machine
that runs (``_tuning.py``). Small tiles waste less at a band's edges; large ones run the kernel
faster, above all in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import caches
from ..patterns import EMPTY, FULL, PARTIAL, Pattern
from . import _tuning

__all__ = [
    "Segment",
    "SparsePlan",
    "block_and_cost",
    "choose_block",
    "plan_cost",
    "sparse_plan",
]

#: A gathered bucket admits rows with up to this many times the tiles of its smallest row: a
#: rule trading padding (at most 25% extra tiles per row) against more, smaller calls.
BUCKET_SLACK = 1.25


@dataclass(frozen=True, eq=False)
class Segment:
    """Query-tile rows that each attend to ``L`` key tiles, computed by one batched call.

    Attributes:
        rows: ``(R,)`` query-tile indices (increasing; consecutive for the band).
        cols: ``(R, L)`` key-tile indices (outside ``[0, S / b)`` or -1: padding, masked).
        band: ``cols[i] == cols[0] + (rows[i] - rows[0])`` and every key exists: the keys are
            a strided view of ``K``. Otherwise they are gathered through ``key_index``.
        allowed: ``(R, b, K)`` bool (``(B, R, b, K)`` for per-batch patterns), the pattern's
            element mask, False outside the matrix. ``K = L * b`` for the band; a gathered
            segment keeps only the key positions some query of it sees (the 4 sinks of a
            64-key tile, not all 64), so ``K <= L * b``.
        query_index: ``(R, b)`` query position of each row element, clamped into ``[0, N)``.
        key_index: ``(R, K)`` key position of each key element, clamped into ``[0, S)``.
        same: ``(R,)`` bool, rows whose mask equals ``allowed[ref]`` (one shared mask).
        ref: Index of the reference row for ``same``.
        key_lo: ``(R,)`` smallest key position any query of the row may see (``S`` if none).
        key_hi: ``(R,)`` largest such key position (-1 if none). With key lengths applied at
            call time, they tell rows untouched by padding from rows that need it.
    """

    rows: Tensor
    cols: Tensor
    band: bool
    allowed: Tensor
    query_index: Tensor
    key_index: Tensor
    same: Tensor
    ref: int
    key_lo: Tensor
    key_hi: Tensor

    @property
    def length(self) -> int:
        """Key tiles per row, ``L``."""
        return self.cols.shape[1]

    @property
    def keys_per_row(self) -> int:
        """Key positions per row, ``K`` (``L * b`` for the band, at most that when gathered)."""
        return self.key_index.shape[1]


@dataclass(frozen=True, eq=False)
class SparsePlan:
    """How block-sparse attention covers one pattern at one ``(N, S)`` and tile size ``b``."""

    n: int
    s: int
    block: int
    num_q_tiles: int
    num_k_tiles: int
    segments: tuple[Segment, ...]
    visited_tiles: int  # tiles the segments compute (band padding and bucket padding included)
    nonempty_tiles: int


_PLANS = caches.register("plans", 256 * caches.MiB)
_TILE_CHOICES = caches.register("tile_choices", 4 * caches.MiB)


def choose_block(pattern: Pattern, n: int, s: int, direction: str = "forward", dtype=torch.float32) -> int:
    """The tile size whose plan this machine's kernel rates predict to run fastest (cached)."""
    return block_and_cost(pattern, n, s, direction, dtype)[0]


def block_and_cost(
    pattern: Pattern, n: int, s: int, direction: str = "forward", dtype=torch.float32
) -> tuple[int, float]:
    """The best tile size and its predicted time in seconds per ``4 * D`` FLOPs per pair, i.e.
    ``sum(pairs computed / rate)`` (relative between plans; ``* 4 * D / 1e9`` gives seconds
    per key/value head)."""
    tuning = _tuning.current(dtype)
    return _TILE_CHOICES.get(
        (pattern, n, s, direction, tuning), lambda: _price_tiles(pattern, n, s, direction, tuning)
    )


def _price_tiles(
    pattern: Pattern, n: int, s: int, direction: str, tuning: _tuning.Tuning
) -> tuple[int, float]:
    costs = {}
    for b in _tuning.TILES:
        costs[b] = plan_cost(pattern, n, s, direction, tuning, b)
        if b >= max(n, s):  # one tile already covers everything: larger ones only add padding
            break
    best = min(costs, key=costs.get)
    return best, costs[best]


def plan_cost(pattern: Pattern, n: int, s: int, direction: str, tuning: _tuning.Tuning, b: int) -> float:
    """Predicted cost of ``pattern`` at tile ``b``: band and gathered tiles priced with the
    machine's rates (seconds per ``4 * D`` FLOPs per pair, as :func:`block_and_cost`)."""
    rates = tuning.kernel_rates[direction]
    pieces = _pieces(pattern.block_map(n, s, b), b, s, tuning.gather_cost(b))
    band = sum(rows.numel() * cols.shape[1] for rows, cols, strided in pieces if strided)
    gathered = sum(rows.numel() * cols.shape[1] for rows, cols, strided in pieces if not strided)
    return b * b * (band / rates["band"][b] + tuning.gather_copy * gathered / rates["gather"][b])


def sparse_plan(pattern: Pattern, n: int, s: int, block: int, dtype=torch.float32) -> SparsePlan:
    """The (cached) plan for ``pattern`` on an ``(n, s)`` matrix with ``block x block`` tiles,
    its band chosen with the gather cost measured for ``dtype``."""
    gather_cost = _tuning.current(dtype).gather_cost(block)
    return _PLANS.get((pattern, n, s, block, gather_cost), lambda: _build(pattern, n, s, block, gather_cost))


def _choose_band(
    rows: Tensor, cols: Tensor, nqb: int, nkb: int, gather_cost: float
) -> tuple[int, int] | None:
    """Diagonal range ``[lo, hi]`` maximizing ``sum(gather_cost * occupancy - rows)``; None if < 0."""
    occupancy = torch.bincount(cols - rows + (nqb - 1), minlength=nqb + nkb - 1).double()
    gain = gather_cost * occupancy - nqb
    best, best_range, run, start = 0.0, None, 0.0, 0
    for d, g in enumerate(gain.tolist()):  # Kadane's maximum-sum subarray
        if run <= 0:
            run, start = g, d
        else:
            run += g
        if run > best:
            best, best_range = run, (start, d)
    if best_range is None:
        return None
    return best_range[0] - (nqb - 1), best_range[1] - (nqb - 1)


def _buckets(counts: Tensor) -> list[Tensor]:
    """Group the rows with ``counts > 0`` so that no row pads its bucket by more than the slack."""
    rows = counts.nonzero().flatten()
    if rows.numel() == 0:
        return []
    order = rows[torch.argsort(counts[rows], stable=True)]
    groups, current, low = [], [], None
    for r, c in zip(order.tolist(), counts[order].tolist(), strict=True):
        if current and c > BUCKET_SLACK * low:
            groups.append(torch.tensor(sorted(current)))
            current = []
        if not current:
            low = c
        current.append(r)
    groups.append(torch.tensor(sorted(current)))
    return groups


def _build(pattern: Pattern, n: int, s: int, b: int, gather_cost: float) -> SparsePlan:
    bm = pattern.block_map(n, s, b)
    states = bm.states
    nqb, nkb = states.shape
    pieces = _pieces(bm, b, s, gather_cost)
    segments = tuple(_segment(pattern, states, n, s, b, rows, cols, band_) for rows, cols, band_ in pieces)
    return SparsePlan(
        n=n,
        s=s,
        block=b,
        num_q_tiles=nqb,
        num_k_tiles=nkb,
        segments=segments,
        visited_tiles=sum(seg.rows.numel() * seg.length for seg in segments),
        nonempty_tiles=int((states != EMPTY).sum()),
    )


def _pieces(bm, b: int, s: int, gather_cost: float) -> list[tuple[Tensor, Tensor, bool]]:
    """How a block map's non-empty tiles are covered: ``(rows, cols, strided)`` per segment."""
    states = bm.states
    nqb, nkb = states.shape
    nonempty = states != EMPTY
    r_idx, c_idx = nonempty.nonzero(as_tuple=True)
    covered = torch.zeros_like(nonempty)
    pieces: list[tuple[Tensor, Tensor, bool]] = []  # (rows, cols in real tile units, band)

    band = _choose_band(r_idx, c_idx, nqb, nkb, gather_cost) if r_idx.numel() else None
    if band is not None:
        lo, hi = band
        offsets = torch.arange(lo, hi + 1)
        cols = torch.arange(nqb)[:, None] + offsets  # (nqb, L), may leave [0, nkb)
        inside = (cols >= 0) & (cols < nkb)
        hits = inside & nonempty[torch.arange(nqb)[:, None], cols.clamp(0, nkb - 1)]
        used = hits.any(1).nonzero().flatten()
        first, last = int(used[0]), int(used[-1])
        keep = inside[first : last + 1]
        rows = torch.arange(first, last + 1)
        cols = cols[first : last + 1]
        covered[rows[:, None].expand_as(cols)[keep], cols[keep]] = True
        # Rows whose whole range holds real keys read a strided view of K; the ends gather.
        whole = (cols[:, 0] >= 0) & ((cols[:, -1] + 1) * b <= s)
        for run, strided in runs(whole):
            pieces.append((rows[run], cols[run], strided))

    extra = nonempty & ~covered
    for rows in _buckets(extra.sum(1)):
        width = int(extra[rows].sum(1).max())
        cols = torch.full((rows.numel(), width), -1, dtype=torch.int64)  # -1: a padding tile
        for i, r in enumerate(rows.tolist()):
            c = extra[r].nonzero().flatten()
            cols[i, : c.numel()] = c
        pieces.append((rows, cols, False))
    return pieces


def runs(values: Tensor | list) -> list[tuple[slice, object]]:
    """Maximal runs of equal values in a 1-D tensor or list, as ``(slice, value)``."""
    values = values.tolist() if isinstance(values, Tensor) else values
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((slice(start, i), values[start]))
            start = i
    return out


def _segment(
    pattern: Pattern, states: Tensor, n: int, s: int, b: int, rows: Tensor, cols: Tensor, band: bool
) -> Segment:
    """Element masks and index maps of one segment (``cols`` in real tile units, -1 = padding)."""
    nkb = states.shape[1]
    R, L = cols.shape
    real = (cols >= 0) & (cols < nkb)
    tile_state = torch.where(real, states[rows[:, None], cols.clamp(0, nkb - 1)], EMPTY)
    q_pos = rows[:, None] * b + torch.arange(b)  # (R, b)
    k_pos = (cols[:, :, None] * b + torch.arange(b)).reshape(R, L * b)  # (R, L*b)
    k_valid = (real[:, :, None].expand(R, L, b).reshape(R, L * b)) & (k_pos < s) & (k_pos >= 0)
    valid = (q_pos < n)[:, :, None] & k_valid[:, None, :]  # (R, b, L*b)

    full = (tile_state == FULL)[:, None, :, None].expand(R, b, L, b).reshape(R, b, L * b)
    allowed = full & valid
    batch = pattern.batch_size
    if batch is not None:
        allowed = allowed.expand(batch, R, b, L * b).clone()
    partial = (tile_state == PARTIAL).nonzero()  # (T, 2): (row i, tile t)
    if partial.numel():
        masks, _ = pattern.tile_masks(n, s, (b, b), rows[partial[:, 0]], cols[partial[:, 0], partial[:, 1]])
        view = allowed.view(*allowed.shape[:-1], L, b)  # (..., R, b, L, b)
        if batch is None:
            view[partial[:, 0], :, partial[:, 1], :] = masks
        else:
            view[:, partial[:, 0], :, partial[:, 1], :] = masks.transpose(0, 1)
    if not band:  # keys no query of the segment sees (a global column's other tile positions,
        # padding) are dropped: gathered keys are copied per row anyway, so fewer cost less
        used = allowed.reshape(-1, L * b).any(0)
        if not bool(used.all()):
            used[int(used.float().argmax())] = True  # at least one key, even for an empty segment
            allowed, k_pos = allowed[..., used].contiguous(), k_pos[:, used]
    K = k_pos.shape[1]
    ref = R // 2
    flat = allowed.reshape(-1, R, b * K) if batch is not None else allowed.reshape(1, R, -1)
    same = (flat == flat[:, ref : ref + 1]).all(-1).all(0)
    seen = allowed.reshape(-1, R, b, K).any(-2).any(0)  # (R, K): keys some query sees
    key_pos = k_pos.clamp(0, s - 1)
    key_lo = torch.where(seen, key_pos, s).amin(-1)
    key_hi = torch.where(seen, key_pos, -1).amax(-1)
    return Segment(
        rows=rows,
        cols=cols,
        band=band,
        allowed=allowed,
        query_index=q_pos.clamp(max=n - 1),
        key_index=k_pos.clamp(0, s - 1),
        same=same,
        ref=ref,
        key_lo=key_lo,
        key_hi=key_hi,
    )
