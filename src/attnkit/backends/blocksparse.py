"""The ``blocksparse`` backend: attention whose cost follows the pattern, not ``N x S``.

Algorithm. The pattern's tiles are covered by the segments of a :class:`SparsePlan`
(see ``_sparse_plan.py``): a diagonal *band* whose keys are a strided, copy-free view of
``K`` and ``V``, plus *gathered* buckets for everything off the band (and the band's ends). Each segment is
computed by batched attention calls -- torch's fused CPU flash kernel when available -- with
the pattern's element mask as an additive bias. Where a row is covered by several segments,
their partial results are merged exactly through their log-sum-exps. The backward recomputes
per segment from the final output and log-sum-exp (as ring attention does), adds ``dQ``, and
folds the overlapping ``dK``/``dV`` of the band back onto the keys; no ``N x S`` tensor is ever
formed. Forward and backward use different tile sizes (``block``, ``backward_block``): torch's
kernel is fastest on short query tiles forward and longer ones backward.

Supports: every pattern and composition, a boolean mask or float bias on top (gathered per
tile), GQA/MQA (the query heads of a group share the gathered keys), dropout (the
counter-based mask of ``reference``/``tiled``), fully masked rows (zeros), float16/bfloat16/
float32/float64, the log-sum-exp. Engines: torch's fused CPU kernel (CPU, ``D == Dv``, no
dropout, no gradient into a float bias) and an eager fallback for everything else.

Periodic patterns (``Strided``, ``Dilated``) on ``N = S`` divisible by the period are split:
their periodic offsets run on positions regrouped by residue, where they form dense classes
(``_residue.py``), the rest as usual; the two merge through their log-sum-exps.

Known limitations: a tile-level method, so a pattern whose allowed keys are scattered one per
tile (and not periodic, or with a user mask or dropout that prevents regrouping) visits whole
tiles for them. Rows with few keys (a ~100-key window) run torch's kernel on short calls, at a
fraction of its dense speed. A float bias with gradients, or dropout, runs on the eager engine
(slower). ``auto`` picks this backend on CPU when the cost model, priced with this machine's
measured kernel rates (``_tuning.py``), predicts it faster than SDPA with the pattern as a
mask; dense and causal attention stay on ``sdpa``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import caches
from .._timing import time_in_turns
from ..patterns import And, Causal, Full, KeyPadding, Pattern
from . import _rows
from . import _tuning as tuning
from ._dropout import keep_mask
from ._engines import Eager, FusedCPU, fused_cpu_available
from ._masks import reduce_to
from ._residue import regroup, residue_split, ungroup
from ._sparse_plan import Segment, SparsePlan, block_and_cost, plan_cost, runs, sparse_plan
from ._tuning import TILES
from .base import AttentionInputs, AttentionResult, Backend, add_into, compute_dtype, lse_dtype

__all__ = ["BlockSparseBackend"]


class BlockSparseBackend(Backend):
    name = "blocksparse"
    supports_dropout = True
    supports_lse = True
    supports_partial = True

    #: Tile size of the forward and of the backward; ``None`` lets the cost model pick it per
    #: pattern and dtype from this machine's kernel rates (``_sparse_plan.choose_block``,
    #: ``_tuning.py``).
    block: int | None = None
    backward_block: int | None = None
    #: Memory one batched call may use for gathered keys, biases and gradients.
    chunk_bytes = 64 * 2**20
    #: For a piece of a larger softmax (``partial_*``, the context-parallel ring), whose caller
    #: bounds its memory by the piece: a quarter of the piece's query bytes, at least this.
    piece_chunk_min = 2 * 2**20

    @classmethod
    def auto_reasons(cls, inp: AttentionInputs) -> list[str]:
        p = inp.pattern
        if p is None or isinstance(p, (Full, Causal, KeyPadding)):
            return [f"pattern {p!r} runs natively on sdpa"]
        if inp.device.type != "cpu":  # its rates and its fused engine are CPU's
            return [f"device={inp.device.type}: blocksparse is measured and fused on CPU only"]
        smallest = min(TILES)
        if min(inp.N, inp.S) <= smallest:  # decoding steps, tiny inputs: no tile to skip
            return [f"N={inp.N}, S={inp.S}: a single tile of {smallest}, nothing to skip"]
        static, lengths = split_key_lengths(p)
        splittable = _splittable(inp) and lengths is None
        cost = cls._pieces_of(static, inp.N, inp.S, splittable, inp.dtype)[1]
        dense = inp.N * inp.S / tuning.current(inp.dtype).sdpa_mask_rate
        if cost >= dense:
            return [
                f"pattern {p!r} is too dense: predicted {dense / cost:.2f}x the speed of sdpa with its mask"
            ]
        return []

    @classmethod
    def forward(cls, inp: AttentionInputs) -> AttentionResult:
        job, parts = cls._job(inp, backward=inp.requires_grad)
        bias = inp.bias if inp.bias is not None else torch.empty(0, device=inp.device)
        out, lse = _BlockSparseAttention.apply(inp.q, inp.k, inp.v, bias, job, parts)
        return AttentionResult(out, None, lse if inp.return_lse else None)

    @classmethod
    def partial_forward(cls, inp: AttentionInputs) -> tuple[Tensor, Tensor]:
        """See :meth:`Backend.partial_forward`; whole dense or causal pieces run as one fused
        call."""
        job, parts = cls._job(inp, backward=True, whole_ok=True)
        with torch.no_grad():
            if job.whole is not None:
                return _whole_forward(job)
            return _run_forward(job, parts, inp.q, inp.k, inp.v, inp.bias)

    @classmethod
    def partial_backward(cls, inp: AttentionInputs, out, lse, dout, dlse=None, *, into=None):
        """See :meth:`Backend.partial_backward`; tiled pieces accumulate straight into ``into``
        where its layout allows (:meth:`partial_in_place`)."""
        job, parts = cls._job(inp, backward=True, whole_ok=True, lse_grad=dlse is not None)
        with torch.no_grad():
            if job.whole is not None:
                return add_into(into, _whole_backward(job, out.to(inp.dtype), lse, dout))
            grads = _run_backward(
                job, parts, inp.q, inp.k, inp.v, dout, out.to(inp.dtype), lse, dlse, inp.bias,
                False, into,
            )  # fmt: skip
        return into if into is not None else (grads[0], grads[1], grads[2])

    @classmethod
    def partial_in_place(cls, inp: AttentionInputs) -> bool:
        """Pieces that run in tiles (not as one fused dense/causal call), one query per key head
        and no regrouped periodic parts accumulate in place."""
        if inp.G != 1:
            return False
        job, parts = cls._job(inp, backward=True, whole_ok=True)
        return job.whole is None and all(p.stride is None for p in parts)

    @classmethod
    def _job(
        cls, inp: AttentionInputs, backward: bool, whole_ok: bool = False, lse_grad: bool = False
    ) -> tuple[_Job, tuple[_Part, ...]]:
        """The call's job and plans; with ``whole_ok``, a piece that :func:`_whole_kind` runs
        as one fused call gets ``job.whole`` set and no plans. ``lse_grad``: a gradient flows
        into the log-sum-exp, which torch's fused backward cannot take (the eager engine runs)."""
        fused = (
            not lse_grad
            and inp.device.type == "cpu"
            and inp.Dv == inp.D  # torch's CPU kernel needs one head size for q, k and v
            and inp.dropout_p == 0
            and not (inp.bias is not None and inp.bias.requires_grad and torch.is_grad_enabled())
            and fused_cpu_available()
        )
        pattern, lengths = split_key_lengths(inp.pattern if inp.pattern is not None else Full())
        key_lengths = None if lengths is None else torch.tensor(lengths, device=inp.device)
        chunk = cls.chunk_bytes
        if whole_ok:  # a piece of a larger softmax: workspace in proportion to the piece
            chunk = min(chunk, max(cls.piece_chunk_min, inp.q.numel() * inp.q.element_size() // 4))
        job = _Job(inp=inp, fused=fused, chunk_bytes=chunk, key_lengths=key_lengths)
        if whole_ok and (whole := _whole_kind(job)) is not None:
            return dataclasses.replace(job, whole=whole), ()  # one fused call, no tiles to plan
        measure = None
        if fused and not whole_ok and tuning.enabled():  # a whole call, timed on its own inputs
            measure = _TileTimer(job, backward=backward)
        parts = cls.plan(
            pattern,
            inp.N,
            inp.S,
            splittable=_splittable(inp) and lengths is None,
            backward=fused and backward,
            dtype=inp.dtype,
            measure=measure,
        )
        return job, parts

    @classmethod
    def plan(
        cls,
        pattern,
        n: int,
        s: int,
        *,
        splittable: bool = True,
        backward: bool = False,
        dtype: torch.dtype = torch.float32,
        measure: _TileTimer | None = None,
    ) -> tuple[_Part, ...]:
        """The parts a call computes: per pattern piece, its forward plan and (with
        ``backward``, for the fused kernel's own tile size) its backward plan. ``splittable``:
        the call has no mask, bias or dropout, so periodic patterns may be regrouped. Tiles are
        chosen for ``dtype`` on this machine: by the cost model, and, with ``measure``, among
        the tiles it prices close to the best, by timing them on the call's own inputs."""
        parts = []
        for piece, stride in cls._pieces_of(pattern, n, s, splittable, dtype)[0]:
            fb = cls.block or _tile(piece, n, s, "forward", dtype, stride, measure)
            fplan = bplan = sparse_plan(piece, n, s, fb, dtype)
            if backward:
                bb = cls.backward_block or _tile(piece, n, s, "backward", dtype, stride, measure)
                bplan = sparse_plan(piece, n, s, bb, dtype)
            parts.append(_Part(fplan, bplan, stride))
        return tuple(parts)

    @classmethod
    def _pieces_of(
        cls, pattern, n: int, s: int, splittable: bool, dtype=torch.float32
    ) -> tuple[list[tuple], float]:
        """``([(pattern, regroup stride or None)], predicted forward cost)``. A periodic pattern
        splits in two when the regrouped computation is predicted to cost under 80% of plain
        tiles: the margin pays for regrouping ``q``, ``k``, ``v`` and the output, which the
        tile prices do not include."""
        whole = block_and_cost(pattern, n, s, "forward", dtype)[1]
        if splittable:
            split = residue_split(pattern, n, s)
            if split is not None:
                rest, regrouped, stride = split
                pieces = [(rest, None), (regrouped, stride)]
                if rest.num_allowed(n, s) == 0:
                    pieces = pieces[1:]
                cost = sum(block_and_cost(p, n, s, "forward", dtype)[1] for p, _ in pieces)
                if cost < 0.8 * whole:
                    return pieces, cost
        return [(pattern, None)], whole


#: Tiles priced within this factor of the cost model's best are timed on the call's inputs.
MEASURE_WITHIN = 1.5
#: Calls the cost model predicts to take at least this long (seconds) are worth timing: a
#: rule about amortizing one measurement, not a speed of this machine (the prediction is).
MEASURE_ABOVE_S = 0.05
#: The tile measured fastest per (piece, N, S, stride, direction, dtype, B, H, Hkv, D, Dv).
_MEASURED = caches.register("measured_tiles", caches.MiB, size=lambda _: 128)


def _tile(piece, n: int, s: int, direction: str, dtype, stride, measure: _TileTimer | None) -> int:
    """The cost model's tile for ``piece``, or, when ``measure`` may time the call and several
    tiles are priced near the best, the one of those that runs fastest on these inputs."""
    best, cost = block_and_cost(piece, n, s, direction, dtype)
    if measure is None:
        return best
    return measure.choose(piece, n, s, direction, dtype, stride, best, cost)


class _TileTimer:
    """Times the candidate tiles of a call's pieces on the call's own ``q``, ``k``, ``v`` (the
    backward with the forward's output and a random output gradient), with attnkit's timing
    policy, once per shape; see :func:`_tile`."""

    def __init__(self, job: _Job, backward: bool) -> None:
        self.job, self.backward = job, backward

    def choose(self, piece, n: int, s: int, direction: str, dtype, stride, best: int, cost: float) -> int:
        inp = self.job.inp
        rate_scale = 4 * inp.D * inp.B * inp.Hkv * max(inp.G, 1) / 1e9  # predicted cost -> seconds
        if cost * rate_scale < MEASURE_ABOVE_S:
            return best
        key = (piece, n, s, stride, direction, dtype, inp.B, inp.H, inp.Hkv, inp.D, inp.Dv, inp.device.type)
        return _MEASURED.get(key, lambda: self._fastest(piece, n, s, direction, dtype, stride, best))

    def _fastest(self, piece, n: int, s: int, direction: str, dtype, stride, best: int) -> int:
        priced = {b: _price(piece, n, s, direction, dtype, b) for b in TILES if b < 2 * max(n, s)}
        tiles = [b for b, c in priced.items() if c <= MEASURE_WITHIN * priced[best]]
        if len(tiles) < 2:
            return best
        inp, job = self.job.inp, self.job
        args = (inp.q, inp.k, inp.v)
        if stride is not None:
            args = tuple(regroup(t, stride) for t in args)
        plans = {b: sparse_plan(piece, n, s, b, dtype) for b in tiles}
        with torch.no_grad():
            if direction == "forward":
                calls = {b: (lambda p=p: _forward_plan(job, p, *args, inp.bias)) for b, p in plans.items()}
            else:
                out, lse = _forward_plan(job, plans[tiles[0]], *args, inp.bias)
                out = out.to(inp.dtype)
                dout = torch.randn_like(out)
                calls = {
                    b: (lambda p=p: _backward_plan(job, p, *args, dout, out, lse, inp.bias, False))
                    for b, p in plans.items()
                }
            timed = time_in_turns(calls, repeats=3)
        return min(timed, key=lambda b: timed[b].best)


def _price(piece, n: int, s: int, direction: str, dtype, block: int) -> float:
    """The cost model's predicted cost of ``piece`` at tile ``block`` (same units as
    :func:`block_and_cost`)."""
    return plan_cost(piece, n, s, direction, tuning.current(dtype), block)


def split_key_lengths(pattern: Pattern) -> tuple[Pattern, tuple[int, ...] | None]:
    """``(batch-independent pattern, key lengths)`` when ``pattern`` is ``KeyPadding`` or an
    ``And`` with exactly one ``KeyPadding`` part, else ``(pattern, None)``.

    The plan is built (and cached) for the first alone; the lengths are applied at call time,
    so a padded batch with new lengths reuses the plan of every other batch.
    """
    if isinstance(pattern, KeyPadding):
        return Full(), pattern.lengths
    if isinstance(pattern, And):
        pads = [p for p in pattern.parts if isinstance(p, KeyPadding)]
        if len(pads) == 1:
            rest = [p for p in pattern.parts if p is not pads[0]]
            static = rest[0] if len(rest) == 1 else And(*rest)
            if static.batch_size is None:
                return static, pads[0].lengths
    return pattern, None


def _whole_kind(job: _Job) -> str | None:
    """``"full"`` when a piece's pattern allows every pair, ``"causal"`` when it is exactly
    top-left causal on a square with one query head per key head; such a piece runs as one
    call of the fused kernel (torch's own dense/causal speed) instead of tiles. None otherwise,
    or with masks, key lengths or off the fused engine."""
    inp, p = job.inp, job.inp.pattern
    if not job.fused or inp.mask is not None or inp.bias is not None or job.key_lengths is not None:
        return None
    if p is None or isinstance(p, Full):
        return "full"
    if not p.is_toeplitz or p.batch_size is not None:
        return None
    t = torch.arange(-(inp.S - 1), inp.N)
    allowed = p._offset_rule(t, inp.N, inp.S)
    if bool(allowed.all()):
        return "full"
    if inp.G == 1 and inp.N == inp.S and torch.equal(allowed, t >= 0):
        return "causal"
    return None


def _whole_rows(x: Tensor, job: _Job) -> Tensor:
    """``(B, H, N, E)`` -> ``(B, Hkv, G * N, E)``: a group's query heads stacked as rows, so
    they share their key head without copying it. With one query head per key head, ``x``
    itself, strides and all (the fused kernel reads any strides, so a ring's slice of a shard's
    rows is not copied); otherwise a view of contiguous rows."""
    if job.inp.G == 1:
        return x
    B, _, N, E = x.shape
    return x.contiguous().reshape(B, job.inp.Hkv, job.inp.G * N, E)


def _whole_forward(job: _Job) -> tuple[Tensor, Tensor]:
    inp = job.inp
    ct = compute_dtype(inp.dtype)
    q = _whole_rows(inp.q, job)
    out, lse = FusedCPU.forward(q, inp.k, inp.v, None, inp.scale, causal=job.whole == "causal")
    return out.to(ct).reshape(inp.B, inp.H, inp.N, inp.Dv), lse.to(ct).reshape(inp.B, inp.H, inp.N)


def _whole_backward(job: _Job, out: Tensor, lse: Tensor, dout: Tensor):
    inp = job.inp
    ct = compute_dtype(inp.dtype)
    rows = (_whole_rows(t, job) for t in (dout, inp.q, out))
    do_r, q_r, out_r = rows
    lse_r = lse.reshape(inp.B, inp.Hkv, inp.G * inp.N)
    dq, dk, dv, _ = FusedCPU.backward(
        do_r, q_r, inp.k, inp.v, out_r, lse_r, None, inp.scale, job.whole == "causal"
    )
    return dq.to(ct).reshape(inp.q.shape), dk.to(ct), dv.to(ct)


def _splittable(inp: AttentionInputs) -> bool:
    return inp.mask is None and inp.bias is None and inp.dropout_p == 0


@dataclass(frozen=True, eq=False)
class _Part:
    """One pattern piece: its forward and backward plans, on regrouped positions if ``stride``."""

    forward_plan: SparsePlan
    backward_plan: SparsePlan
    stride: int | None = None


def visited_fraction(pattern, n: int, s: int, block: int) -> float:
    """Fraction of the ``N x S`` matrix that the block-sparse plan computes."""
    plan = sparse_plan(pattern, n, s, block)
    return plan.visited_tiles * block * block / (n * s)


@dataclass(frozen=True, eq=False)
class _Job:
    """One call's inputs and how to lay them out for the engines."""

    inp: AttentionInputs
    fused: bool
    chunk_bytes: int
    #: ``(B,)`` key lengths applied at call time (``KeyPadding`` split off the pattern), or None.
    key_lengths: Tensor | None = None
    #: ``"full"``/``"causal"`` when a partial call runs as one fused call (:func:`_whole_kind`).
    whole: str | None = None

    # -- layouts: (B, H, N, E) <-> (B*Hkv, num_q_tiles, G*b, E), query heads of a group stacked
    def to_rows(self, x: Tensor, plan: SparsePlan) -> Tensor:
        inp, b = self.inp, plan.block
        B, _, N, E = x.shape
        x5 = x.reshape(B, inp.Hkv, inp.G, N, E)
        pad = plan.num_q_tiles * b - N
        if inp.G == 1 and pad == 0:
            return x5.reshape(B * inp.Hkv, plan.num_q_tiles, b, E)
        if pad:
            x5 = F.pad(x5, (0, 0, 0, pad))
        x6 = x5.view(B, inp.Hkv, inp.G, plan.num_q_tiles, b, E).permute(0, 1, 3, 2, 4, 5)
        return x6.reshape(B * inp.Hkv, plan.num_q_tiles, inp.G * b, E)

    def from_rows(self, y: Tensor, plan: SparsePlan) -> Tensor:
        inp, b = self.inp, plan.block
        trailing = y.shape[3:]
        y = y.reshape(inp.B, inp.Hkv, plan.num_q_tiles, inp.G, b, *trailing).transpose(2, 3)
        return y.reshape(inp.B, inp.H, plan.num_q_tiles * b, *trailing)[:, :, : inp.N]

    @staticmethod
    def flat_keys(t: Tensor) -> Tensor:
        """``(B, Hkv, S, E)`` -> contiguous ``(B*Hkv, S, E)`` (a view when already contiguous)."""
        B, Hkv, S, E = t.shape
        return t.contiguous().view(B * Hkv, S, E)

    # -- per-chunk operands
    def keys(self, flat: Tensor, seg: Segment, lo: int, hi: int, b: int) -> Tensor:
        """Keys (or values) of rows ``lo:hi`` of ``seg``: ``(X, hi - lo, K, E)``."""
        X, _, E = flat.shape
        L = seg.length
        if seg.band:  # row i+1's keys start one tile after row i's: a strided view, no copy
            first = int(seg.cols[lo, 0])
            return flat.as_strided(
                (X, hi - lo, L * b, E), (flat.stride(0), b * E, E, 1), flat.storage_offset() + first * b * E
            )
        idx = seg.key_index[lo:hi].flatten().to(flat.device)  # clamped: padding reads a masked key
        return flat[:, idx].view(X, hi - lo, seg.keys_per_row, E)

    @staticmethod
    def rows_of(x: Tensor, seg: Segment, lo: int, hi: int) -> Tensor:
        return x[:, _row_selector(seg, lo, hi, x.device)]

    def bias(self, call: _Call, seg: Segment, bias: Tensor | None) -> Tensor:
        """Additive bias ``(1 or X', R', G*b, L*b)`` of one call: the pattern's mask, the user's
        mask/bias, and the call's key lengths (``call.key_limit``)."""
        lo, hi, key_limit = call.lo, call.hi, call.key_limit
        inp = self.inp
        dev = inp.device
        ct = compute_dtype(inp.dtype)
        shared = (
            inp.mask is None
            and bias is None
            and key_limit is None
            and seg.allowed.dim() == 3
            and bool(seg.same[lo:hi].all())
        )
        allowed = seg.allowed[seg.ref : seg.ref + 1] if shared else seg.allowed[..., lo:hi, :, :]
        allowed = allowed.to(dev)
        # to the user layout (Bx, Hx, R', b, K): from (R', b, K), or per-batch (B, R', b, K)
        allowed = allowed[None, None] if allowed.dim() == 3 else allowed[:, None]
        if key_limit is not None:  # (B,) or, for one batch item's call, (1,)
            key_pos = seg.key_index[lo:hi].to(dev)[None, None, :, None, :]  # (1, 1, R', 1, K)
            allowed = allowed & (key_pos < key_limit.view(-1, 1, 1, 1, 1))
        add = None
        if inp.mask is not None or bias is not None:
            q_idx = seg.query_index[lo:hi].to(dev)[:, :, None]  # (R', b, 1)
            k_idx = seg.key_index[lo:hi].to(dev)[:, None, :]  # (R', 1, K)
            if inp.mask is not None:
                allowed = allowed & _gather(inp.mask, q_idx, k_idx)
            if bias is not None:
                add = _gather(bias, q_idx, k_idx).to(ct)
        out = torch.zeros(allowed.shape, dtype=ct, device=dev).masked_fill_(~allowed, float("-inf"))
        if add is not None:
            out = out + add
        return self._to_engine_layout(out)

    def _to_engine_layout(self, t: Tensor) -> Tensor:
        """``(Bx, Hx, R', b, K)`` with ``Bx in {1, B}``, ``Hx in {1, H}`` -> ``(1 or X, R', G*b, K)``."""
        inp = self.inp
        Bx, Hx, R, b, K = t.shape
        if Hx == 1:
            t = t[:, :, :, None].expand(Bx, 1, R, inp.G, b, K)
            if Bx > 1:
                t = t.expand(Bx, inp.Hkv, R, inp.G, b, K)
        else:
            t = t.view(Bx, inp.Hkv, inp.G, R, b, K).transpose(2, 3)
            if Bx == 1 and inp.B > 1:  # per-head but not per-batch: every batch item alike
                t = t.expand(inp.B, -1, -1, -1, -1, -1)
        return t.reshape(-1, R, inp.G * b, K)

    def keep(self, seg: Segment, lo: int, hi: int, b: int) -> Tensor | None:
        """Dropout keep mask ``(X, R', G*b, K)`` from the true (batch, head, query, key) indices."""
        inp = self.inp
        if inp.dropout_p == 0:
            return None
        dev = inp.device
        X = inp.B * inp.Hkv
        bx = torch.arange(X, device=dev).view(X, 1, 1, 1)
        g = (torch.arange(inp.G * b, device=dev) // b).view(1, 1, -1, 1)
        q_idx = seg.query_index[lo:hi].to(dev)  # (R', b)
        q_idx = q_idx[:, None, :].expand(-1, inp.G, -1).reshape(1, hi - lo, -1, 1)
        k_idx = seg.key_index[lo:hi].to(dev)[None, :, None, :]
        return keep_mask(
            inp.dropout_seed, bx // inp.Hkv, (bx % inp.Hkv) * inp.G + g, q_idx, k_idx, inp.dropout_p
        )

    def row_classes(self, seg: Segment) -> list[int]:
        """Per row of ``seg``, how the call's key lengths touch it: ``CLEAN`` (every key it may
        see is real in every batch item), ``DEAD`` (none is, in any item: skipped) or
        ``PADDED`` (its mask differs per batch item). All ``CLEAN`` without key lengths."""
        if self.key_lengths is None:
            return [CLEAN] * seg.rows.numel()
        return _classify(seg.key_lo, seg.key_hi, int(self.key_lengths.min()), int(self.key_lengths.max()))

    def chunks(self, seg: Segment, backward: bool) -> list[tuple[int, int, bool]]:
        """``(lo, hi, padded)`` row ranges of ``seg`` for one batched call each, within
        ``chunk_bytes``; ``padded`` ranges need the key lengths in their bias. Rows that key
        lengths leave nothing to see are skipped (they keep output 0)."""
        inp, R = self.inp, seg.rows.numel()
        K = seg.allowed.shape[-1]
        width = max(4, inp.q.element_size())
        X = inp.B * inp.Hkv
        mask_row = inp.G * seg.allowed.shape[-2] * K * 4
        per_row = mask_row * (X if inp.mask is not None or inp.bias is not None else 1)
        if not seg.band or backward:
            per_row += 3 * X * K * (inp.D + inp.Dv) * width
        if not self.fused:
            per_row += 3 * X * inp.G * seg.allowed.shape[-2] * K * 4  # scores, probabilities, dS
        per_padded_row = per_row + mask_row * X  # a bias per batch item
        bounds, lo = [], 0
        same = seg.same.tolist()
        classes = self.row_classes(seg)
        while lo < R:  # split where rows stop sharing one mask or one class
            step = max(1, self.chunk_bytes // max(1, per_padded_row if classes[lo] == PADDED else per_row))
            hi = min(R, lo + step)
            hi = next((i for i in range(lo + 1, hi) if (same[i], classes[i]) != (same[lo], classes[lo])), hi)
            if classes[lo] != DEAD:
                bounds.append((lo, hi, classes[lo] == PADDED))
            lo = hi
        return bounds

    def calls(self, seg: Segment, backward: bool) -> Iterator[_Call]:
        """The batched engine calls that compute ``seg``.

        Without key lengths, one call per chunk over all ``B * Hkv`` key heads. Chunks whose
        rows the lengths touch differently per batch item run, on the fused engine with no user
        mask, as one call per batch item and run of rows: a row whose keys are all real for
        that item shares the segment's mask, a row that sees none is skipped, and only the few
        rows across the item's last key get the lengths in their bias. Elsewhere (user masks,
        dropout) such chunks run as one call with a bias per batch item.
        """
        inp = self.inp
        per_item = self.fused and inp.mask is None and inp.bias is None
        for lo, hi, padded in self.chunks(seg, backward):
            if not padded:
                yield _Call(slice(None), slice(None), lo, hi, None)
            elif not per_item:
                yield _Call(slice(None), slice(None), lo, hi, self.key_lengths)
            else:
                key_lo, key_hi = seg.key_lo[lo:hi], seg.key_hi[lo:hi]
                for item, length in enumerate(self.key_lengths.tolist()):
                    xs = slice(item * inp.Hkv, (item + 1) * inp.Hkv)
                    for run, c in runs(_classify(key_lo, key_hi, length, length)):
                        if c != DEAD:
                            limit = self.key_lengths[item : item + 1] if c == PADDED else None
                            yield _Call(xs, slice(item, item + 1), lo + run.start, lo + run.stop, limit)


CLEAN, PADDED, DEAD = 0, 1, 2


def _classify(key_lo: Tensor, key_hi: Tensor, shortest: int, longest: int) -> list[int]:
    """Per row, from the smallest and largest key it may see: ``CLEAN`` when all its keys lie
    below every length (``< shortest``), ``DEAD`` when none lies below any (``>= longest``),
    ``PADDED`` otherwise."""
    return torch.where(key_hi < shortest, CLEAN, torch.where(key_lo >= longest, DEAD, PADDED)).tolist()


@dataclass(frozen=True)
class _Call:
    """One engine call: key heads ``xs`` of the ``B * Hkv`` (batch items ``items``), rows
    ``lo:hi`` of a segment, keys at positions ``>= key_limit`` hidden (per item) if given."""

    xs: slice
    items: slice
    lo: int
    hi: int
    key_limit: Tensor | None


def _row_selector(seg: Segment, lo: int, hi: int, device) -> slice | Tensor:
    """Rows ``lo:hi`` of a segment as a slice when consecutive (cheap views), else an index."""
    rows = seg.rows[lo:hi]
    first = int(rows[0])
    if int(rows[-1]) - first == hi - lo - 1:
        return slice(first, first + hi - lo)
    return rows.to(device)


def _gather(t: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
    """``t[..., q_idx, k_idx]`` for a 4-D mask/bias broadcastable to (B, H, N, S): ``(Bx, Hx, R', b, K)``."""
    qi = q_idx if t.shape[2] > 1 else torch.zeros_like(q_idx)
    ki = k_idx if t.shape[3] > 1 else torch.zeros_like(k_idx)
    return t[:, :, qi, ki]


def _merge(out_acc: Tensor, lse_acc: Tensor, written: Tensor, rows, out: Tensor, lse: Tensor) -> None:
    """Fold a call's partial result for query tiles ``rows`` (slice or index) into the
    accumulators (views of the call's key heads; ``written`` is ``(items, T)``)."""
    cpu_rows = rows if isinstance(rows, slice) else rows.cpu()
    if bool((~written[:, cpu_rows]).all()):
        out_acc[:, rows] = out.to(out_acc.dtype)
        lse_acc[:, rows] = lse.to(lse_acc.dtype)
    else:  # the same row seen through several key sets: combine through the log-sum-exps
        out_acc[:, rows], lse_acc[:, rows] = _rows.combine(
            out_acc[:, rows], lse_acc[:, rows], out.to(out_acc.dtype), lse.to(lse_acc.dtype)
        )
    written[:, cpu_rows] = True


def _forward_plan(job: _Job, plan: SparsePlan, q, k, v, user_bias) -> tuple[Tensor, Tensor]:
    """Run one plan's segments: ``out (B, H, N, Dv)`` and ``lse (B, H, N)`` in the compute dtype."""
    inp = job.inp
    ct = compute_dtype(q.dtype)
    b = plan.block
    q_rows = job.to_rows(q, plan)
    k_flat, v_flat = job.flat_keys(k), job.flat_keys(v)
    X, T, M = q_rows.shape[:3]
    # Every row starts at lse -inf. Its output is first assigned by the call that writes it
    # (``written``); a later call combines through _rows.combine, which selects a side whose
    # lse is -inf away rather than reading it. Rows no call writes are zeroed at the end. So
    # no uninitialized value is ever read, and the output needs no zero-fill pass.
    out_acc = torch.empty(X, T, M, inp.Dv, dtype=ct, device=q.device)
    lse_acc = torch.full((X, T, M), float("-inf"), dtype=ct, device=q.device)
    written = torch.zeros(inp.B, T, dtype=torch.bool)
    for seg in plan.segments:
        for call in job.calls(seg, backward=False):
            lo, hi, xs = call.lo, call.hi, call.xs
            bias_c = job.bias(call, seg, user_bias)
            args = (
                job.rows_of(q_rows[xs], seg, lo, hi),
                job.keys(k_flat[xs], seg, lo, hi, b),
                job.keys(v_flat[xs], seg, lo, hi, b),
            )
            if job.fused:
                out_c, lse_c = FusedCPU.forward(*args, bias_c, inp.scale)
            else:
                out_c, lse_c = Eager.forward(
                    *args, bias_c, inp.scale, job.keep(seg, lo, hi, b), inp.dropout_p
                )
            rows = _row_selector(seg, lo, hi, q.device)
            _merge(out_acc[xs], lse_acc[xs], written[call.items], rows, out_c, lse_c)
    if not bool(written.all()):  # tile rows (per batch item) that no call wrote: output 0
        out_acc[(~written).repeat_interleave(inp.Hkv, 0).to(q.device)] = 0
    return job.from_rows(out_acc, plan), job.from_rows(lse_acc[..., None], plan)[..., 0]


def _backward_plan(
    job: _Job, plan: SparsePlan, q, k, v, dout, out, lse, dlse, user_bias, want_dbias: bool, into=None
):
    """Gradients of one plan's keys, given the final ``out`` and ``lse`` and the gradients of
    both (``dlse`` may be None; then the fused engine may run), in the compute dtype. With
    ``into`` (compute-dtype tensors shaped like q, k, v), they are added there, in place where
    the tensors can be seen in the tiles' layout, and ``(None, None, None, dbias)`` returned."""
    inp = job.inp
    ct = compute_dtype(q.dtype)
    b = plan.block
    q_rows, do_rows = job.to_rows(q, plan), job.to_rows(dout, plan)
    out_rows = job.to_rows(out, plan)
    lse_rows = job.to_rows(lse[..., None], plan)[..., 0]
    dlse_rows = None if dlse is None else job.to_rows(dlse[..., None], plan)[..., 0]
    k_flat, v_flat = job.flat_keys(k), job.flat_keys(v)
    X, T, M, _ = q_rows.shape
    direct = (None, None, None) if into is None else _tile_views(job, plan, into)
    dq_rows = direct[0] if direct[0] is not None else torch.zeros(X, T, M, inp.D, dtype=ct, device=q.device)
    # key gradients, padded to whole tiles so the band can add tile-shifted slabs
    keys = plan.num_k_tiles * b
    dk_acc = direct[1] if direct[1] is not None else torch.zeros(X, keys, inp.D, dtype=ct, device=q.device)
    dv_acc = direct[2] if direct[2] is not None else torch.zeros(X, keys, inp.Dv, dtype=ct, device=q.device)
    dbias = torch.zeros(user_bias.shape, dtype=ct, device=q.device) if want_dbias else None
    for seg in plan.segments:
        for call in job.calls(seg, backward=True):
            lo, hi, xs = call.lo, call.hi, call.xs
            bias_c = job.bias(call, seg, user_bias)
            args = (
                job.rows_of(do_rows[xs], seg, lo, hi),
                job.rows_of(q_rows[xs], seg, lo, hi),
                job.keys(k_flat[xs], seg, lo, hi, b),
                job.keys(v_flat[xs], seg, lo, hi, b),
                job.rows_of(out_rows[xs], seg, lo, hi),
                job.rows_of(lse_rows[xs], seg, lo, hi),
                bias_c,
                inp.scale,
            )
            if job.fused:
                dq_c, dk_c, dv_c, ds = FusedCPU.backward(*args)
            else:
                dlse_c = None if dlse_rows is None else job.rows_of(dlse_rows[xs], seg, lo, hi)
                dq_c, dk_c, dv_c, ds = Eager.backward(*args, job.keep(seg, lo, hi, b), inp.dropout_p, dlse_c)
            dq_rows[xs][:, _row_selector(seg, lo, hi, q.device)] += dq_c.to(ct)
            _fold(dk_acc[xs], seg, lo, hi, dk_c.to(ct), b)
            _fold(dv_acc[xs], seg, lo, hi, dv_c.to(ct), b)
            if dbias is not None:
                _scatter_bias_grad(dbias, job, seg, lo, hi, ds)
    grads = (
        job.from_rows(dq_rows, plan),
        dk_acc[:, : inp.S].reshape(k.shape),
        dv_acc[:, : inp.S].reshape(v.shape),
    )
    if into is None:
        return (*grads, dbias)
    for acc, view, g in zip(into, direct, grads, strict=True):
        if view is None:  # computed in a temporary: add it
            acc.add_(g)
    return None, None, None, dbias


def _tile_views(job: _Job, plan: SparsePlan, into) -> tuple[Tensor | None, ...]:
    """``into``'s ``(dq, dk, dv)`` seen without a copy in the layout the tiles accumulate in:
    ``(B*Hkv, tiles, b, D)`` and ``(B*Hkv, key tiles * b, E)``; None for one that cannot be
    (query groups, a ragged last tile, strides that do not merge)."""
    b, (dq, dk, dv) = plan.block, into

    def view(x: Tensor, shape: tuple[int, ...]) -> Tensor | None:
        try:
            return x.view(shape)
        except RuntimeError:  # not expressible as a view of x's memory
            return None

    rows = None
    if job.inp.G == 1 and plan.num_q_tiles * b == dq.shape[2]:
        rows = view(dq, (dq.shape[0] * dq.shape[1], plan.num_q_tiles, b, dq.shape[3]))
    if plan.num_k_tiles * b != dk.shape[2]:
        return rows, None, None
    flat = [view(t, (t.shape[0] * t.shape[1], t.shape[2], t.shape[3])) for t in (dk, dv)]
    return rows, flat[0], flat[1]


def _run_forward(job: _Job, parts: tuple[_Part, ...], q, k, v, user_bias) -> tuple[Tensor, Tensor]:
    """Every part's forward, merged: ``out`` and ``lse`` in the compute dtype."""
    out = lse = None
    for part in parts:
        s = part.stride
        args = (q, k, v) if s is None else (regroup(q, s), regroup(k, s), regroup(v, s))
        out_p, lse_p = _forward_plan(job, part.forward_plan, *args, user_bias)
        if s is not None:
            out_p, lse_p = ungroup(out_p, s), ungroup(lse_p, s)
        out, lse = (out_p, lse_p) if out is None else _rows.combine(out, lse, out_p, lse_p)
    return out, lse


def _run_backward(
    job: _Job, parts: tuple[_Part, ...], q, k, v, dout, out, lse, dlse, user_bias, want_dbias, into=None
):
    """Every part's backward from the final ``out``/``lse`` and their gradients (``dlse`` may
    be None), summed: ``(dq, dk, dv, dbias)``; with ``into``, the gradients are added there
    (:func:`_backward_plan`) and returned as None."""
    grads = None
    for part in parts:
        s = part.stride
        tensors = (q, k, v, dout, out, lse, dlse)
        if s is not None:
            tensors = tuple(None if t is None else regroup(t, s) for t in tensors)
        g = _backward_plan(
            job, part.backward_plan, *tensors, user_bias, want_dbias, into if s is None else None
        )
        if s is not None:
            g = (ungroup(g[0], s), ungroup(g[1], s), ungroup(g[2], s), g[3])
            if into is not None:  # regrouped: computed apart, added here
                add_into(into, g[:3])
                g = (None, None, None, g[3])
        grads = (
            g if grads is None else tuple(a if b_ is None else a + b_ for a, b_ in zip(grads, g, strict=True))
        )
    return grads


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, job: _Job, parts: tuple[_Part, ...]):
        user_bias = bias if bias.numel() else None
        out, lse = _run_forward(job, parts, q, k, v, user_bias)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.job, ctx.parts = job, parts
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return out, lse.to(lse_dtype(q.dtype))

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        user_bias = bias if bias.numel() else None
        want_dbias = user_bias is not None and ctx.needs_input_grad[3]
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        job = ctx.job if dlse is None else dataclasses.replace(ctx.job, fused=False)
        dq, dk, dv, dbias = _run_backward(
            job, ctx.parts, q, k, v, dout, out, lse, dlse, user_bias, want_dbias
        )
        db = dbias.to(bias.dtype) if dbias is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), db, None, None


def _fold(acc: Tensor, seg: Segment, lo: int, hi: int, grad: Tensor, b: int) -> None:
    """Add per-row key gradients ``(X, R', K, E)`` back onto the keys ``(X, tiles * b, E)``."""
    X, _, E = acc.shape
    L, R = seg.length, hi - lo
    if seg.band:  # row i's tile t is key tile first + i + t: L shifted, non-overlapping adds
        tiles, g = acc.view(X, -1, b, E), grad.view(X, R, L, b, E)
        first = int(seg.cols[lo, 0])
        for t in range(L):
            tiles[:, first + t : first + t + R] += g[:, :, t]
    else:  # padding positions point at clamped keys but carry exactly zero gradient
        acc.index_add_(1, seg.key_index[lo:hi].flatten().to(acc.device), grad.reshape(X, -1, E))


def _scatter_bias_grad(dbias: Tensor, job: _Job, seg: Segment, lo: int, hi: int, ds: Tensor) -> None:
    """Add ``dS`` (the gradient of the scores) into a broadcastable float bias's gradient."""
    inp = job.inp
    R, b, K = hi - lo, seg.allowed.shape[-2], seg.allowed.shape[-1]
    # (X, R', G*b, K) -> (B, H, R', b, K), then sum over the dims the bias broadcasts
    g = ds.view(inp.B, inp.Hkv, R, inp.G, b, K).transpose(2, 3).reshape(inp.B, inp.H, R, b, K)
    g = reduce_to(g, (dbias.shape[0], dbias.shape[1], R, b, K))
    # Masked and padding positions carry dS = 0, so clamped duplicate indices add nothing.
    dev = dbias.device
    qi = seg.query_index[lo:hi].to(dev)[:, :, None].expand(R, b, K)
    ki = seg.key_index[lo:hi].to(dev)[:, None, :].expand(R, b, K)
    qi = qi if dbias.shape[2] > 1 else torch.zeros_like(qi)  # a bias constant along N (or S)
    ki = ki if dbias.shape[3] > 1 else torch.zeros_like(ki)  # collects every row's (column's) dS
    i0 = torch.arange(dbias.shape[0], device=dev).view(-1, 1, 1, 1, 1)
    i1 = torch.arange(dbias.shape[1], device=dev).view(1, -1, 1, 1, 1)
    dbias.index_put_((i0, i1, qi, ki), g, accumulate=True)
