"""Context parallelism: attention over a sequence sharded across processes, any pattern.

Each rank of a ``torch.distributed`` group holds a shard of the sequence (made by
:func:`shard_sequence`). :func:`context_parallel_attention` returns this rank's shard of what
:func:`attnkit.attention` would give on the whole sequence, forward and backward, by one of two
methods:

* ``ring``: every rank keeps its queries; keys and values travel between ranks with
  ``isend``/``irecv``, the next step's transfer overlapping the current step's compute. Each
  (query run, key run) pair is an ordinary attention call on the pattern's rectangle
  (:func:`attnkit.patterns.crop`); partial results merge exactly through their log-sum-exps.
  The backward re-sends the keys and values and returns each pair's ``dK``/``dV`` to their
  owner. A rank sends another only the keys that its queries see (the exact span, from the
  cropped block maps), and a pair computes only the query rows that see its keys: a sliding
  window sends one window to the next rank whatever ``N`` is, ``Document`` reaches only the
  ranks that share a document, and pairs the pattern never connects cost nothing.
  ``layout="zigzag"`` (rank ``r`` holds runs ``r`` and ``2P - 1 - r`` of ``2P``) balances
  causal work; :class:`BalancedLayout` balances any pattern's.
* ``all_to_all`` (DeepSpeed-Ulysses): swap sequence sharding for head sharding, run the whole
  sequence with the full pattern on ``H / P`` heads through any local backend, swap back.
  Needs ``H % P == 0``.

Only ``torch.distributed`` point-to-point operations move data (gloo on CPU, NCCL on GPU).
Every wait has a timeout (``timeout=``, default ``ATTNKIT_DIST_TIMEOUT`` seconds or 300) and
names the peer it waited for, so a rank that raised or died makes the others fail with
:class:`PeerError` instead of hanging. Every call first checks that all ranks agree on shapes,
dtype, pattern, layout and method.

Shape legend: ``B`` batch, ``H``/``Hkv`` query/key-value heads, ``N``/``S`` whole query/key
lengths, ``N_local`` a rank's share, ``D``/``Dv`` head dims, ``P`` ranks in the group.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends, caches, functional
from ._timing import time_in_turns
from .backends import _rows
from .backends.base import compute_dtype, lse_dtype
from .patterns import EMPTY, Full, Pattern, crop

__all__ = [
    "LAYOUTS",
    "METHODS",
    "SEQUENCE_DIMS",
    "BalancedLayout",
    "ContextParallel",
    "PeerError",
    "communication_device",
    "context_parallel_attention",
    "gather_sequence",
    "sequence_dim",
    "set_context_parallel",
    "shard_ranges",
    "shard_sequence",
]

LAYOUTS = ("contiguous", "zigzag")
#: Per rank, the ``[start, stop)`` runs of the sequence it holds (see :func:`shard_ranges`).
Ranges = tuple[tuple[tuple[int, int], ...], ...]
METHODS = ("auto", "ring", "all_to_all")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class PeerError(RuntimeError):
    """A peer rank did not answer in time, or its connection failed (it raised or died)."""

    def __init__(self, message: str, peer: int) -> None:
        super().__init__(message)
        self.peer = peer


# --------------------------------------------------------------------------- layouts
def shard_ranges(n: int, world_size: int, layout: str | BalancedLayout = "contiguous") -> Ranges:
    """The ``[start, stop)`` ranges of an ``n``-token sequence that each of ``world_size``
    ranks holds, in the order the rank stores them.

    ``contiguous``: rank ``r`` holds one run; the first ``n % P`` ranks one token more.
    ``zigzag``: the sequence is cut in ``2P`` runs the same way and rank ``r`` holds runs ``r``
    and ``2P - 1 - r``, so causal and windowed work is the same on every rank.
    A :class:`BalancedLayout` chooses per length for its pattern's work.

    Raises:
        ValueError: unknown layout, or fewer tokens than the layout has runs.
    """
    _check_layout(layout)
    if isinstance(layout, BalancedLayout):
        _positive_ints("shard_ranges()", n=n, world_size=world_size)
        return _balanced(layout.pattern, layout.block, n, world_size)
    _positive_ints("shard_ranges()", n=n, world_size=world_size)
    runs = world_size if layout == "contiguous" else 2 * world_size
    if n < runs:
        raise ValueError(
            f"shard_ranges(): the {layout} layout cuts the sequence in {runs} runs for {world_size} "
            f"ranks, so it needs at least {runs} tokens, but got n={n}."
        )
    q, extra = divmod(n, runs)
    bounds = [0]
    for i in range(runs):
        bounds.append(bounds[-1] + q + (i < extra))
    cut = [(bounds[i], bounds[i + 1]) for i in range(runs)]
    if layout == "contiguous":
        return tuple((c,) for c in cut)
    return tuple((cut[r], cut[runs - 1 - r]) for r in range(world_size))


def _positive_ints(owner: str, **values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: expected {name} to be a positive int, but got {name}={value!r}.")


@dataclass(frozen=True)
class BalancedLayout:
    """A layout that gives every rank the same work under ``pattern`` (self-attention).

    For each sequence length it takes, of ``contiguous``, ``zigzag`` and contiguous runs cut
    where the pattern's work reaches ``1/P``, ``2/P``, ... of the whole, the one whose busiest
    rank has the least work; work is counted from the pattern's block map (``block``-sized
    tiles a row's tile visits), so it costs no ``N x N`` evaluation. A layout later in that
    list is taken only when its busiest rank has at least 5% less work: ``contiguous`` keeps
    neighbours together (less traffic for windows) and both fixed layouts give every rank the
    same number of tokens. Causal attention gets ``zigzag``; packed documents of uneven
    lengths get cut runs.

    Use it wherever a layout is taken: ``shard_sequence(x, layout=BalancedLayout(p))``, the
    same object for ``context_parallel_attention`` and ``ContextParallel``.
    """

    pattern: Pattern
    block: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"BalancedLayout: expected a Pattern, but got {type(self.pattern).__name__}.")
        _positive_ints("BalancedLayout", block=self.block)


def _balanced(pattern: Pattern, block: int, n: int, world: int) -> Ranges:
    return _BALANCED.get((pattern, block, n, world), lambda: _balance(pattern, block, n, world))


def _balance(pattern: Pattern, block: int, n: int, world: int) -> Ranges:
    pattern.check(n, n)
    states = pattern.block_map(n, n, block).states
    work = (states != EMPTY).sum(1).double().repeat_interleave(block)[:n]  # visited tiles per row
    candidates = []
    if n >= world:
        candidates.append(shard_ranges(n, world, "contiguous"))
    if n >= 2 * world:
        candidates.append(shard_ranges(n, world, "zigzag"))
    if n >= world:
        csum = work.cumsum(0)
        bounds = [0]
        for r in range(1, world):
            at = int(torch.searchsorted(csum, csum[-1] * r / world)) + 1
            bounds.append(min(max(at, bounds[-1] + 1), n - (world - r)))
        bounds.append(n)
        candidates.append(tuple(((bounds[r], bounds[r + 1]),) for r in range(world)))
    if not candidates:
        raise ValueError(
            f"BalancedLayout: expected at least {world} tokens for {world} ranks, but got n={n}."
        )

    def busiest(ranges: Ranges) -> float:
        return max(sum(float(work[a:b].sum()) for a, b in runs) for runs in ranges)

    best = candidates[0]
    for other in candidates[1:]:  # equal-length layouts first: cut runs must pay for their memory
        if busiest(other) < 0.95 * busiest(best):
            best = other
    return best


#: The sequence axis of attnkit's layouts, by the number of dimensions: ``(N,)``, ``(B, N)``
#: token ids, ``(B, N, C)`` activations, ``(B, H, N, D)`` attention inputs.
SEQUENCE_DIMS = {1: 0, 2: 1, 3: 1, 4: 2}


def sequence_dim(x: Tensor, dim: int | None) -> int:
    """``dim`` (made non-negative), or the sequence axis of ``x``'s layout when None: the one
    default of every function here that shards or gathers a sequence."""
    if dim is not None:
        if not -x.dim() <= dim < x.dim():
            raise ValueError(
                f"expected dim in [-{x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, but got dim={dim}."
            )
        return dim % x.dim()
    if x.dim() not in SEQUENCE_DIMS:
        raise ValueError(
            f"expected dim= for a {x.dim()}-d tensor (the sequence axis is known for 1-4 dimensions: "
            f"(N,), (B, N), (B, N, C), (B, H, N, D)), but got shape {tuple(x.shape)}."
        )
    return SEQUENCE_DIMS[x.dim()]


def shard_sequence(
    x: Tensor,
    *,
    dim: int | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str | BalancedLayout = "contiguous",
) -> Tensor:
    """This rank's shard of ``x`` along ``dim`` (default: the sequence axis of the layout,
    :data:`SEQUENCE_DIMS`: 2 of ``(B, H, N, D)``, 1 of ``(B, N, C)`` and ``(B, N)``); a view for
    the contiguous layout. Lengths not divisible by the ranks are fine."""
    dim = sequence_dim(x, dim)
    g = _Group.of(group, None, None)  # ranks only: nothing is sent
    ranges = shard_ranges(x.shape[dim], g.size, layout)[g.rank]
    parts = [x.narrow(dim, a, b - a) for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def gather_sequence(
    x_local: Tensor,
    *,
    dim: int | None = None,
    n: int,
    group: dist.ProcessGroup | None = None,
    layout: str | BalancedLayout = "contiguous",
    timeout: float | None = None,
) -> Tensor:
    """The whole ``n``-token sequence on every rank, from each rank's shard (the inverse of
    :func:`shard_sequence`). Differentiable: the gradient of a rank's shard is the sum over
    ranks of the gradients of its positions (as an all-gather's is). ``dim`` defaults to the
    sequence axis, as in :func:`shard_sequence`."""
    g = _Group.of(group, timeout, x_local.device)
    ranges = shard_ranges(n, g.size, layout)
    dim = sequence_dim(x_local, dim)
    have, want = x_local.shape[dim], sum(b - a for a, b in ranges[g.rank])
    if have != want:
        raise ValueError(
            f"gather_sequence(): expected rank {g.rank}'s shard to hold {want} of the n={n} tokens "
            f"along dim={dim} ({layout} layout, {g.size} ranks), but got "
            f"x_local.shape={tuple(x_local.shape)}."
        )
    return _Gather.apply(x_local, dim, ranges, g)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim: int, ranges, g: _Group):
        ctx.dim, ctx.ranges, ctx.g = dim, ranges, g
        return _all_gather_seq(x, dim, ranges, g, "gather_sequence")

    @staticmethod
    def backward(ctx, grad):
        total = _all_reduce_sum(grad.contiguous(), ctx.g, "gather_sequence backward")
        mine = [total.narrow(ctx.dim, a, b - a) for a, b in ctx.ranges[ctx.g.rank]]
        return (mine[0] if len(mine) == 1 else torch.cat(mine, ctx.dim)), None, None, None


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ContextParallel:
    """How a model's sequence is sharded: hand one to :func:`set_context_parallel`.

    Every rank runs the model on its shard of the tokens (``shard``); positions, rotary angles
    and patterns stay those of the whole sequence; self- and cross-attention run through
    :func:`context_parallel_attention`; everything else is per token and needs no
    communication.

    Example (under ``torchrun --nproc-per-node 4``)::

        cp = ContextParallel(layout="zigzag")
        set_context_parallel(model, cp)
        logits = model(cp.shard(input_ids))  # this rank's (B, N_local, V)
    """

    group: dist.ProcessGroup | None = None
    layout: str | BalancedLayout = "contiguous"
    method: str = "auto"
    timeout: float | None = None

    def __post_init__(self) -> None:
        _check_layout(self.layout)
        if self.method not in METHODS:
            raise ValueError(
                f"ContextParallel: expected method in {METHODS}, but got method={self.method!r}."
            )

    def shard(self, x: Tensor, dim: int | None = None) -> Tensor:
        """This rank's tokens of ``x`` along ``dim`` (default: the sequence axis, as in
        :func:`shard_sequence`: 1 for ``(B, T)`` ids and ``(B, T, C)`` activations)."""
        return shard_sequence(x, dim=dim, group=self.group, layout=self.layout)

    def gather(self, x: Tensor, n: int, dim: int | None = None) -> Tensor:
        """The whole ``n`` tokens along ``dim`` from every rank's shard (differentiable)."""
        return gather_sequence(x, dim=dim, n=n, group=self.group, layout=self.layout, timeout=self.timeout)

    def positions(self, n_local: int, device: torch.device | str | None = None) -> Tensor:
        """The whole-sequence positions ``(n_local,)`` of this rank's tokens, on ``device``
        (default: the transport's, :func:`communication_device`). Learns the whole length from
        the other ranks (one small exchange, on the transport's device)."""
        g = _Group.of(self.group, self.timeout, device)
        mine = g.tensor([n_local], torch.int64)
        lengths = _exchange_all(
            g, [mine] * g.size, lambda r: (1,), torch.int64, "the length exchange", 6 << 20
        )
        n = int(sum(int(x) for x in lengths))
        ranges = shard_ranges(n, g.size, self.layout)[g.rank]
        if sum(b - a for a, b in ranges) != n_local:
            raise ValueError(
                f"ContextParallel: rank {g.rank} holds {n_local} tokens, but the {self.layout} layout "
                f"of the whole {n} gives it {sum(b - a for a, b in ranges)}: shard with cp.shard()."
            )
        out = device if device is not None else g.device
        return torch.cat([torch.arange(a, b, device=out) for a, b in ranges])

    def attention(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
        """:func:`context_parallel_attention` with this object's group, layout and method."""
        return context_parallel_attention(
            q, k, v, group=self.group, layout=self.layout, method=self.method, timeout=self.timeout, **kwargs
        )


def set_context_parallel(model: torch.nn.Module, cp: ContextParallel | None) -> torch.nn.Module:
    """Run ``model``'s attention context-parallel as ``cp`` says (``None`` turns it off).

    Sets ``context_parallel`` on every submodule that has the attribute: attnkit's
    :class:`~attnkit.nn.MultiHeadAttention` and the models (``DecoderLM``, ``BertEncoder``),
    which then take this rank's shard of the tokens and count positions globally. Returns
    ``model``.
    """
    if cp is not None and not isinstance(cp, ContextParallel):
        raise TypeError(
            f"set_context_parallel(): expected a ContextParallel or None, but got {type(cp).__name__}."
        )
    found = False
    for m in model.modules():
        if hasattr(m, "context_parallel"):
            m.context_parallel = cp
            found = True
    if not found:
        raise ValueError(
            f"set_context_parallel(): {type(model).__name__} has no attnkit attention modules to shard."
        )
    return model


# --------------------------------------------------------------------------- the attention
def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: Pattern | None = None,
    mask: Tensor | None = None,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str | BalancedLayout = "contiguous",
    method: str = "auto",
    return_lse: bool = False,
    timeout: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """This rank's shard of ``attention(q_full, k_full, v_full, pattern=..., mask=...)``.

    Args:
        q: This rank's queries ``(B, H, N_local, D)``, from :func:`shard_sequence`.
        k: This rank's keys ``(B, Hkv, S_local, D)`` (``H % Hkv == 0``), sharded alike.
        v: This rank's values ``(B, Hkv, S_local, Dv)``.
        pattern: Any :class:`~attnkit.patterns.Pattern` of the whole ``(N, S)`` matrix
            (positions, alignment and documents are global). ``None`` is ``Full()``.
        mask: Optional bool mask or float bias broadcastable to the *whole* ``(B, H, N, S)``
            (each rank reads its rows; costs what it holds). A float bias gets no gradient.
        scale: Multiplier of ``q @ k^T``; default ``D ** -0.5``.
        group: The process group whose ranks hold the shards; default the world.
        layout: ``"contiguous"``, ``"zigzag"`` or a :class:`BalancedLayout`, as the shards
            were made.
        method: ``"ring"``, ``"all_to_all"`` or ``"auto"``: when both can run, the first call
            of a signature (shapes, dtype, pattern, layout, ranks) times one forward of each
            on its inputs and every later one reuses the faster (cached in
            :mod:`attnkit.caches` as ``"context_parallel"``).
        return_lse: Also return this rank's rows of the log-sum-exp ``(B, H, N_local)``.
        timeout: Seconds to wait for any peer; default ``ATTNKIT_DIST_TIMEOUT`` or 300.

    Returns:
        ``out`` ``(B, H, N_local, Dv)``, or ``(out, lse)``. Gradients of ``q``, ``k``, ``v``
        are this rank's slices of the whole-sequence gradients.

    Raises:
        TypeError, ValueError: bad arguments, or ranks that disagree (shapes, dtype, pattern,
            layout, method, scale), or shards that are not the layout's.
        PeerError: a peer did not answer within ``timeout`` or its connection failed.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"context_parallel_attention(): expected {name} to be a Tensor, but got {type(t).__name__}."
            )
    _check_layout(layout)
    if method not in METHODS:
        raise ValueError(
            f"context_parallel_attention(): expected method in {METHODS}, but got method={method!r}."
        )
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(
            f"context_parallel_attention(): expected pattern to be an attnkit.patterns.Pattern or None, "
            f"but got {type(pattern).__name__}."
        )
    if pattern is not None and pattern.per_head:
        raise NotImplementedError(
            "context_parallel_attention(): a PerHead pattern is not supported under context "
            "parallelism yet; run each head group's pattern as its own call."
        )
    # local validation (shapes, dtypes, GQA, scale) through attention()'s own checks
    local = functional.build_inputs(q, k, v, scale=scale)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(
                f"context_parallel_attention(): expected mask to be a Tensor, but got {type(mask).__name__}."
            )
        if mask.is_floating_point() and mask.requires_grad:
            raise ValueError(
                "context_parallel_attention(): a float mask that requires grad is not supported "
                "(its gradient would be sharded by rows and columns); detach it, or express it "
                "as a pattern."
            )
    g = _Group.of(group, timeout, q.device)
    pattern = Full() if pattern is None else pattern
    mine = _describe(local, pattern, mask, layout, method)
    key = (*mine, g.size, q.device.type, None if mask is None else tuple(mask.shape))
    cached = _METHODS.peek(key) if method == "auto" else None
    metas = _agree(g, [*mine, -1 if cached is None else METHODS.index(cached)], pattern, layout)
    N = sum(m[3] for m in metas)
    S = sum(m[4] for m in metas)
    if isinstance(layout, BalancedLayout) and N != S:
        raise ValueError(
            f"context_parallel_attention(): a BalancedLayout balances self-attention (N == S), but got "
            f"N={N} queries and S={S} keys; shard cross-attention 'contiguous'."
        )
    q_ranges, k_ranges = shard_ranges(N, g.size, layout), shard_ranges(S, g.size, layout)
    for r, m in enumerate(metas):
        for name, got, ranges in (("q", m[3], q_ranges), ("k", m[4], k_ranges)):
            want = sum(b - a for a, b in ranges[r])
            if got != want:
                raise ValueError(
                    f"context_parallel_attention(): rank {r} holds {got} tokens of {name}, but the "
                    f"{layout} layout gives it {want} of {N if name == 'q' else S}: shard with "
                    f"shard_sequence(..., layout={layout!r})."
                )
    pattern.check(N, S)
    if pattern.batch_size is not None and pattern.batch_size != local.B:
        raise ValueError(
            f"context_parallel_attention(): expected the pattern's batch size to equal B={local.B}, "
            f"but got {pattern!r}."
        )
    if mask is not None:
        _check_mask(mask, local.B, local.H, N, S)
    plan = _Plan(g, pattern, N, S, q_ranges, k_ranges, layout)
    chosen = _choose(method, plan, local, mask, metas, key)
    if chosen == "all_to_all":
        return _all_to_all_attention(q, k, v, plan, mask, local.scale, return_lse)
    out, lse = _Ring.apply(q, k, v, plan, mask, local.scale)
    return (out, lse.to(lse_dtype(q.dtype))) if return_lse else out


def _check_mask(mask: Tensor, B: int, H: int, N: int, S: int) -> None:
    ok = mask.dim() <= 4 and (mask.dtype == torch.bool or mask.is_floating_point())
    if ok:
        try:
            ok = torch.broadcast_shapes(tuple(mask.shape), (B, H, N, S)) == (B, H, N, S)
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(
            f"context_parallel_attention(): expected mask to be a bool or float tensor broadcastable "
            f"to the whole (B, H, N, S) = {(B, H, N, S)}, but got {mask.dtype} "
            f"mask.shape={tuple(mask.shape)}."
        )


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


def _choose(method: str, plan: _Plan, inp, mask, metas: list[list[int]], key: tuple) -> str:
    """The method this call runs. ``auto`` reuses a measured choice only when every rank holds
    the same one (``metas[r][-1]``, exchanged with the call description); otherwise all ranks
    measure together, so a rank that cleared its caches cannot leave the others waiting."""
    P = plan.g.size
    if method == "all_to_all" and inp.H % P:
        raise ValueError(
            f"context_parallel_attention(): method='all_to_all' shards heads, so it needs H divisible "
            f"by the {P} ranks, but got H={inp.H}. Use method='ring' (any H)."
        )
    if method != "auto":
        return method
    if P == 1 or inp.H % P:
        return "ring"
    held = {m[-1] for m in metas}
    if len(held) == 1 and (index := held.pop()) >= 0:
        return METHODS[index]
    chosen = _measure(plan, inp, mask)
    _METHODS.put(key, chosen)
    return chosen


#: Who sends what to whom, per (pattern, N, S, layout ranges); the layouts BalancedLayout chose.
_LINKS = caches.register("context_parallel_links", 16 * caches.MiB)
_BALANCED = caches.register("context_parallel_layouts", caches.MiB)
#: ``method="auto"``'s measured choice per call signature (shapes, dtype, device, ranks,
#: pattern, layout, mask shape); inspect or clear it with :mod:`attnkit.caches`.
_METHODS = caches.register("context_parallel", caches.MiB, size=lambda _: 256)


def _measure(plan: _Plan, inp, mask) -> str:
    """Time each method's forward on this call's inputs (attnkit's timing policy: warmed up,
    then in turns, the fastest of three); every rank takes the slowest rank's time of each, so
    all choose alike."""
    runs = {
        "ring": lambda: _Ring.apply(inp.q, inp.k, inp.v, plan, mask, inp.scale),
        "all_to_all": lambda: _all_to_all_attention(inp.q, inp.k, inp.v, plan, mask, inp.scale, False),
    }
    sync = (lambda: torch.cuda.synchronize(inp.device)) if inp.device.type == "cuda" else None
    with torch.no_grad():
        timed = time_in_turns(runs, repeats=3, sync=sync)
    mine = plan.g.tensor([timed[name].best for name in runs], torch.float64)
    got = _exchange_all(
        plan.g, [mine] * plan.g.size, lambda r: (2,), torch.float64, "the method timing", 7 << 20
    )
    slowest = torch.stack(got).amax(0)
    return "ring" if slowest[0] <= slowest[1] else "all_to_all"


# --------------------------------------------------------------------------- ring
def _offsets(ranges) -> list[int]:
    out, at = [], 0
    for a, b in ranges:
        out.append(at)
        at += b - a
    return out


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
    h, w = rows[1] - rows[0], keys[1] - keys[0]
    return crop(pattern, n, s, rows, keys).block_map(h, w, (min(h, c), min(w, c))).states != EMPTY


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
        live = _live_tiles(plan.pattern, plan.N, plan.S, (row_lo, row_hi), (lo, hi), c)
        first, last = (piece.lo - lo) // c, (piece.hi - 1 - lo) // c
        for column in range(first, last + 1):
            keys = (max(piece.lo, lo + column * c), min(piece.hi, lo + (column + 1) * c))
            for x in live[:, column].nonzero().flatten().tolist():
                yield inputs(i, (row_lo + x * c, min(row_lo + (x + 1) * c, row_hi)), keys)


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


#: Tag offsets that keep the ring's key/value, gradient and all-to-all transfers apart.
_GRADIENT_TAGS = 1 << 28
_ALL_TO_ALL_TAGS = 2 << 28


# --------------------------------------------------------------------------- all-to-all
def _all_to_all_attention(q, k, v, plan: _Plan, mask, scale, return_lse):
    P, me = plan.g.size, plan.g.rank
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv % P:  # this rank's query heads need key heads that other ranks need too: expand
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    qh = _SeqToHeads.apply(q, plan.q_ranges, plan.g)
    kh = _SeqToHeads.apply(k, plan.k_ranges, plan.g)
    vh = _SeqToHeads.apply(v, plan.k_ranges, plan.g)
    mh = None
    if mask is not None:
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        per = H // P
        mh = m[:, me * per : (me + 1) * per] if m.shape[1] > 1 else m
    res = functional.attention(qh, kh, vh, pattern=plan.pattern, mask=mh, scale=scale, return_lse=return_lse)
    if return_lse:
        out_h, lse_h = res
        lse = _SeqToHeads.apply(lse_h[..., None], plan.q_ranges, plan.g, True)[..., 0]
        return _SeqToHeads.apply(out_h, plan.q_ranges, plan.g, True), lse
    return _SeqToHeads.apply(res, plan.q_ranges, plan.g, True)


class _SeqToHeads(torch.autograd.Function):
    """``(B, X, n_local, E)`` sequence-sharded <-> ``(B, X / P, n, E)`` head-sharded (``back``)."""

    @staticmethod
    def forward(ctx, x, ranges, g: _Group, back: bool = False):
        ctx.ranges, ctx.g, ctx.back = ranges, g, back
        return _swap(x, ranges, g, back)

    @staticmethod
    def backward(ctx, grad):
        return _swap(grad.contiguous(), ctx.ranges, ctx.g, not ctx.back), None, None, None


def _swap(x: Tensor, ranges, g: _Group, back: bool) -> Tensor:
    P, me = g.size, g.rank
    lengths = [sum(b - a for a, b in r) for r in ranges]
    if not back:  # send head chunk r of my tokens to rank r; receive my head chunk of theirs
        B, X, _, E = x.shape
        chunks = [c.contiguous() for c in x.chunk(P, 1)]
        shape = lambda r: (B, X // P, lengths[r], E)  # noqa: E731
        got = _exchange_all(g, chunks, shape, x.dtype, "all_to_all (sequence to heads)")
        full = torch.cat(got, 2)
        return _reorder(full, ranges, to_global=True)
    B, Xp, _, E = x.shape
    ordered = _reorder(x, ranges, to_global=False)
    chunks = [c.contiguous() for c in ordered.split(lengths, 2)]
    got = _exchange_all(
        g, chunks, lambda r: (B, Xp, lengths[me], E), x.dtype, "all_to_all (heads to sequence)"
    )
    return torch.cat(got, 1)


def _reorder(x: Tensor, ranges, to_global: bool, dim: int = 2) -> Tensor:
    """Rank-concatenated order <-> whole-sequence order along ``dim`` (identity for layouts
    whose ranks hold one run each, in order)."""
    perm = [p for runs in ranges for a, b in runs for p in range(a, b)]
    if perm == list(range(len(perm))):
        return x
    index = torch.tensor(perm, device=x.device)
    if to_global:  # position perm[i] is at x's index i
        return x.index_select(dim, torch.argsort(index))
    return x.index_select(dim, index)


# --------------------------------------------------------------------------- transport
def communication_device(device: torch.device | str | None, group=None) -> torch.device:
    """The device of the small tensors a process group's collectives move (call descriptions,
    lengths, timings, flags): ``device`` (default: the current CUDA device) under NCCL, which
    moves only CUDA tensors; the CPU under every other backend (gloo)."""
    if dist.get_backend(group) == "nccl":
        if device is None:
            return torch.device("cuda", torch.cuda.current_device())
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(
                f"attnkit.distributed: the process group uses NCCL, which moves only CUDA tensors, "
                f"but the tensors are on device={device}; use the gloo backend for CPU tensors."
            )
        return device
    return torch.device("cpu")


@dataclass(frozen=True)
class _Group:
    """The transport: a process group, this rank, the timeout every wait honours, and the
    device of every tensor the transport itself creates (:func:`communication_device`)."""

    handle: dist.ProcessGroup | None
    rank: int
    size: int
    timeout: datetime.timedelta
    device: torch.device

    @staticmethod
    def of(group, timeout: float | None, device: torch.device | str | None) -> _Group:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "attnkit.distributed: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group(...) first (torchrun sets up its environment)."
            )
        if timeout is None:
            timeout = float(os.environ.get("ATTNKIT_DIST_TIMEOUT", "300"))
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(
                f"attnkit.distributed: expected timeout > 0 seconds, but got timeout={timeout!r}."
            )
        return _Group(
            group,
            dist.get_rank(group),
            dist.get_world_size(group),
            datetime.timedelta(seconds=timeout),
            communication_device(device, group),
        )

    def peer(self, r: int) -> int:
        """The global rank of group rank ``r`` (what point-to-point operations take)."""
        return r if self.handle is None else dist.get_global_rank(self.handle, r)

    def tensor(self, values: list, dtype: torch.dtype) -> Tensor:
        """A small message of ``values`` on the transport's device."""
        return torch.tensor(values, dtype=dtype, device=self.device)


