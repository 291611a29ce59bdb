"""Attention through the full ``(B, H, N, S)`` score matrix, in torch operators.

The body of the ``eager`` backend (at the inputs' dtype) and of the ``reference`` oracle (in
float64), and what the tuning module times against torch's fused kernel to find the length up
to which ``eager`` trains faster. Autograd differentiates it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dropout import keep_grid
from ._masks import dense_allowed
from .base import AttentionInputs

__all__ = ["materialized", "matmul_dtype"]


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``eager`` multiplies in: the inputs' own, except float16, whose range ends at
    65504, which an unscaled ``q @ k^T`` of large logits passes (float32 then)."""
    return torch.float32 if dtype == torch.float16 else dtype


def materialized(
    inp: AttentionInputs, matmul_dtype: torch.dtype, softmax_dtype: torch.dtype, *, want_lse: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Attention through the full ``(B, H, N, S)`` score matrix.

    The two matmuls run at ``matmul_dtype``, the scores' scale, bias, mask and softmax at
    ``softmax_dtype``. Rows with no visible key get weights 0 (so output and gradient 0) and
    log-sum-exp ``-inf``.

    Returns:
        ``out (B, H, N, Dv)`` at the inputs' dtype; the (dropped-out) weights ``(B, H, N, S)``
        and, with ``want_lse``, the log-sum-exp ``(B, H, N)``, both at ``softmax_dtype``.
    """
    B, H, Hkv, N, S = inp.B, inp.H, inp.Hkv, inp.N, inp.S
    q, k, v = inp.q.to(matmul_dtype), inp.k.to(matmul_dtype), inp.v.to(matmul_dtype)
    if inp.G > 1:  # the G query heads of one key/value head become G * N rows of one matmul
        q = q.reshape(B, Hkv, inp.G * N, inp.D)
    scores = torch.matmul(q, k.transpose(-1, -2)).view(B, H, N, S).to(softmax_dtype) * inp.scale
    if inp.bias is not None:
        scores = scores + inp.bias.to(softmax_dtype)
    allowed = dense_allowed(inp)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    empty = None
    if allowed is not None or inp.bias is not None:
        # A row with no finite score has no softmax (0 / 0). It is computed on zeros instead
        # and its weights zeroed afterwards, so neither the output nor any gradient sees a NaN.
        empty = (scores.detach().amax(-1) == float("-inf"))[..., None]
        scores = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1)
    lse = torch.logsumexp(scores, dim=-1) if want_lse else None
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
        if lse is not None:
            lse = lse.masked_fill(empty[..., 0], float("-inf"))
    if inp.dropout_p > 0:
        dev = probs.device
        keep = keep_grid(
            inp.dropout_seed, inp.dropout_p, *(torch.arange(x, device=dev) for x in (B, H, N, S))
        )
        probs = probs * keep / (1.0 - inp.dropout_p)
    weights = probs.to(matmul_dtype)
    if inp.G > 1:
        weights = weights.view(B, Hkv, inp.G * N, S)
    out = torch.matmul(weights, v).view(B, H, N, inp.Dv).to(inp.dtype)
    return out, probs, lse
