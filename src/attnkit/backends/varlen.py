"""The ``varlen`` backend: windows, causal masks and packed documents on torch's ``varlen_attn``.

``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.12, CUDA) runs FlashAttention on packed
sequences: cumulative sequence offsets cut the token axis into independent segments, and a
``window_size=(left, right)`` limits each query to the keys ``left`` before and ``right`` after
its own position (bottom-right aligned when a segment's query and key lengths differ, -1 for
no limit). That is exactly what ``SlidingWindow``, ``Causal``, ``Document`` and their
intersections say, so they run on it with no mask at all:

==========================================  ============================================
attnkit pattern                             varlen_attn call
==========================================  ============================================
``SlidingWindow(b, a)``                     one segment per batch item, window ``(b, a)``
``Causal()``                                window ``(-1, 0)``
``Document(lengths)`` (``N == S``)          one segment per document per batch item
``Document(lengths) & Causal()``            the same, window ``(-1, 0)``
``Document(lengths) & SlidingWindow(b)``    the same, window ``(b, 0)``
==========================================  ============================================

Windows combine by intersection (the smaller reach on each side). ``align="top_left"`` is
accepted only where it equals bottom-right (``N == S``). :func:`varlen_layout` does the
translation and says why a pattern does not fit.

Supports: float16/bfloat16 on CUDA, GQA (``enable_gqa``), ``N != S`` without documents, the
log-sum-exp, autograd. Declines everything else (other patterns, mask or bias tensors, dropout,
weights, float32/float64, CPU), each with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns import And, Causal, Document, Full, Pattern, SlidingWindow
from .base import AttentionInputs, AttentionResult, Backend

__all__ = ["VarlenBackend", "VarlenLayout", "varlen_layout"]


@dataclass(frozen=True)
class VarlenLayout:
    """How one ``(B, N, S)`` attention maps onto ``varlen_attn``.

    Attributes:
        window: ``(left, right)`` reach of each query, ``-1`` for unlimited.
        cu_q: Cumulative query offsets of the packed segments, ``(segments + 1,)``.
        cu_k: Cumulative key offsets, ``(segments + 1,)``.
        max_q: Longest query segment.
        max_k: Longest key segment.
    """

    window: tuple[int, int]
    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    max_q: int
    max_k: int


def varlen_layout(pattern: Pattern | None, batch: int, n: int, s: int) -> VarlenLayout | str:
    """The :class:`VarlenLayout` of ``pattern`` for ``batch`` items of ``(n, s)``, or the reason
    (a str) why ``varlen_attn`` cannot express it."""
    parts = pattern.parts if isinstance(pattern, And) else (() if pattern is None else (pattern,))
    if parts and n > s:
        return f"N={n} > S={s}: bottom-right alignment leaves early queries with no key"
    left = right = -1
    documents: tuple[int, ...] | None = None

    def tighter(current: int, reach: int) -> int:
        return reach if current < 0 else min(current, reach)

    for p in parts:
        if isinstance(p, Full):
            continue
        if isinstance(p, (Causal, SlidingWindow, Document)) and p.align == "top_left" and n != s:
            return f"{p!r} with align='top_left' and N != S (varlen_attn aligns bottom-right)"
        if isinstance(p, Causal):
            right = tighter(right, 0)
        elif isinstance(p, SlidingWindow):
            left, right = tighter(left, p.before), tighter(right, p.after)
        elif isinstance(p, Document) and documents is None:
            if n != s:
                return f"{p!r} with N={n} != S={s} (varlen_attn packs self-attention documents)"
            documents = p.lengths
        else:
            return f"pattern {p!r} is not a window, causal or document mask"
    q_lengths, k_lengths = (documents, documents) if documents is not None else ((n,), (s,))
    cu_q, cu_k = [0], [0]
    for _ in range(batch):
        for lq, lk in zip(q_lengths, k_lengths, strict=True):
            cu_q.append(cu_q[-1] + lq)
            cu_k.append(cu_k[-1] + lk)
    return VarlenLayout((left, right), tuple(cu_q), tuple(cu_k), max(q_lengths), max(k_lengths))


def _varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the torch build
        return False
    return True


class VarlenBackend(Backend):
    name = "varlen"
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16})
    supports_lse = True

    @classmethod
    def unsupported_reasons(cls, inp: AttentionInputs) -> list[str]:
        reasons = super().unsupported_reasons(inp)
        if not _varlen_available():
            reasons.append("this torch has no torch.nn.attention.varlen (torch >= 2.12)")
        if inp.mask is not None or inp.bias is not None:
            reasons.append("a mask or bias tensor is not supported")
        layout = varlen_layout(inp.pattern, inp.B, inp.N, inp.S)
        if isinstance(layout, str):
            reasons.append(layout)
        return reasons

    @classmethod
    def auto_reasons(cls, inp: AttentionInputs) -> list[str]:
        p = inp.pattern
        if p is None or isinstance(p, Full) or (isinstance(p, Causal) and inp.N == inp.S):
            return [f"pattern {p!r} runs natively on sdpa"]
        return []

    @classmethod
    def forward(cls, inp: AttentionInputs) -> AttentionResult:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn

        layout = varlen_layout(inp.pattern, inp.B, inp.N, inp.S)
        assert not isinstance(layout, str), layout
        B, H, N = inp.B, inp.H, inp.N

        def packed(t: torch.Tensor) -> torch.Tensor:  # (B, h, L, d) -> (B * L, h, d)
            return t.transpose(1, 2).reshape(B * t.shape[2], t.shape[1], t.shape[3])

        def offsets(cu: tuple[int, ...]) -> torch.Tensor:
            return torch.tensor(cu, dtype=torch.int32, device=inp.device)

        result = varlen_attn(
            packed(inp.q),
            packed(inp.k),
            packed(inp.v),
            offsets(layout.cu_q),
            offsets(layout.cu_k),
            layout.max_q,
            layout.max_k,
            scale=inp.scale,
            window_size=layout.window,
            enable_gqa=inp.G > 1,
            return_aux=AuxRequest(lse=True) if inp.return_lse else None,
        )
        out, lse = result if inp.return_lse else (result, None)
        out = out.view(B, N, H, inp.Dv).transpose(1, 2)
        if lse is not None:
            # (H, T_q): the layout of FlashAttention's varlen kernels and of torch's own fake
            # implementation of the op (what torch.compile traces); the docstring's (T_q, H)
            # disagrees with both. Read by that layout, never guessed from the shape (which is
            # ambiguous when H == B * N).
            if tuple(lse.shape) != (H, B * N):
                raise RuntimeError(
                    f"varlen: expected varlen_attn's lse of shape (H, B*N)=({H}, {B * N}), but got "
                    f"{tuple(lse.shape)}; this torch changed its layout"
                )
            lse = lse.view(H, B, N).transpose(0, 1)
        return AttentionResult(out, None, lse)
