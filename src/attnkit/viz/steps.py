"""``attnkit explain --steps``: the self-attention computation of one real head, with numbers.

From what :func:`~attnkit.viz.record` captured for one layer (its input ``x`` and the head's
queries, keys, values and output), the head is recomputed from scratch in float64: Q, K and V
as projections of ``x`` with the layer's own weights, ``Q Kᵀ``, the division by √d_k, the
softmax and the weighted sum of V. The result is then compared with the head output that the
model itself computed.
"""

from __future__ import annotations

import math

import torch

from ..nn import MultiHeadAttention
from .record import AttentionRecord
from .walkthrough import Walkthrough

__all__ = ["head_walkthrough"]


def _head_rows(linear: torch.nn.Linear, head: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = slice(head * width, (head + 1) * width)
    w = linear.weight[rows].detach().double()
    b = None if linear.bias is None else linear.bias[rows].detach().double()
    return w, b


def head_walkthrough(
    model: torch.nn.Module, rec: AttentionRecord, layer: int, head: int, *, text: str = "", batch: int = 0
) -> Walkthrough:
    """The walk-through of ``head`` (an index into ``rec.heads``) of recorded ``layer``.

    ``rec`` must come from ``record(model, capture_inputs=True)``. For layers with rotary
    position embeddings, Q and K are the projections after the rotation the layer applies
    (taken from the capture); V is always recomputed from ``x``."""
    if not rec.captures:
        raise ValueError("head_walkthrough: the record has no captures; record with capture_inputs=True.")
    cap = rec.captures[layer]
    module = dict(model.named_modules()).get(rec.layers[layer])
    if not isinstance(module, MultiHeadAttention) or cap.x is None:
        raise ValueError(
            f"head_walkthrough: layer {rec.layers[layer]!r} is not an attnkit MultiHeadAttention."
        )
    h = rec.heads[head]
    D = cap.q.shape[-1]
    kv_head = h // (module.num_heads // module.num_kv_heads)
    x = cap.x[batch].double()

    def proj(linear: torch.nn.Linear, index: int) -> torch.Tensor:
        w, b = _head_rows(linear, index, D)
        return x @ w.T if b is None else x @ w.T + b

    v = proj(module.v_proj, kv_head)
    if module.rotary is None:
        q, k = proj(module.q_proj, h), proj(module.k_proj, kv_head)
    else:
        q, k = cap.q[batch, head].double(), cap.k[batch, head].double()
    scores = q @ k.T
    scaled = scores / math.sqrt(D)
    if cap.bias is not None:
        scaled = scaled + cap.bias[batch]
    allowed = cap.allowed[batch]
    scaled = scaled.masked_fill(~allowed, float("-inf"))
    weights = scaled.softmax(-1).nan_to_num(0.0)
    out = weights @ v
    model_out = cap.out[batch, head].double()
    tokens = rec.tokens or [str(i) for i in range(x.shape[0])]
    return Walkthrough(
        text=text, tokens=tokens, x=x, q=q, k=k, v=v, scores=scores, scaled=scaled, weights=weights, out=out,
        causal=not bool(allowed.all()), check_error=(out - model_out).abs().max().item(),
        title=f"Layer {layer} ({rec.layers[layer]}), head {h} of {rec.model}, step by step",
        x_note="the layer's input: the model's hidden state of the token",
        check_label=f"the model's own output of this head ({module.backend!r} backend) is the same",
    )  # fmt: skip
