"""Batched attention calls for the block-sparse backend: torch's fused CPU kernel or eager torch.

Both engines take the same layout: ``q (X, R, M, D)``, ``k (X, R, K, D)``, ``v (X, R, K, Dv)``
and an additive float ``bias`` broadcastable to ``(X, R, M, K)`` (``-inf`` hides a key), where
``X`` is batch x key/value heads and ``R`` counts query tiles. Each returns ``out (X, R, M, Dv)``
and the float32 row log-sum-exp ``(X, R, M)``; the backward takes the *final* output and
log-sum-exp of the rows (merged over every call that covers them), so gradients of separate
calls over disjoint key sets add up exactly.

* :class:`FusedCPU` calls ``aten._scaled_dot_product_flash_attention_for_cpu`` and its
  backward: the kernel behind ``scaled_dot_product_attention`` on CPU, the one variant that
  returns the log-sum-exp. It is a private op, so :func:`fused_cpu_available` probes it once
  (existence, signature and a numerical check) and the backend falls back to the eager engine
  when it is missing or wrong.
* :class:`Eager` computes the same with matmuls in float32 (float64 for float64 inputs); it
  also supports the counter-based dropout and returns ``dS`` for gradients of a float bias.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _rows
from .base import compute_dtype

__all__ = ["Eager", "FusedCPU", "fused_cpu_available"]


@functools.cache
def fused_cpu_available() -> bool:
    """Whether torch's fused CPU flash kernel with log-sum-exp works here (probed once)."""
    try:
        fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(4))
        bias = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
        bias[..., 3:] = float("-inf")
        out, lse = fwd(q, k, v, 0.0, False, attn_mask=bias, scale=0.5)
        ref_out, ref_lse = Eager.forward(q, k, v, bias, 0.5)
        grads = bwd(do, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=0.5)
        ref = Eager.backward(do, q, k, v, ref_out, ref_lse, bias, 0.5)
        return (
            torch.allclose(out, ref_out.to(out.dtype), atol=1e-10)
            and torch.allclose(lse.double(), ref_lse, atol=1e-10)
            and all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads, ref[:3], strict=True))
        )
    except (AttributeError, RuntimeError, TypeError):
        return False


class FusedCPU:
    """torch's fused CPU flash-attention kernel (forward and backward)."""

    @staticmethod
    def forward(
        q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, causal: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``bias=None`` attends to every key (top-left causally with ``causal``)."""
        attn_mask = None if bias is None else bias.to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale
        )
        if bias is None:  # every row sees a key
            return out, lse
        # Rows whose bias hides every key: the convention (0, -inf), not whatever the kernel
        # returns there. Checked on the (small, often shared) bias; the output is only
        # rewritten when such rows exist.
        seen = torch.isfinite(bias).any(-1)
        if bool(seen.all()):
            return out, lse
        lse = torch.where(seen, lse, -torch.inf)
        return _rows.zero_unseen(out, lse), lse

    @staticmethod
    def backward(
        dout, q, k, v, out, lse, bias, scale, causal: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, None]:
        lse = _rows.for_recompute(lse)
        attn_mask = None if bias is None else bias.to(q.dtype)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=attn_mask, scale=scale
        )
        return dq, dk, dv, None


class Eager:
    """The same computation in eager torch, with optional dropout (a ``keep`` mask)."""

    @staticmethod
    def forward(q, k, v, bias, scale, keep: Tensor | None = None, dropout_p: float = 0.0):
        ct = compute_dtype(q.dtype)
        s = (q.to(ct) @ k.to(ct).transpose(-1, -2)) * scale + bias.to(ct)  # (X, R, M, K)
        m = _rows.shift(s.amax(-1))
        e = torch.exp(s - m[..., None])
        l = e.sum(-1)
        p = _rows.normalize(e, l)
        if keep is not None:
            p = p * keep.to(ct) * (1.0 / (1.0 - dropout_p))
        return p @ v.to(ct), _rows.lse_from(m, l)

    @staticmethod
    def backward(
        dout, q, k, v, out, lse, bias, scale, keep: Tensor | None = None, dropout_p: float = 0.0, dlse=None
    ):
        """Gradients ``(dq, dk, dv, ds)``; ``dlse`` (or None) is the gradient of the returned
        log-sum-exp (see :func:`attnkit.backends._rows.correction`)."""
        ct = compute_dtype(q.dtype)
        qc, kc, vc, doc = q.to(ct), k.to(ct), v.to(ct), dout.to(ct)
        lse = _rows.for_recompute(lse.to(ct))
        s = (qc @ kc.transpose(-1, -2)) * scale + bias.to(ct)
        p = torch.exp(s - lse[..., None])
        dp = doc @ vc.transpose(-1, -2)
        if keep is not None:
            kept = keep.to(ct) * (1.0 / (1.0 - dropout_p))
            dv = (p * kept).transpose(-1, -2) @ doc
            dp = dp * kept
        else:
            dv = p.transpose(-1, -2) @ doc
        ds = p * (dp - _rows.correction(doc, out, dlse, ct)[..., None])
        dq = (ds @ kc) * scale
        dk = (ds.transpose(-1, -2) @ qc) * scale
        return dq, dk, dv, ds
