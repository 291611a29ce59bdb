""":func:`context_parallel_attention` and the model wiring on top of it.

A call checks that every rank agrees on what it computes (shapes, dtype, pattern, layout,
method: the call description, exchanged through the transport), plans who sends what, chooses
the method (``auto`` measures once per call signature, all ranks together) and runs the ring
or all-to-all. :class:`ContextParallel` and :func:`set_context_parallel` give models the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import caches, functional
from .._timing import time_in_turns
from ..backends.base import lse_dtype
from ..patterns import Full, Pattern
from .all_to_all import _all_to_all_attention
from .layouts import BalancedLayout, _check_layout, gather_sequence, shard_ranges, shard_sequence
from .ring import _Plan, _Ring
from .transport import _exchange_all, _Group

METHODS = ("auto", "ring", "all_to_all")


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
