"""Across layers and against patterns: attention rollout, and the mass a pattern takes away.

* :func:`rollout` -- attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in
  Transformers", https://arxiv.org/abs/2005.00928): each layer's head-averaged weights, mixed
  half and half with the identity for the residual connection and renormalized, multiplied
  from the first layer to the last. Entry ``(i, j)`` is how much of input token ``j`` reaches
  position ``i`` at the top by this account.
* :func:`lost_mass` -- for each layer and head, the share of its *dense* attention weights that
  falls outside a pattern: what the head gives up when it runs with that pattern.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..patterns import Pattern
from .record import AttentionRecord

__all__ = ["lost_mass", "rollout"]


def rollout(rec: AttentionRecord, *, residual: float = 0.5) -> Tensor:
    """Attention rollout ``(B, N, N)`` of a recorded self-attention stack.

    Args:
        rec: A record of every head of every layer, in the order they ran (layers of one
            sequence length: self-attention).
        residual: Weight of the identity mixed into each layer (0.5 in the paper).

    Raises:
        ValueError: Not all heads were recorded, the layers' shapes differ, or ``residual`` is
            outside ``[0, 1]``.
    """
    if not 0 <= residual <= 1:
        raise ValueError(f"rollout: expected 0 <= residual <= 1, but got residual={residual!r}.")
    if not rec.weights:
        raise ValueError("rollout: the record holds no layers.")
    if len(rec.heads) != rec.num_heads:
        raise ValueError(
            f"rollout: expected every head recorded ({rec.num_heads}), but got heads={rec.heads}."
        )
    shapes = {tuple(w.shape) for w in rec.weights}
    if len(shapes) != 1 or rec.weights[0].shape[-1] != rec.weights[0].shape[-2]:
        raise ValueError(f"rollout: expected self-attention layers of one shape, but got {sorted(shapes)}.")
    B, _, N, _ = rec.weights[0].shape
    eye = torch.eye(N, dtype=torch.float64).expand(B, N, N)
    flow = eye
    for w in rec.weights:
        a = residual * eye + (1 - residual) * w.double().mean(1)
        a = a / a.sum(-1, keepdim=True)
        flow = a @ flow
    return flow


def lost_mass(dense: AttentionRecord, patterns: Sequence[Pattern | None]) -> Tensor:
    """``(L, h)``: per recorded layer and head, the share of the dense weights outside the
    layer's pattern (``PerHead`` patterns per head), averaged over the query rows.

    Args:
        dense: A record of the model run *without* the patterns.
        patterns: One pattern per recorded layer (None: nothing lost).
    """
    if len(patterns) != len(dense.weights):
        raise ValueError(
            f"lost_mass: expected one pattern per recorded layer ({len(dense.weights)}), but got "
            f"{len(patterns)}."
        )
    out = []
    for w, pattern in zip(dense.weights, patterns, strict=True):
        h, N, S = w.shape[1:]
        if pattern is None:
            out.append(torch.zeros(h))
            continue
        allowed = pattern.to_dense(N, S)
        if pattern.per_head:
            allowed = allowed[:, dense.heads]
        allowed = allowed.reshape(-1, allowed.shape[-3] if allowed.dim() == 4 else 1, N, S)
        kept = (w.double() * allowed).sum(-1)  # (B, h, N)
        seen = w.sum(-1) > 0
        lost = torch.where(seen, 1 - kept, torch.zeros_like(kept))
        out.append((lost.sum((0, 2)) / seen.sum((0, 2)).clamp(min=1)).float())
    return torch.stack(out)