def _wait(g: _Group, work, peer: int, what: str) -> None:
    try:
        work.wait(g.timeout)
    except RuntimeError as e:
        raise PeerError(
            f"attnkit.distributed: rank {g.rank} got no answer from rank {peer} during {what} within "
            f"{g.timeout.total_seconds():g} s (rank {peer} raised, died, or is not calling the same "
            f"operation): {str(e).splitlines()[0]}",
            peer,
        ) from e


class _Exchanges:
    """Point-to-point transfers posted ahead and waited for with a timeout that names the peer."""

    def __init__(self, g: _Group, what: str, tag_base: int = 0) -> None:
        self.g, self.what, self.tag_base = g, what, tag_base
        self.pending: dict[int, tuple[object, int, Tensor | None]] = {}
        self._count = 0

    def post(self, send=None, recv=None, step: int = 0, *, more: tuple = ()) -> list[int]:
        """Post ``send = (peer, tensor)``, ``recv = (peer, buffer)`` (either may be None) and
        ``more`` ``("send" | "recv", peer, tensor)`` operations as one batch (one NCCL group,
        so that a pair's sends and receives cannot wait on each other); return handles for
        :meth:`collect`."""
        ops = [
            *(() if recv is None else (("recv", *recv),)),
            *(() if send is None else (("send", *send),)),
            *more,
        ]
        if not ops:
            return []
        g, tag = self.g, self.tag_base + step
        p2p = [
            dist.P2POp(dist.irecv if kind == "recv" else dist.isend, t, g.peer(peer), g.handle, tag)
            for kind, peer, t in ops
        ]
        works = dist.batch_isend_irecv(p2p)
        if len(works) != len(ops):  # one coalesced request stands for the whole batch
            works = [works[-1]] * len(ops)
        handles = []
        for work, (kind, peer, t) in zip(works, ops, strict=True):
            self._count += 1
            self.pending[self._count] = (work, peer, t if kind == "recv" else None)
            handles.append(self._count)
        return handles

    def collect(self, handles: list[int]) -> Tensor | None:
        """Wait for the given transfers; return the buffer received among them, if any."""
        received = None
        for h in handles:
            work, peer, buf = self.pending.pop(h)
            _wait(self.g, work, peer, self.what)
            if buf is not None:
                received = buf
        return received

    def finish(self) -> list[tuple[int, Tensor]]:
        """Wait for everything still pending; return what was received, ``(peer, buffer)``."""
        got = []
        for work, peer, buf in self.pending.values():
            _wait(self.g, work, peer, self.what)
            if buf is not None:
                got.append((peer, buf))
        self.pending = {}
        return got


