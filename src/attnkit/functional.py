"""``attention()``: scaled dot-product attention with patterns, masks and pluggable backends.

Shape legend (used everywhere in attnkit)::

    B  batch            H   query heads        Hkv  key/value heads (G = H // Hkv)
    N  query length     S   key/value length   D    head dim (q, k)    Dv  value head dim
    C  model width = H * D                     V    vocab size
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch
from torch import Tensor

from . import backends
from .backends._dropout import draw_seed
from .backends.base import FLOAT_DTYPES, AttentionInputs, AttentionResult
from .patterns import Pattern

__all__ = ["attention"]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: Pattern | None = None,
    mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, ...]:
    """Scaled dot-product attention, ``softmax(q @ k^T * scale + bias, masked) @ v``.

    Args:
        q: Queries, ``(B, H, N, D)``.
        k: Keys, ``(B, Hkv, S, D)``. ``H`` must be a multiple of ``Hkv``: ``Hkv == H`` is
            multi-head, ``Hkv == 1`` multi-query, anything between grouped-query attention.
        v: Values, ``(B, Hkv, S, Dv)``.
        pattern: A :class:`attnkit.patterns.Pattern` saying which keys each query may see;
            sparse backends skip what it hides. With ``N != S``, ``Causal()`` aligns the last
            query with the last key (bottom-right, as a KV-cache decode needs), unlike torch's
            ``is_causal=True`` (top-left); ``Causal(align="top_left")`` is torch's.
        mask: Either a bool tensor broadcastable to ``(B, H, N, S)`` (``True`` = may
            attend), ANDed with ``pattern``; or a float tensor broadcastable to
            ``(B, H, N, S)`` added to the scores (ALiBi, relative-position bias); gradients
            flow into it. ``-inf`` entries hide keys.
        scale: Multiplier of ``q @ k^T``; default ``D ** -0.5``.
        dropout_p: Probability of zeroing an attention weight (the rest are scaled by
            ``1 / (1 - dropout_p)``). Pass 0.0 at evaluation time. Reproducible under
            ``torch.manual_seed``.
        return_weights: Also return the attention weights ``(B, H, N, S)`` (the weights
            applied to ``v``, after dropout). Only the ``reference`` backend can.
        return_lse: Also return the row log-sum-exp of the scaled, masked scores,
            ``(B, H, N)``, float32 (float64 for float64 inputs), ``-inf`` for rows that see
            nothing. It carries no gradient.
        backend: ``"auto"`` (the fastest backend that supports the inputs) or a name from
            :func:`attnkit.backends.available`.

    Returns:
        ``out`` ``(B, H, N, Dv)`` in ``q.dtype``; or a tuple ``(out, weights)``,
        ``(out, lse)`` or ``(out, weights, lse)`` as requested.

    A query that may attend to no key gets output 0 and gradient 0. Half-precision inputs
    accumulate in float32.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: Shapes, dtypes, devices or values are inconsistent.
        NotImplementedError: The requested backend cannot run these inputs; the message lists
            every backend's reasons.

    Reference (slow; materializes ``(B, H, N, S)``)::

        scores = q @ k.repeat_interleave(H // Hkv, 1).mT * scale + bias  # (B, H, N, S)
        scores = scores.masked_fill(~(pattern.to_dense(N, S) & mask), float("-inf"))
        out = scores.softmax(-1).nan_to_num(0.0) @ v.repeat_interleave(H // Hkv, 1)

    Example:
        >>> from attnkit import attention, patterns
        >>> q = k = v = torch.randn(2, 8, 128, 64)
        >>> attention(q, k, v, pattern=patterns.Causal()).shape
        torch.Size([2, 8, 128, 64])
    """
    inp = build_inputs(
        q, k, v, pattern=pattern, mask=mask, scale=scale, dropout_p=dropout_p,
        return_weights=return_weights, return_lse=return_lse,
    )  # fmt: skip
    if inp.pattern is not None and inp.pattern.per_head:
        result = _per_head(inp, backend)
    else:
        result = backends.select(inp, backend).forward(inp)
    extras = []
    if return_weights:
        extras.append(result.weights)
    if return_lse:
        extras.append(result.lse)
    return (result.out, *extras) if extras else result.out


def build_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: Pattern | None = None,
    mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    return_lse: bool = False,
) -> AttentionInputs:
    """Validate :func:`attention`'s arguments into :class:`AttentionInputs` (see there)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention(): expected {name} to be a Tensor, but got {type(t).__name__}.")
        if t.dim() != 4:
            want = {"q": "(B, H, N, D)", "k": "(B, Hkv, S, D)", "v": "(B, Hkv, S, Dv)"}[name]
            raise ValueError(
                f"attention(): expected {name} to be 4-D {want}, but got "
                f"{name}.shape={tuple(t.shape)}. Heads come before the sequence: use "
                f"x.view(B, N, H, D).transpose(1, 2)."
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"attention(): expected {name} to be float16, bfloat16, float32 or float64, "
                f"but got {name}.dtype={t.dtype}."
            )
        if 0 in t.shape:
            raise ValueError(
                f"attention(): expected every dimension of {name} to be >= 1, but got "
                f"{name}.shape={tuple(t.shape)}."
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"attention(): expected q, k and v to share one dtype, but got q.dtype={q.dtype}, "
            f"k.dtype={k.dtype}, v.dtype={v.dtype}."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"attention(): expected q, k and v on one device, but got q on {q.device}, "
            f"k on {k.device}, v on {v.device}."
        )
    B, H, N, D = q.shape
    problems = []
    if k.shape[0] != B or v.shape[0] != B:
        problems.append(f"the same batch size B (q: {B}, k: {k.shape[0]}, v: {v.shape[0]})")
    if k.shape[1] != v.shape[1]:
        problems.append(f"k and v to have the same Hkv (k: {k.shape[1]}, v: {v.shape[1]})")
    if k.shape[2] != v.shape[2]:
        problems.append(f"k and v to have the same S (k: {k.shape[2]}, v: {v.shape[2]})")
    if k.shape[3] != D:
        problems.append(f"q and k to have the same D (q: {D}, k: {k.shape[3]})")
    if problems:
        raise ValueError(
            "attention(): expected " + "; ".join(problems) + f", but got q.shape={tuple(q.shape)}, "
            f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}."
        )
    Hkv, S = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(
            f"attention(): expected H to be a multiple of Hkv, but got H={H} "
            f"(q.shape={tuple(q.shape)}) and Hkv={Hkv} (k.shape={tuple(k.shape)}). "
            f"For MQA use Hkv=1; for GQA pick Hkv dividing H."
        )

    if scale is None:
        scale = D**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"attention(): expected scale to be a finite float or None, but got {scale!r}.")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        raise ValueError(f"attention(): expected 0 <= dropout_p < 1, but got dropout_p={dropout_p!r}.")
    for name, flag in (("return_weights", return_weights), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"attention(): expected {name} to be a bool, but got {flag!r}.")

    if pattern is not None:
        if not isinstance(pattern, Pattern):
            raise TypeError(
                f"attention(): expected pattern to be an attnkit.patterns.Pattern, but got "
                f"{type(pattern).__name__}. Pass tensors as mask=."
            )
        pattern.check(N, S)
        if pattern.per_head and pattern.num_heads != H:
            raise ValueError(
                f"attention(): expected a PerHead pattern with one pattern per query head (H={H}), "
                f"but got {pattern.num_heads}."
            )
        if pattern.batch_size is not None and pattern.batch_size != B:
            raise ValueError(
                f"attention(): expected the pattern's batch size to equal B={B}, but got "
                f"{pattern!r} with {pattern.batch_size} batch items."
            )

    bool_mask = bias = None
    if mask is not None:
        if isinstance(mask, Pattern):
            raise TypeError("attention(): mask must be a Tensor; pass patterns as pattern=.")
        if not isinstance(mask, Tensor):
            raise TypeError(f"attention(): expected mask to be a Tensor, but got {type(mask).__name__}.")
        if mask.device != q.device:
            raise ValueError(f"attention(): expected mask on {q.device}, but got it on {mask.device}.")
        full = (B, H, N, S)
        shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
        if mask.dim() > 4 or any(m not in (1, f) for m, f in zip(shape, full, strict=True)):
            raise ValueError(
                f"attention(): expected mask to be broadcastable to (B, H, N, S)={full}, but "
                f"got mask.shape={tuple(mask.shape)}."
            )
        if mask.dtype == torch.bool:
            bool_mask = mask.view(shape)
        elif mask.is_floating_point():
            bias = mask.view(shape)
        else:
            raise ValueError(
                f"attention(): expected mask to be bool (True = may attend) or floating "
                f"(an additive bias), but got mask.dtype={mask.dtype}."
            )

    return AttentionInputs(
        q=q, k=k, v=v, pattern=pattern, mask=bool_mask, bias=bias, scale=float(scale),
        dropout_p=float(dropout_p), dropout_seed=draw_seed() if dropout_p > 0 else None,
        return_weights=return_weights, return_lse=return_lse,
    )  # fmt: skip


