"""The ``triton`` backend: attnkit's own block-sparse FlashAttention-2 kernels, for CUDA GPUs.

Every attnkit pattern runs on kernels that visit only the tiles its block map lists: full
tiles with no mask, partial tiles with their (deduplicated) element mask, empty tiles never.
Forward and backward (dK/dV by key block over the transposed map, dQ by query block) recompute
from the log-sum-exp, so memory is ``O(N)`` beyond the inputs and time follows the pattern.
Nothing to compile ahead of time: Triton JIT-compiles each kernel once per dtype, head dim and
tile size, not per sequence length or pattern (those are runtime arguments).

Supports: every pattern and composition (per-batch ones too), GQA/MQA, ``N != S``, ``D != Dv``
(head dims up to 256), float16/bfloat16/float32 (float32 with IEEE products), rows that see
no key (zeros, ``lse = -inf``), the log-sum-exp (with its gradient), ``torch.compile`` (one
custom op with a fake implementation). Declines: boolean mask or float bias tensors, dropout,
attention weights, float64 -- ``sdpa``, ``blocksparse`` and ``reference`` run those.

``triton`` is an optional dependency (``pip install attnkit[triton]``, or the one that comes
with torch's CUDA wheels), imported only when this backend runs. On a machine without a GPU
the kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``): that is
how the test suite checks them, and ``backend="auto"`` never picks it there.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ...patterns import Causal, Full, KeyPadding
from ..base import AttentionInputs, AttentionResult, Backend
from ._tables import KernelTables, kernel_tables

__all__ = ["KernelTables", "TritonBackend", "interpreting", "kernel_tables"]

#: Largest head dim the kernels take (a ``BLOCK_Q x 256`` tile still fits in registers).
MAX_HEAD_DIM = 256


@functools.cache
def _installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    supports_lse = True

    #: Tile size ``(queries, keys)`` of the kernels and of the block map they walk; powers of
    #: two, at least 16 (``tl.dot``). 64 x 64 keeps a ``D = 128`` forward within one SM's
    #: registers on Ampere and Hopper at 4-8 warps.
    block: tuple[int, int] = (64, 64)

    @classmethod
    def unsupported_reasons(cls, inp: AttentionInputs) -> list[str]:
        reasons = super().unsupported_reasons(inp)
        if not _installed():
            reasons.append("the `triton` package is not installed (pip install attnkit[triton])")
        if inp.device.type != "cuda" and not (inp.device.type == "cpu" and interpreting()):
            reasons.append(f"device={inp.device.type} (supported: cuda; cpu under TRITON_INTERPRET=1)")
        if inp.mask is not None or inp.bias is not None:
            reasons.append("a mask or bias tensor is not supported (patterns are)")
        if max(inp.D, inp.Dv) > MAX_HEAD_DIM:
            reasons.append(f"head dim {max(inp.D, inp.Dv)} > {MAX_HEAD_DIM}")
        bq, bk = cls.block
        for name, b in (("block_q", bq), ("block_k", bk)):
            if b < 16 or b & (b - 1):
                reasons.append(f"{name}={b} is not a power of two >= 16")
        return reasons

    @classmethod
    def auto_reasons(cls, inp: AttentionInputs) -> list[str]:
        p = inp.pattern
        if inp.device.type != "cuda":
            return ["Triton's interpreter is for testing, not speed"]
        if p is None or isinstance(p, (Full, Causal, KeyPadding)):
            return [f"pattern {p!r} runs natively on sdpa"]
        return []

    @classmethod
    def forward(cls, inp: AttentionInputs) -> AttentionResult:
        from ._op import block_sparse_attention  # imports triton

        bq, bk = cls.block
        tables = kernel_tables(inp.pattern or Full(), inp.N, inp.S, bq, bk, inp.device)
        out, lse = block_sparse_attention(inp.q, inp.k, inp.v, *tables.tensors, inp.scale, bq, bk)
        return AttentionResult(out, None, lse if inp.return_lse else None)
