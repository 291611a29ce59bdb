"""The ``eager`` backend: materialized attention in torch operators, differentiated by autograd.

Algorithm: ``scores = q @ k^T`` at the inputs' dtype (torch's matmul accumulates bfloat16 in
float32; float16, whose range ends at 65504, is multiplied in float32), then scale, bias, mask
and softmax (torch's) in float32, and ``probs @ v`` at the inputs' dtype again. Query heads that
share a key/value head (GQA) are stacked along the rows of one matmul. This is what "eager"
attention in most PyTorch model code computes; :func:`materialized` is also the body of the
float64 ``reference`` oracle.

Why a backend: on short sequences the backward of torch's fused CPU kernel (the one behind
``scaled_dot_product_attention``) takes several times what the matmuls of a materialized
backward take, most of all in bfloat16 (``bench/eager_attention.py``; measured, not explained:
the kernel works in fixed query and key blocks, and its cost barely falls with the length).
``auto`` therefore runs this backend for CPU *training* when every query and key row fits in
this machine's measured crossover length (:attr:`~attnkit.backends._tuning.Tuning.eager_keys`,
measured at first use like the block-sparse rates), and leaves inference, long sequences,
sparse patterns and GPUs to the fused kernels.

Supports: every device and float dtype, every pattern (as a materialized mask), boolean masks,
float biases with gradients, dropout (the counter-based mask shared with ``reference`` and
``tiled``), attention weights and the log-sum-exp. Known limitations: memory and time are
``O(B * H * N * S)``, with the float32 probabilities kept for the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..patterns import Causal, Full, KeyPadding
from . import _tuning
from ._dropout import keep_grid
from ._masks import dense_allowed
from .base import AttentionInputs, AttentionResult, Backend, compute_dtype, lse_dtype

__all__ = ["EagerBackend", "materialized", "matmul_dtype"]


class EagerBackend(Backend):
    name = "eager"
    supports_dropout = True
    supports_weights = True
    supports_lse = True

    @classmethod
    def auto_reasons(cls, inp: AttentionInputs) -> list[str]:
        if inp.device.type != "cpu":
            return [f"device={inp.device.type}: the fused GPU kernels are faster"]
        if not inp.requires_grad:
            return [
                "no gradient needed: the crossover is measured for training; inference keeps the fused kernel"
            ]
        p = inp.pattern
        if p is not None and not isinstance(p, (Full, Causal, KeyPadding)):
            return [f"pattern {p!r}: the sparse backends skip its empty blocks"]
        longest = _tuning.current(inp.dtype).eager_keys
        if max(inp.N, inp.S) > longest:
            return [
                f"N={inp.N}, S={inp.S}: longer than {longest}, this machine's measured length up "
                "to which materialized training attention beats the fused kernel"
            ]
        return []

    @classmethod
    def forward(cls, inp: AttentionInputs) -> AttentionResult:
        out, probs, lse = materialized(
            inp, matmul_dtype(inp.dtype), compute_dtype(inp.dtype), want_lse=inp.return_lse
        )
        weights = probs.to(inp.dtype) if inp.return_weights else None
        return AttentionResult(out, weights, None if lse is None else lse.to(lse_dtype(inp.dtype)))


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
