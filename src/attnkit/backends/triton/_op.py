"""The Triton kernels as one differentiable torch operator, ``torch.ops.attnkit.block_sparse_attention``.

Registered with :func:`torch.library.custom_op`, with a fake (meta) implementation and an
autograd formula, so the operator composes with ``torch.compile`` (which sees one opaque op
of known output shapes) and with autograd (the backward is a second op running the dK/dV and
dQ kernels). Imported only when the ``triton`` backend runs: it imports ``triton``.
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from .. import _rows
from . import _kernels

__all__ = ["block_sparse_attention"]

_LOG2E = math.log2(math.e)


def _head_block(d: int) -> int:
    """Head dims are padded to a power of two of at least 16 (``tl.dot``'s smallest operand)."""
    return max(16, triton.next_power_of_2(d))


def _launch_options(d_max: int, stages: int) -> dict:
    """Warps by rule, pipeline stages as chosen for the shared memory (the interpreter ignores
    both)."""
    return {"num_warps": 4 if d_max <= 64 else 8, "num_stages": stages}


def _precision(q: Tensor) -> str:
    # float32 inputs: IEEE products, so results are float32-exact (TF32 would round to 10 bits)
    return "ieee" if q.dtype == torch.float32 else "tf32"


@torch.library.custom_op("attnkit::block_sparse_attention", mutates_args=())
def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    row_ptr: Tensor,
    cols: Tensor,
    row_masks: Tensor,
    col_ptr: Tensor,
    rows: Tensor,
    col_masks: Tensor,
    masks: Tensor,
    scale: float,
    block_q: int,
    block_k: int,
    stages: int,
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention ``(out (B, H, N, Dv), lse (B, H, N) float32)`` over the tiles listed
    by the tables (see ``_tables.KernelTables``). ``q (B, H, N, D)``, ``k (B, Hkv, S, D)``,
    ``v (B, Hkv, S, Dv)``."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, N, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(B, H, N, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(N, block_q) * B * H,)
    _kernels._forward[grid](
        q, k, v, out, lse,
        row_ptr, cols, row_masks, masks,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        row_masks.stride(0) if row_masks.shape[0] > 1 else 0,
        H, H // Hkv, N, S, D, Dv, scale * _LOG2E,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=_head_block(D), BLOCK_DV=_head_block(Dv),
        PRECISION=_precision(q), **_launch_options(max(D, Dv), stages),
    )  # fmt: skip
    return out, lse


@block_sparse_attention.register_fake
def _(q, k, v, row_ptr, cols, row_masks, col_ptr, rows, col_masks, masks, scale, block_q, block_k, stages):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("attnkit::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(
    dout: Tensor,
    dlse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    row_ptr: Tensor,
    cols: Tensor,
    row_masks: Tensor,
    col_ptr: Tensor,
    rows: Tensor,
    col_masks: Tensor,
    masks: Tensor,
    scale: float,
    block_q: int,
    block_k: int,
    stages: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`block_sparse_attention` given the gradients of its output
    and log-sum-exp. Recomputes the probabilities from ``lse``; ``rowsum(dO * O) - dlse`` is
    the softmax correction of every row."""
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
    B, H, N, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    delta = _rows.correction(dout, out, dlse, torch.float32).contiguous()
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    consts = dict(
        BLOCK_Q=block_q,
        BLOCK_K=block_k,
        BLOCK_D=_head_block(D),
        BLOCK_DV=_head_block(Dv),
        PRECISION=_precision(q),
        **_launch_options(max(D, Dv), stages),
    )
    _kernels._backward_kv[(triton.cdiv(S, block_k) * B * Hkv,)](
        q, k, v, dout, lse, delta, dk, dv,
        col_ptr, rows, col_masks, masks, *strides,
        col_masks.stride(0) if col_masks.shape[0] > 1 else 0,
        H, Hkv, H // Hkv, N, S, D, Dv, scale, scale * _LOG2E, **consts,
    )  # fmt: skip
    _kernels._backward_q[(triton.cdiv(N, block_q) * B * H,)](
        q, k, v, dout, lse, delta, dq,
        row_ptr, cols, row_masks, masks, *strides,
        row_masks.stride(0) if row_masks.shape[0] > 1 else 0,
        H, H // Hkv, N, S, D, Dv, scale, scale * _LOG2E, **consts,
    )  # fmt: skip
    return dq, dk, dv


@block_sparse_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, *tables_and_args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *tables = inputs[:10]
    ctx.scale, ctx.block_q, ctx.block_k, ctx.stages = inputs[10:]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tables)


def _backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, k, v, out, lse, *tables = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = block_sparse_attention_backward(
        dout, dlse, q, k, v, out, lse, *tables, ctx.scale, ctx.block_q, ctx.block_k, ctx.stages
    )
    return (dq, dk, dv) + (None,) * 11


block_sparse_attention.register_autograd(_backward, setup_context=_setup_context)
