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
from ..base import AttentionInputs, AttentionResult, Backend, add_into
from ._tables import KernelTables, kernel_tables

__all__ = ["KernelTables", "TritonBackend", "interpreting", "kernel_tables", "launch_config"]

#: Largest head dim the kernels take (a ``BLOCK_Q x 256`` tile still fits in registers).
MAX_HEAD_DIM = 256
#: Tile sizes ``(block_q, block_k)`` and pipeline stages tried in order, largest first.
CONFIGS = ((64, 64, 2), (64, 64, 1), (64, 32, 1), (32, 32, 1), (16, 16, 1))
#: CUDA's limit on a grid's first axis (the kernels use that axis only).
MAX_PROGRAMS = 2**31 - 1
#: Shared memory the rule assumes under the interpreter: 99 KiB, the smallest opt-in budget
#: per block of the GPUs Triton targets (compute capability 8.6/8.9), so the tests on CPU meet
#: the tightest case of the rule.
INTERPRETER_SHARED_MEMORY = 99 * 1024


def shared_memory_budget(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device`` (its opt-in limit on CUDA)."""
    if device.type != "cuda":
        return INTERPRETER_SHARED_MEMORY
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def shared_memory(block_q: int, block_k: int, stages: int, d: int, dv: int, element_size: int) -> int:
    """An upper estimate of the shared memory of the busier kernel (forward or dK/dV): the
    resident tile of one side (``max(block) x (D + Dv)``, head dims padded to powers of two),
    ``stages`` buffered tiles of the other, and the ``block_q x block_k`` probabilities staged
    for the second product."""
    width = max(16, 1 << (d - 1).bit_length()) + max(16, 1 << (dv - 1).bit_length())
    side = max(block_q, block_k) * width
    return element_size * ((1 + stages) * side + block_q * block_k)


def launch_config(inp: AttentionInputs) -> tuple[int, int, int] | str:
    """``(block_q, block_k, stages)``: the largest of :data:`CONFIGS` whose shared memory fits
    the device (``TritonBackend.block``, if set, fixes the tiles), or the reason none does."""
    budget = shared_memory_budget(inp.device)
    fixed = TritonBackend.block
    tried = []
    for bq, bk, stages in CONFIGS if fixed is None else ((*fixed, 2), (*fixed, 1)):
        need = shared_memory(bq, bk, stages, inp.D, inp.Dv, inp.q.element_size())
        if need <= budget:
            return bq, bk, stages
        tried.append(f"{bq}x{bk}/{stages} stages: {need // 1024} KiB")
    return (
        f"head dims {inp.D}/{inp.Dv} in {inp.dtype} need more shared memory than this device's "
        f"{budget // 1024} KiB per block at every tile size ({'; '.join(tried)})"
    )


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
    supports_partial = True

    #: Tile size ``(queries, keys)`` of the kernels and of the block map they walk; powers of
    #: two, at least 16 (``tl.dot``). None: the largest of :data:`CONFIGS` whose shared memory
    #: fits the device for the call's head dims and dtype (:func:`launch_config`).
    block: tuple[int, int] | None = None

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
        if cls.block is not None:
            for name, b in zip(("block_q", "block_k"), cls.block, strict=True):
                if b < 16 or b & (b - 1):
                    reasons.append(f"{name}={b} is not a power of two >= 16")
        if reasons:
            return reasons
        config = launch_config(inp)
        if isinstance(config, str):
            return [config]
        bq, bk, _ = config
        programs = max(-(-inp.N // bq) * inp.H, -(-inp.S // bk) * inp.Hkv) * inp.B
        if programs > MAX_PROGRAMS:
            reasons.append(
                f"{programs} programs (B={inp.B}, H={inp.H}, N={inp.N}, S={inp.S}) "
                f"exceed a grid's {MAX_PROGRAMS}"
            )
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

        config, tables = cls._tables(inp)
        out, lse = block_sparse_attention(inp.q, inp.k, inp.v, *tables.tensors, inp.scale, *config)
        return AttentionResult(out, None, lse if inp.return_lse else None)

    @classmethod
    def partial_reasons(cls, inp: AttentionInputs) -> list[str]:
        if inp.device.type != "cuda":
            return ["Triton's interpreter is for testing, not speed"]
        return super().partial_reasons(inp)

    @classmethod
    def partial_forward(cls, inp: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        from ._op import block_sparse_attention

        config, tables = cls._tables(inp)
        with torch.no_grad():
            out, lse = block_sparse_attention(inp.q, inp.k, inp.v, *tables.tensors, inp.scale, *config)
        return out.float(), lse

    @classmethod
    def partial_backward(cls, inp, out, lse, dout, dlse=None, *, into=None):
        from ._op import block_sparse_attention_backward

        config, tables = cls._tables(inp)
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        with torch.no_grad():
            grads = block_sparse_attention_backward(
                dout.to(inp.dtype), dlse.float(), inp.q, inp.k, inp.v, out.to(inp.dtype), lse.float(),
                *tables.tensors, inp.scale, *config,
            )  # fmt: skip
        return add_into(into, tuple(g.float() for g in grads))

    @staticmethod
    def _tables(inp: AttentionInputs) -> tuple[tuple[int, int, int], KernelTables]:
        bq, bk, stages = launch_config(inp)
        return (bq, bk, stages), kernel_tables(inp.pattern or Full(), inp.N, inp.S, bq, bk, inp.device)