def _per_head(inp: AttentionInputs, backend: str) -> AttentionResult:
    """A :class:`~attnkit.patterns.PerHead` pattern: each distinct pattern runs on the heads
    that use it, in calls that keep GQA (:func:`_gqa_parts`), and the heads are put back in
    order."""
    results, order = [], []
    calls = [(p, part) for p, heads in inp.pattern.groups() for part in _gqa_parts(heads, inp.G)]
    for i, (pattern, heads) in enumerate(calls):
        sub = _heads_of(inp, pattern, heads, i)
        results.append(backends.select(sub, backend).forward(sub))
        order.extend(heads)
    if len(results) == 1:
        return results[0]
    inverse = torch.argsort(torch.tensor(order, device=inp.device))

    def merged(parts: list[Tensor | None]) -> Tensor | None:
        return None if parts[0] is None else torch.cat(parts, 1).index_select(1, inverse)

    return AttentionResult(
        merged([r.out for r in results]),
        merged([r.weights for r in results]),
        merged([r.lse for r in results]),
    )


def _gqa_parts(heads: tuple[int, ...], G: int) -> list[tuple[int, ...]]:
    """``heads`` (ascending query heads sharing a pattern, ``G`` query heads per key/value
    head) split so that in each part every key/value head serves the same number of them: each
    part then runs as one GQA call on its key/value heads, with no per-query-head copies. With
    ``G = 3``, heads ``1, 2, 3, 4, 5`` give ``(1, 2)`` (2 heads of key/value head 0) and
    ``(3, 4, 5)`` (all 3 of head 1)."""
    per_kv: dict[int, list[int]] = {}
    for h in heads:
        per_kv.setdefault(h // G, []).append(h)
    by_count: dict[int, list[int]] = {}
    for hs in per_kv.values():
        by_count.setdefault(len(hs), []).extend(hs)
    return [tuple(hs) for hs in by_count.values()]


def _heads_of(inp: AttentionInputs, pattern: Pattern, heads: tuple[int, ...], part: int) -> AttentionInputs:
    """``inp`` restricted to the query heads ``heads`` (ascending; every key/value head among
    theirs serves as many of them, see :func:`_gqa_parts`) under ``pattern``: their key/value
    heads, shared as GQA."""
    kv = sorted({h // inp.G for h in heads})

    def take(t: Tensor | None, index: list[int]) -> Tensor | None:
        if t is None or t.shape[1] == 1:
            return t
        if index == list(range(index[0], index[0] + len(index))):
            return t[:, index[0] : index[0] + len(index)]
        return t.index_select(1, torch.tensor(index, device=t.device))

    seed = inp.dropout_seed
    if seed is not None:  # another seed per call, so heads of different calls drop independently
        seed = (seed + 0x9E3779B1 * (part + 1)) % (2**31 - 1)
    return dataclasses.replace(
        inp,
        q=take(inp.q, list(heads)),
        k=take(inp.k, kv),
        v=take(inp.v, kv),
        pattern=pattern,
        mask=take(inp.mask, list(heads)),
        bias=take(inp.bias, list(heads)),
        dropout_seed=seed,
    )
