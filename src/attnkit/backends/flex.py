"""The ``flex`` backend: PyTorch's FlexAttention, compiled, on a ``BlockMask`` made from the block map.

FlexAttention (``torch.nn.attention.flex_attention``) generates a fused FlashAttention-style
kernel for a ``mask_mod`` when compiled with ``torch.compile``. attnkit hands it a
``BlockMask`` built straight from the pattern's exact block map
(:func:`attnkit.backends._flex_mask.block_mask`, public as
:func:`attnkit.integrations.flex.block_mask`: full tiles run unmasked, partial ones read
precomputed element tables), so no ``N x S`` evaluation is spent on the mask, and caches it
per ``(pattern, N, S, device)`` in ``attnkit.caches`` as ``"flex_block_masks"``. The compiled
function is created once per process and device type. On CUDA ``torch.compile`` specializes it
on the first shapes and generalizes to dynamic lengths on the first recompile, so new lengths
reuse the dynamic kernel; on CPU it compiles per shape (see ``_compiled``).

Supports: every pattern and composition (per-batch ones too), GQA, ``N != S``,
float16/bfloat16/float32, the log-sum-exp, autograd (FlexAttention's own backward kernel).
Declines: boolean mask or float bias tensors, dropout, attention weights, float64; on CPU,
gradients and the log-sum-exp (torch 2.13 compiles FlexAttention for inference only there) and
machines without a C++ compiler (Inductor compiles FlexAttention to C++ on CPU).

Costs to know: the first call of each shape family compiles (seconds to a minute, per
pytorch #136196 and #141486 recompiles on new shapes); ``auto`` therefore prefers the
``triton`` backend on CUDA and picks ``flex`` only where that declines. On CPU ``auto`` never
picks it (``blocksparse`` needs no compile and is measured on the machine).
"""

from __future__ import annotations

import functools
import shutil

import torch

from .. import caches
from ..patterns import Causal, Full, KeyPadding
from ._flex_mask import block_mask, block_mask_bytes
from .base import AttentionInputs, AttentionResult, Backend

__all__ = ["FlexBackend"]

_BLOCK_MASKS = caches.register("flex_block_masks", 256 * caches.MiB, size=block_mask_bytes)


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import AuxRequest, flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the torch build
        return False
    return True


def _has_cxx() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@functools.cache
def _compiled(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # On CPU, torch 2.13's C++ code for FlexAttention with dynamic lengths fails to compile for
    # some mask tables (undeclared `cur_kvSplitSize0`), so CPU compiles per shape.
    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


class FlexBackend(Backend):
    name = "flex"
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    supports_lse = True

    #: FlexAttention's ``BLOCK_SIZE``, the tile of the block mask (FlexAttention's default).
    block = 128

    @classmethod
    def unsupported_reasons(cls, inp: AttentionInputs) -> list[str]:
        reasons = super().unsupported_reasons(inp)
        if not _flex_available():
            reasons.append("this torch has no FlexAttention with AuxRequest (torch >= 2.9)")
        if inp.mask is not None or inp.bias is not None:
            reasons.append("a mask or bias tensor is not supported (patterns are)")
        if inp.device.type == "cpu":
            if not _has_cxx():
                reasons.append("no C++ compiler on PATH (Inductor compiles FlexAttention to C++ on CPU)")
            # torch 2.13: "torch.compile on CPU only supports inference and `return_lse` is not
            # supported yet"
            if inp.requires_grad:
                reasons.append("gradients on CPU (compiled FlexAttention runs inference only there)")
            if inp.return_lse:
                reasons.append("return_lse=True on CPU (compiled FlexAttention has no lse there)")
        return reasons

    @classmethod
    def auto_reasons(cls, inp: AttentionInputs) -> list[str]:
        p = inp.pattern
        if inp.device.type != "cuda":
            return [f"device={inp.device.type}: blocksparse needs no compile there"]
        if p is None or isinstance(p, (Full, Causal, KeyPadding)):
            return [f"pattern {p!r} runs natively on sdpa"]
        return []

    @classmethod
    def forward(cls, inp: AttentionInputs) -> AttentionResult:
        from torch.nn.attention.flex_attention import AuxRequest

        pattern = inp.pattern or Full()
        key = (pattern, inp.N, inp.S, cls.block, str(inp.device))
        mask = _BLOCK_MASKS.get(
            key, lambda: block_mask(pattern, inp.N, inp.S, block=cls.block, device=inp.device)
        )
        result = _compiled(inp.device.type)(
            inp.q,
            inp.k,
            inp.v,
            block_mask=mask,
            scale=inp.scale,
            enable_gqa=inp.G > 1,
            return_aux=AuxRequest(lse=True) if inp.return_lse else None,
        )
        if inp.return_lse:
            out, aux = result
            return AttentionResult(out, None, aux.lse)
        return AttentionResult(result)