def _exchange_all(
    g: _Group, chunks: list[Tensor], shape_of, dtype, what: str, tag_base: int = _ALL_TO_ALL_TAGS
) -> list[Tensor]:
    """All-to-all by point-to-point: send ``chunks[r]`` to rank ``r``; return what each rank
    sent here (a buffer of ``shape_of(r)``), in rank order."""
    ex = _Exchanges(g, what, tag_base=tag_base)
    got: list[Tensor] = list(chunks)
    ops = []
    for r in range(g.size):
        if r != g.rank:
            got[r] = torch.empty(shape_of(r), dtype=dtype, device=chunks[0].device)
            ops += [("recv", r, got[r]), ("send", r, chunks[r])]
    ex.post(more=tuple(ops))
    ex.finish()
    return got


def _all_gather_seq(x: Tensor, dim: int, ranges, g: _Group, what: str) -> Tensor:
    xs = x.movedim(dim, 0).contiguous()
    lengths = [sum(b - a for a, b in r) for r in ranges]
    got = _exchange_all(g, [xs] * g.size, lambda r: (lengths[r], *xs.shape[1:]), x.dtype, what, 4 << 20)
    return _reorder(torch.cat(got, 0), ranges, to_global=True, dim=0).movedim(0, dim)


def _all_reduce_sum(x: Tensor, g: _Group, what: str) -> Tensor:
    got = _exchange_all(g, [x] * g.size, lambda r: x.shape, x.dtype, what, 5 << 20)
    return torch.stack(got).sum(0)


