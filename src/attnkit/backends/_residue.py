"""Periodic patterns, regrouped so that their periodic part becomes dense blocks.

A pattern that allows keys ``s`` apart (``Strided``, ``Dilated``) touches one key in every tile
of a long stretch: computed tile by tile, it costs almost as much as dense attention. The Sparse
Transformer's remedy (Child et al. 2019) is to regroup positions by their residue modulo ``s``:
listing position ``p`` as ``(p mod s, p div s)`` turns "keys whose offset is a multiple of
``s``" into "keys of the same residue class", a block-diagonal matrix whose blocks are ordinary
bands. For an offset-only pattern on ``N = S`` positions with allowed offsets ``D``,
:func:`residue_split` returns

* ``R``: the offsets in ``D`` that are multiples of ``s``, if they form one unbroken run
  ``s * [lo, hi]``; computed on the regrouped sequence as
  ``Document([N / s] * s) & OffsetRange(lo, hi)``;
* ``C``: the other offsets, computed as usual.

The two key sets are disjoint, so their partial attentions merge exactly through their
log-sum-exps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..patterns import Document, Pattern
from ..patterns.offsets import OffsetRange, Without

__all__ = ["regroup", "residue_split", "ungroup"]


def residue_split(pattern: Pattern, n: int, s: int) -> tuple[Pattern, Pattern, int] | None:
    """``(rest, regrouped, stride)`` for a periodic offset-only pattern, or ``None``.

    ``rest`` is computed as usual; ``regrouped`` on the sequences regrouped by residue modulo
    ``stride`` (see :func:`regroup`). ``None`` when the pattern has no such structure here.
    """
    if n != s or not pattern.is_toeplitz:
        return None
    t = torch.arange(-(n - 1), n)
    allowed = pattern._offset_rule(t, n, s)
    best = None
    for stride in sorted(set(pattern._periods())):
        if stride < 2 or n % stride:
            continue
        multiples = allowed & (torch.remainder(t, stride) == 0)
        m = torch.div(t[multiples], stride, rounding_mode="floor")
        if m.numel() < 2:
            continue
        lo, hi = int(m.min()), int(m.max())
        if m.numel() != hi - lo + 1:  # not one unbroken run of multiples
            continue
        if best is None or m.numel() > best[3]:
            best = (stride, lo, hi, m.numel())
    if best is None:
        return None
    stride, lo, hi, _ = best
    classes = Document((n // stride,) * stride)
    return Without(pattern, stride, lo, hi), classes & OffsetRange(lo, hi), stride


def regroup(x: Tensor, stride: int) -> Tensor:
    """``(B, H, N, ...)`` with positions listed by residue: ``p`` moves to
    ``(p % stride) * (N / stride) + p // stride``."""
    B, H, N = x.shape[:3]
    rest = x.shape[3:]
    return x.reshape(B, H, N // stride, stride, *rest).transpose(2, 3).reshape(B, H, N, *rest)


def ungroup(x: Tensor, stride: int) -> Tensor:
    """The inverse of :func:`regroup` (trailing dims after ``N`` may be anything)."""
    B, H, N = x.shape[:3]
    rest = x.shape[3:]
    return x.reshape(B, H, stride, N // stride, *rest).transpose(2, 3).reshape(B, H, N, *rest)
