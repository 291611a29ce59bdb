"""The ``reference`` backend: materialized attention, the oracle every other backend answers to.

Algorithm: form the ``(B, H, N, S)`` scores, mask, softmax with a detached row maximum,
multiply by ``V``; autograd provides the backward. Computes in float64 (float32 on devices
without float64), whatever the input dtype, and casts the output back.

Supports: every device and float dtype, every pattern, boolean masks, float biases (with
gradients), dropout (the counter-based mask shared with ``tiled``), attention weights and the
log-sum-exp. Known limitations: memory and time are ``O(B * H * N * S)``; it is meant for
tests, visualization and small inputs.
"""

from __future__ import annotations

import torch

from . import _rows
from ._dropout import keep_grid
from ._masks import dense_allowed
from .base import AttentionInputs, AttentionResult, Backend, lse_dtype

__all__ = ["ReferenceBackend"]


class ReferenceBackend(Backend):
    name = "reference"
    supports_dropout = True
    supports_weights = True
    supports_lse = True

    @classmethod
    def forward(cls, inp: AttentionInputs) -> AttentionResult:
        ct = torch.float32 if inp.device.type == "mps" else torch.float64
        q, k, v = inp.q.to(ct), inp.k.to(ct), inp.v.to(ct)
        if inp.G > 1:  # GQA / MQA: each group of G query heads shares one key/value head
            k = k.repeat_interleave(inp.G, dim=1)
            v = v.repeat_interleave(inp.G, dim=1)
        scores = torch.einsum("bhnd,bhsd->bhns", q, k) * inp.scale  # (B, H, N, S)
        if inp.bias is not None:
            scores = scores + inp.bias.to(ct)
        allowed = dense_allowed(inp)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        # Softmax is shift-invariant, so the row maximum carries no gradient. Rows with no
        # finite score (everything masked) get shift 0, weights 0 and log-sum-exp -inf.
        row_max = _rows.shift(scores.amax(-1).detach())
        e = torch.exp(scores - row_max[..., None])
        denom = e.sum(-1)
        probs = _rows.normalize(e, denom)
        if inp.dropout_p > 0:
            B, H, N, S = probs.shape
            dev = probs.device
            keep = keep_grid(
                inp.dropout_seed, inp.dropout_p, *(torch.arange(x, device=dev) for x in (B, H, N, S))
            )
            probs = probs * keep / (1.0 - inp.dropout_p)
        out = torch.einsum("bhns,bhsd->bhnd", probs, v).to(inp.dtype)
        weights = probs.to(inp.dtype) if inp.return_weights else None
        lse = None
        if inp.return_lse:
            lse = _rows.lse_from(row_max, denom).to(lse_dtype(inp.dtype))
        return AttentionResult(out, weights, lse)