# --------------------------------------------------------------------------- agreement
def _describe(inp, pattern: Pattern, mask, layout, method: str) -> list[int]:
    """This rank's call description: ``[B, H, Hkv, N_local, S_local, D, Dv, dtype, layout,
    method, scale, pattern, mask]`` as integers (hashes for the pattern and layout)."""
    return [
        inp.B, inp.H, inp.Hkv, inp.N, inp.S, inp.D, inp.Dv, _DTYPES.index(inp.dtype),
        _fingerprint(layout), METHODS.index(method), struct.unpack("<q", struct.pack("<d", inp.scale))[0],
        _fingerprint(pattern), -1 if mask is None else len(mask.shape) * 1000 + int(mask.dtype == torch.bool),
    ]  # fmt: skip


_DESCRIBED = ["B", "H", "Hkv", None, None, "D", "Dv", "dtype", "layout", "method", "scale", "pattern", "mask"]


def _agree(g: _Group, mine: list[int], pattern: Pattern, layout) -> list[list[int]]:
    """Exchange every rank's description (:func:`_describe`, then fields that may differ, such
    as auto's cached choice); raise when ranks disagree on a described field. Returns each
    rank's list."""
    own = {"pattern": pattern, "layout": layout}
    t = g.tensor(mine, torch.int64)
    metas = [
        m.tolist()
        for m in _exchange_all(g, [t] * g.size, lambda r: t.shape, torch.int64, "the shape check", 3 << 20)
    ]
    for r, m in enumerate(metas):
        for i, name in enumerate(_DESCRIBED):
            if name is not None and m[i] != mine[i]:
                raise ValueError(
                    f"context_parallel_attention(): ranks disagree on {name}: rank {g.rank} has "
                    f"{_show(name, mine[i], own)} but rank {r} has {_show(name, m[i], None)}. "
                    f"Every rank must make the same call on its own shard."
                )
    return metas


