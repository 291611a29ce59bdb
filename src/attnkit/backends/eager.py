"""The ``eager`` backend: materialized attention in torch operators, differentiated by autograd.

Algorithm: ``scores = q @ k^T`` at the inputs' dtype (torch's matmul accumulates bfloat16 in
float32; float16, whose range ends at 65504, is multiplied in float32), then scale, bias, mask
and softmax (torch's) in float32, and ``probs @ v`` at the inputs' dtype again. Query heads that
share a key/value head (GQA) are stacked along the rows of one matmul. This is what "eager"
attention in most PyTorch model code computes; its body,
:func:`attnkit.backends._materialized.materialized`, is also the float64 ``reference`` oracle's.

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

from ..patterns import Causal, Full, KeyPadding
from . import _tuning
from ._materialized import materialized, matmul_dtype
from .base import AttentionInputs, AttentionResult, Backend, compute_dtype, lse_dtype

__all__ = ["EagerBackend"]


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
