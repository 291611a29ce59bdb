"""The ``reference`` backend: materialized attention, the oracle every other backend answers to.

Algorithm: form the ``(B, H, N, S)`` scores, mask, softmax, multiply by ``V``; autograd provides
the backward (:func:`attnkit.backends._materialized.materialized`, the ``eager`` backend's body). Computes
everything in float64 (float32 on devices without float64), whatever the input dtype, and casts
the output back.

Supports: every device and float dtype, every pattern, boolean masks, float biases (with
gradients), dropout (the counter-based mask shared with ``tiled``), attention weights and the
log-sum-exp. Known limitations: memory and time are ``O(B * H * N * S)``; it is meant for
tests, visualization and small inputs.
"""

from __future__ import annotations

import torch

from ._materialized import materialized
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
        out, probs, lse = materialized(inp, ct, ct, want_lse=inp.return_lse)
        weights = probs.to(inp.dtype) if inp.return_weights else None
        return AttentionResult(out, weights, None if lse is None else lse.to(lse_dtype(inp.dtype)))