def _show(name: str, value: int, own: dict | None) -> str:
    """A description field for a message; ``own`` holds this rank's pattern and layout
    (the other ranks' are known only by their hash)."""
    if name == "dtype":
        return str(_DTYPES[value])
    if name == "method":
        return repr(METHODS[value])
    if name == "scale":
        return f"{struct.unpack('<d', struct.pack('<q', value))[0]:.6g}"
    if name in ("pattern", "layout"):
        return repr(own[name]) if own is not None else f"another {name}"
    return str(value)


def _fingerprint(pattern: Pattern) -> int:
    """A hash of the pattern that is the same in every process (``hash()`` is salted)."""
    h = hashlib.sha256()

    def feed(p):
        h.update(type(p).__name__.encode())
        if dataclasses.is_dataclass(p):
            for f in dataclasses.fields(p):
                feed(getattr(p, f.name))
        elif hasattr(p, "parts"):
            for part in p.parts:
                feed(part)
        elif isinstance(p, Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(p, (tuple, list)):
            for x in p:
                feed(x)
        else:
            h.update(repr(p).encode())

    feed(pattern)
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def _check_layout(layout) -> None:
    if not isinstance(layout, BalancedLayout) and layout not in LAYOUTS:
        raise ValueError(
            f"attnkit.distributed: expected layout in {LAYOUTS} or a BalancedLayout, but got "
            f"layout={layout!r}."
        )
