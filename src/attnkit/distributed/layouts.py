"""How a sequence is cut across ranks: layouts, sharding, gathering.

A layout gives each rank runs ``[start, stop)`` of the sequence (:func:`shard_ranges`):
``contiguous``, ``zigzag`` (balances causal work) or a :class:`BalancedLayout` (balances any
pattern's, from its block map). :func:`shard_sequence`/:func:`gather_sequence` move between a
whole tensor and a rank's shard along the sequence axis (:func:`sequence_dim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import caches
from ..patterns import EMPTY, Pattern
from .transport import _all_reduce_sum, _exchange_all, _Group

LAYOUTS = ("contiguous", "zigzag")


#: Per rank, the ``[start, stop)`` runs of the sequence it holds (see :func:`shard_ranges`).
Ranges = tuple[tuple[tuple[int, int], ...], ...]


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


_BALANCED = caches.register("context_parallel_layouts", caches.MiB)


# --------------------------------------------------------------------------- ring
def _offsets(ranges) -> list[int]:
    out, at = [], 0
    for a, b in ranges:
        out.append(at)
        at += b - a
    return out


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


def _all_gather_seq(x: Tensor, dim: int, ranges, g: _Group, what: str) -> Tensor:
    xs = x.movedim(dim, 0).contiguous()
    lengths = [sum(b - a for a, b in r) for r in ranges]
    got = _exchange_all(g, [xs] * g.size, lambda r: (lengths[r], *xs.shape[1:]), x.dtype, what, 4 << 20)
    return _reorder(torch.cat(got, 0), ranges, to_global=True, dim=0).movedim(0, dim)


def _check_layout(layout) -> None:
    if not isinstance(layout, BalancedLayout) and layout not in LAYOUTS:
        raise ValueError(
            f"attnkit.distributed: expected layout in {LAYOUTS} or a BalancedLayout, but got "
            f"layout={layout!r}."
        )
