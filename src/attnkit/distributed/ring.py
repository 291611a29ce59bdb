"""Ring attention in pieces (``method="ring"``).

Every rank keeps its queries and walks its own keys, then every other rank's, in pieces of at
most a twentieth of a shard whose transfers overlap the compute (:func:`_walk`); each (query
run, piece) pair is an ordinary attention call on the pattern's rectangle, merged through
log-sum-exps, and the backward sends each piece's key/value gradient back to its owner. Only
the keys a rank's queries see travel (:class:`_Link`, from the cropped block maps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import backends, caches, functional
from ..backends import _rows
from ..backends.base import compute_dtype
from ..patterns import EMPTY, FULL, Pattern, crop
from .layouts import BalancedLayout, Ranges, _offsets
from .transport import _GRADIENT_TAGS, _Exchanges, _Group


# --------------------------------------------------------------------------- plan and choice
@dataclass(frozen=True, eq=False)
class _Plan:
    """What every rank agrees on for one call."""

    g: _Group
    pattern: Pattern
    N: int
    S: int
    q_ranges: Ranges
    k_ranges: Ranges
    layout: str | BalancedLayout

    def link(self, a: int, b: int) -> _Link | None:
        """The keys of rank ``b`` that rank ``a``'s queries see, or None if none."""
        return _links(self.pattern, self.N, self.S, self.q_ranges, self.k_ranges)[a][b]

    @property
    def tile(self) -> int:
        """Tokens per transfer and query rows per tile of the ring: a twentieth of the largest
        shard rounded up to a multiple of 64 (at least :data:`_MIN_TILE`), so what a rank holds
        besides its own shard's tensors shrinks with the shard."""
        largest = max(sum(b - a for a, b in runs) for runs in (*self.q_ranges, *self.k_ranges))
        tile = -(-largest // _TILES_PER_SHARD)
        return max(_MIN_TILE, tile if tile <= 64 else -(-tile // 64) * 64)


#: The ring cuts every shard into about this many tiles (see :attr:`_Plan.tile`) ...
_TILES_PER_SHARD = 20


#: ... of at least this many tokens, so that short sequences run as one tile per shard.
_MIN_TILE = 128


@dataclass(frozen=True)
class _Link:
    """What rank ``a`` receives from rank ``b``: per key run ``j`` of ``b`` that ``a`` needs,
    the whole-sequence key interval ``[lo, hi)`` its queries see there (exact: the first and
    last key any of them sees) and where it sits in the message; and which (query run, key run)
    pairs have work, with the rows of the query run that see any of those keys (so a window's
    pair of neighbouring shards computes a window's rows, not the shard's)."""

    runs: tuple[tuple[int, int, int, int], ...]  # (j, lo, hi, offset in the message)
    pairs: tuple[tuple[int, int, int, int], ...]  # (query run i of a, index into runs, rows lo, hi)
    tokens: int

    def slices(self, k_ranges_b) -> list[tuple[slice, slice]]:
        """``(slice of b's local keys, slice of the message)`` per run."""
        offsets = _offsets(k_ranges_b)
        return [
            (
                slice(offsets[j] + lo - k_ranges_b[j][0], offsets[j] + hi - k_ranges_b[j][0]),
                slice(m, m + hi - lo),
            )
            for j, lo, hi, m in self.runs
        ]


def _links(pattern: Pattern, n: int, s: int, q_ranges: Ranges, k_ranges: Ranges) -> tuple:
    key = (pattern, n, s, q_ranges, k_ranges)
    return _LINKS.get(key, lambda: _build_links(pattern, n, s, q_ranges, k_ranges))


def _build_links(pattern: Pattern, n: int, s: int, q_ranges: Ranges, k_ranges: Ranges) -> tuple:
    """``[a][b]`` -> :class:`_Link` or None, from the cropped block maps of every (query run,
    key run) pair (structural: no ``N x S`` evaluation) and the element masks of the first and
    last live key tiles (so the interval is exact, not rounded to tiles)."""
    table = []
    for qa in q_ranges:
        row = []
        for kb in k_ranges:
            runs, pairs, tokens = [], [], 0
            for j, kr in enumerate(kb):
                spans = [_spans(pattern, n, s, qr, kr) for qr in qa]
                live = [i for i, sp in enumerate(spans) if sp is not None]
                if not live:
                    continue
                lo, hi = min(spans[i][1][0] for i in live), max(spans[i][1][1] for i in live)
                pairs.extend((i, len(runs), *spans[i][0]) for i in live)
                runs.append((j, lo, hi, tokens))
                tokens += hi - lo
            row.append(_Link(tuple(runs), tuple(pairs), tokens) if runs else None)
        table.append(tuple(row))
    return tuple(table)


def _spans(pattern: Pattern, n: int, s: int, qr: tuple[int, int], kr: tuple[int, int]):
    """``((row lo, row hi), (key lo, key hi))``: the smallest query and key intervals
    (whole-sequence indices) holding every pair of ``qr x kr`` that the pattern allows, or
    None when it allows none. From the cropped block map, refined by the element masks of the
    first and last live tile rows and columns."""
    part = crop(pattern, n, s, qr, kr)
    h, w = qr[1] - qr[0], kr[1] - kr[0]
    block = (min(h, 64), min(w, 64))
    live = part.block_map(h, w, block).states != EMPTY
    if not bool(live.any()):
        return None

    def seen(axis: int, line: int) -> Tensor:
        """Which elements of tile row (axis 0) or column (axis 1) ``line`` see/are seen."""
        other = (live[line] if axis == 0 else live[:, line]).nonzero().flatten()
        fixed = torch.full_like(other, line)
        rows, cols = (fixed, other) if axis == 0 else (other, fixed)
        masks, _ = part.tile_masks(h, w, block, rows, cols)
        return masks.reshape(-1, block[0], block[1]).any(0).any(1 - axis)

    def span(axis: int) -> tuple[int, int]:
        lines = live.any(1 - axis).nonzero().flatten().tolist()
        size = block[axis]
        # block maps are exact, so the first and last live lines hold allowed pairs; should a
        # pattern call an empty tile PARTIAL, the scan moves on to the next live line
        first = next(x * size + int(m.nonzero()[0]) for x in lines if (m := seen(axis, x)).any())
        last = next(x * size + int(m.nonzero()[-1]) for x in reversed(lines) if (m := seen(axis, x)).any())
        return first, last + 1

    (r0, r1), (c0, c1) = span(0), span(1)
    return (qr[0] + r0, qr[0] + r1), (kr[0] + c0, kr[0] + c1)


#: Who sends what to whom, per (pattern, N, S, layout ranges); the layouts BalancedLayout chose.
_LINKS = caches.register("context_parallel_links", 16 * caches.MiB)


def _mask_piece(mask: Tensor | None, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor | None:
    if mask is None:
        return None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if m.shape[2] > 1:
        m = m[:, :, rows[0] : rows[1]]
    if m.shape[3] > 1:
        m = m[:, :, :, cols[0] : cols[1]]
    return m


@dataclass(frozen=True)
class _Piece:
    """One transfer of the ring: the keys ``[lo, hi)`` (whole-sequence indices) of run ``r`` of
    a link, at ``local`` in their owner's shard; at most ``plan.tile`` tokens."""

    r: int
    lo: int
    hi: int
    local: slice


def _pieces(plan: _Plan, a: int, b: int) -> list[_Piece]:
    """What rank ``a`` receives from rank ``b`` (the keys its queries see), cut into pieces of
    at most ``plan.tile`` tokens, in the order both ranks walk them. A rank's own keys travel
    nowhere: they stay one piece per run (:func:`_tiles` cuts them where the work needs it)."""
    link = plan.link(a, b)
    if link is None:
        return []
    out, c = [], plan.tile if a != b else plan.S
    slices = link.slices(plan.k_ranges[b])
    for r, ((_, lo, hi, _), (local, _)) in enumerate(zip(link.runs, slices, strict=True)):
        for x in range(lo, hi, c):
            y = min(x + c, hi)
            out.append(_Piece(r, x, y, slice(local.start + x - lo, local.start + y - lo)))
    return out


@dataclass(frozen=True)
class _Position:
    """One position of the ring's walk: this rank computes against ``recv`` (a piece of rank
    ``src``'s keys, or None) while it sends rank ``dst`` the piece ``send`` of its own (or
    None). Step 0 is this rank's own keys (``src == dst ==`` this rank, nothing sent)."""

    step: int
    index: int
    src: int
    recv: _Piece | None
    dst: int
    send: _Piece | None

    @property
    def tag(self) -> int:  # the same on both ends of every transfer: (step, index)
        return self.step * _TAGS_PER_STEP + self.index


#: Positions whose transfers are in flight while one is computed. Three, tried on 2 and 4
#: CPU ranks (causal, N = 32,768), were no faster and held more memory than one.
_AHEAD = 1


#: Tags of one step's transfers; a step holds fewer pieces than this (asserted).
_TAGS_PER_STEP = 1 << 12


def _schedule(plan: _Plan) -> list[_Position]:
    """Every position this rank walks: its own pieces, then per step ``t`` the pieces it
    receives from rank ``me - t`` and those it sends rank ``me + t``, each spread over the
    step's ``M`` positions (``M``: the most pieces any rank sends or receives in that step)
    in proportion to the work its receiver does on them (:func:`_spread`).

    A transfer sits at the same ``(step, index)`` on both of its ranks, so every rank posting
    one position ahead of the one it waits on cannot deadlock; and since every rank's pieces
    are spread by work, neighbours reach a position at about the same time, even where one
    rank's queries see few pieces of many rows and the other's many pieces of few rows."""
    me, P = plan.g.rank, plan.g.size
    walk = [_Position(0, x, me, p, me, None) for x, p in enumerate(_pieces(plan, me, me))]
    for step in range(1, P):
        slots = max(
            max(len(_pieces(plan, r, (r - step) % P)), len(_pieces(plan, (r + step) % P, r)))
            for r in range(P)
        )
        if slots >= _TAGS_PER_STEP:
            raise RuntimeError(
                f"context parallel ring: {slots} pieces in one step, more than the "
                f"{_TAGS_PER_STEP - 1} its tags allow"
            )
        src, dst = (me - step) % P, (me + step) % P
        got = dict(zip(_spread(_work(plan, me, src), slots), _pieces(plan, me, src), strict=True))
        given = dict(zip(_spread(_work(plan, dst, me), slots), _pieces(plan, dst, me), strict=True))
        walk += [
            _Position(step, x, src, got.get(x), dst, given.get(x)) for x in sorted(got.keys() | given.keys())
        ]
    return walk


def _work(plan: _Plan, a: int, b: int) -> list[int]:
    """Per piece that rank ``a`` receives from rank ``b``: the tiles ``a`` computes on it."""
    link, c = plan.link(a, b), plan.tile
    if link is None:
        return []
    columns: dict[int, Tensor] = {}  # run -> live tiles per key tile
    for _, r, row_lo, row_hi in link.pairs:
        _, lo, hi, _ = link.runs[r]
        live = _live_tiles(plan.pattern, plan.N, plan.S, (row_lo, row_hi), (lo, hi), c).sum(0)
        columns[r] = live if r not in columns else columns[r] + live
    return [int(columns[p.r][(p.lo - link.runs[p.r][1]) // c]) for p in _pieces(plan, a, b)]


def _spread(work: list[int], slots: int) -> list[int]:
    """Increasing, distinct positions in ``[0, slots)`` for pieces of the given work: piece
    ``j`` at the share of the slots that the work before it takes of the whole."""
    total, done, prev, out = max(1, sum(work)), 0, -1, []
    for j, w in enumerate(work):
        prev = min(max(prev + 1, done * slots // total), slots - (len(work) - j))
        out.append(prev)
        done += w
    return out


def _walk(plan: _Plan, k: Tensor, v: Tensor, ex: _Exchanges):
    """Yield ``(position, (keys, values) or None)`` along :func:`_schedule`. The next
    :data:`_AHEAD` positions' transfers are in flight while the caller computes this one's, so
    a rank holds a few pieces received and sent, whatever the sequence length."""
    walk = _schedule(plan)
    D = k.shape[-1]

    def post(pos: _Position) -> list[int]:
        if pos.step == 0:
            return []
        recv = send = None
        if pos.recv is not None:
            shape = (*k.shape[:2], pos.recv.hi - pos.recv.lo, D + v.shape[-1])
            recv = (pos.src, torch.empty(shape, dtype=k.dtype, device=k.device))
        if pos.send is not None:
            at = pos.send.local
            send = (pos.dst, torch.cat([k[:, :, at], v[:, :, at]], -1))
        return ex.post(send, recv, pos.tag)

    posted = [post(pos) for pos in walk[:_AHEAD]]
    for i, pos in enumerate(walk):
        if i + _AHEAD < len(walk):
            posted.append(post(walk[i + _AHEAD]))
        got = ex.collect(posted.pop(0))
        if pos.recv is None:
            yield pos, None
        elif pos.step == 0:
            yield pos, (k[:, :, pos.recv.local], v[:, :, pos.recv.local])
        else:
            yield pos, (got[..., :D], got[..., D:])


def _live_tiles(
    pattern: Pattern, n: int, s: int, rows: tuple[int, int], keys: tuple[int, int], c: int
) -> Tensor:
    """``(row tiles, key tiles)`` bool: which ``c x c`` tiles of ``rows x keys`` (counted from
    their starts) hold a pair the pattern allows; from the cropped block map, exact."""
    return _tile_states(pattern, n, s, rows, keys, c) != EMPTY


def _tile_states(
    pattern: Pattern, n: int, s: int, rows: tuple[int, int], keys: tuple[int, int], c: int
) -> Tensor:
    """``(row tiles, key tiles)`` block-map states (``EMPTY``/``PARTIAL``/``FULL``) of the
    ``c x c`` tiles of ``rows x keys``."""
    h, w = rows[1] - rows[0], keys[1] - keys[0]
    return crop(pattern, n, s, rows, keys).block_map(h, w, (min(h, c), min(w, c))).states


#: Whole tiles (every pair allowed) of one key column run as one call of up to this many tiles'
#: rows: a fused call's temporaries are a few tiles' rows, and calls on a piece's keys are
#: fewer. Tiles holding only some pairs run one at a time (a causal diagonal tile stays causal).
_FULL_TILES_PER_CALL = 2


def _tiles(plan: _Plan, mask, scale: float, q: Tensor, pos: _Position, kv: tuple[Tensor, Tensor]):
    """``(query slice, key slice of the piece, AttentionInputs)`` of the work against
    the piece ``pos.recv``, whose keys/values are ``kv``. Per (query run, piece) pair: one call
    where its backend adds gradients in place (``Backend.partial_in_place``: its memory is the
    tiles it computes, not the piece); otherwise tiles of at most ``plan.tile`` rows and keys
    that hold work, so a dense or causal piece's temporaries stay a tile's."""
    me, c, piece = plan.g.rank, plan.tile, pos.recv
    link = plan.link(me, pos.src)
    _, lo, hi, _ = link.runs[piece.r]
    q_off = _offsets(plan.q_ranges[me])

    def inputs(i: int, rows: tuple[int, int], keys: tuple[int, int]):
        start = q_off[i] + rows[0] - plan.q_ranges[me][i][0]
        qs, ks = slice(start, start + rows[1] - rows[0]), slice(keys[0] - piece.lo, keys[1] - piece.lo)
        inp = functional.build_inputs(
            q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], scale=scale,
            pattern=crop(plan.pattern, plan.N, plan.S, rows, keys), mask=_mask_piece(mask, rows, keys),
        )  # fmt: skip
        return qs, ks, inp

    for i, r, row_lo, row_hi in link.pairs:
        if r != piece.r:
            continue
        whole = inputs(i, (row_lo, row_hi), (piece.lo, piece.hi))
        if backends.select_partial(whole[2]).partial_in_place(whole[2]):
            yield whole
            continue
        states = _tile_states(plan.pattern, plan.N, plan.S, (row_lo, row_hi), (lo, hi), c)
        first, last = (piece.lo - lo) // c, (piece.hi - 1 - lo) // c
        for column in range(first, last + 1):
            keys = (max(piece.lo, lo + column * c), min(piece.hi, lo + (column + 1) * c))
            for x0, x1 in _row_runs(states[:, column].tolist()):
                yield inputs(i, (row_lo + x0 * c, min(row_lo + x1 * c, row_hi)), keys)


def _row_runs(column: list[int]) -> list[tuple[int, int]]:
    """Row-tile ranges ``[x0, x1)`` to compute in one key column of tile states: consecutive
    ``FULL`` tiles in runs of at most :data:`_FULL_TILES_PER_CALL`, every other live tile
    alone, empty tiles not at all."""
    runs: list[tuple[int, int]] = []
    for x, state in enumerate(column):
        if state == EMPTY:
            continue
        if runs and state == FULL:
            x0, x1 = runs[-1]
            if x1 == x and column[x0] == FULL and x1 - x0 < _FULL_TILES_PER_CALL:
                runs[-1] = (x0, x + 1)
                continue
        runs.append((x, x + 1))
    return runs


class _Ring(torch.autograd.Function):
    """Ring attention in tiles: each rank walks its own keys and then every other rank's, piece
    by piece (:func:`_walk`), merging partial softmaxes through their log-sum-exps; the
    backward walks again and sends each piece's key/value gradient straight back to its owner.
    Besides its own shard's tensors, a rank holds a few tiles' worth of memory."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, mask, scale: float):
        B, H, n, _ = q.shape
        ct = compute_dtype(q.dtype)
        out = torch.zeros(B, H, n, v.shape[-1], dtype=ct, device=q.device)
        lse = torch.full((B, H, n), float("-inf"), dtype=ct, device=q.device)
        written = torch.zeros(n, dtype=torch.bool, device="cpu")  # host bookkeeping: rows written
        ex = _Exchanges(plan.g, "ring forward")
        for pos, kv in _walk(plan, k, v, ex):
            if kv is None:
                continue
            for qs, _, inp in _tiles(plan, mask, scale, q, pos, kv):
                o, s = backends.select_partial(inp).partial_forward(inp)
                if bool(written[qs].any()):
                    out[:, :, qs], lse[:, :, qs] = _rows.combine(out[:, :, qs], lse[:, :, qs], o, s)
                else:
                    out[:, :, qs], lse[:, :, qs] = o, s
                written[qs] = True
                del o, s  # before the next tile's call allocates its own
        ex.finish()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.mask, ctx.scale = plan, mask, scale
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        g, me, D = plan.g, plan.g.rank, k.shape[-1]
        ct = compute_dtype(q.dtype)
        dout = torch.zeros_like(out) if dout is None else dout  # sliced per tile: no copy
        dq = torch.zeros(q.shape, dtype=ct, device=q.device)
        dk = torch.zeros(k.shape, dtype=ct, device=q.device)
        dv = torch.zeros(v.shape, dtype=ct, device=q.device)
        ex = _Exchanges(g, "ring backward")
        grads = _Exchanges(g, "ring backward (dK/dV)", tag_base=_GRADIENT_TAGS)

        def fold(posted: tuple[list[int], _Piece | None]) -> None:
            """Wait for one position's gradient transfers; add what came back for ``piece``."""
            handles, piece = posted
            received = grads.collect(handles)
            if received is not None:
                dk[:, :, piece.local] += received[..., :D]
                dv[:, :, piece.local] += received[..., D:]

        # At most _AHEAD positions' gradient transfers in flight: the oldest is received and
        # added before another is posted, so a rank holds a few pieces' gradients, never P - 1.
        in_flight: list[tuple[list[int], _Piece | None]] = []
        for pos, kv in _walk(plan, k, v, ex):
            send = recv = None
            if kv is not None:
                piece = pos.recv
                # own keys take their gradient in place; another rank's go into a piece for it
                if pos.src == me:
                    dkv, dk_t, dv_t = None, dk[:, :, piece.local], dv[:, :, piece.local]
                else:
                    dkv = torch.zeros((*kv[0].shape[:3], D + v.shape[-1]), dtype=ct, device=q.device)
                    dk_t, dv_t = dkv[..., :D], dkv[..., D:]
                for qs, ks, inp in _tiles(plan, ctx.mask, ctx.scale, q, pos, kv):
                    dlse_t = None if dlse is None else dlse[:, :, qs]
                    backends.select_partial(inp).partial_backward(
                        inp, out[:, :, qs], lse[:, :, qs], dout[:, :, qs], dlse_t,
                        into=(dq[:, :, qs], dk_t[:, :, ks], dv_t[:, :, ks]),
                    )  # fmt: skip
                if dkv is not None:
                    send = (pos.src, dkv)
            if pos.send is not None:  # rank dst used this piece of this rank's keys here
                shape = (*k.shape[:2], pos.send.hi - pos.send.lo, D + v.shape[-1])
                recv = (pos.dst, torch.empty(shape, dtype=ct, device=q.device))
            if len(in_flight) == _AHEAD:
                fold(in_flight.pop(0))
            in_flight.append((grads.post(send=send, recv=recv, step=pos.tag), pos.send))
        ex.finish()
        for posted in in_flight:
            fold(posted)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None
