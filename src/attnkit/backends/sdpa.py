"""The ``sdpa`` backend: torch's fused ``scaled_dot_product_attention``.

On CPU torch runs its flash kernel (online softmax, float32 accumulation for half types);
on CUDA the flash, memory-efficient or cuDNN kernels. attnkit passes dense and causal
attention straight through (``is_causal`` when the alignment agrees), and other patterns as a
materialized boolean mask when that mask is small enough (``MAX_MASK_ELEMENTS``).

Supports: dense, causal, padding and any boolean mask or float bias (with gradients), GQA
(``enable_gqa``), dropout (torch's own RNG, so its dropped weights differ from the
``reference``/``tiled`` ones). Known limitations: no attention weights, no log-sum-exp; a
materialized mask costs ``N * S`` bytes and makes the CPU kernel about 25% slower.
Fully masked rows give zeros (checked by the test suite on this torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..patterns import Causal, Full, KeyPadding
from . import _rows
from ._masks import dense_allowed
from .base import AttentionInputs, AttentionResult, Backend

__all__ = ["SdpaBackend"]


class SdpaBackend(Backend):
    name = "sdpa"
    supports_dropout = True

    #: Patterns other than Full/Causal/KeyPadding run as a materialized mask of at most this
    #: many elements (B' * N * S booleans).
    MAX_MASK_ELEMENTS = 1 << 26

    @classmethod
    def unsupported_reasons(cls, inp: AttentionInputs) -> list[str]:
        reasons = super().unsupported_reasons(inp)
        p = inp.pattern
        if p is not None and not _is_cheap(p):
            elements = (p.batch_size or 1) * inp.N * inp.S
            if elements > cls.MAX_MASK_ELEMENTS:
                reasons.append(
                    f"pattern {p!r} would need a {elements:,}-element dense mask "
                    f"(limit {cls.MAX_MASK_ELEMENTS:,})"
                )
        return reasons

    @classmethod
    def forward(cls, inp: AttentionInputs) -> AttentionResult:
        is_causal = False
        if inp.mask is None and inp.bias is None and isinstance(inp.pattern, Causal):
            if inp.N == 1 and inp.pattern.align == "bottom_right":
                attn_mask = None  # a one-token decode step sees every key
            elif inp.pattern.align == "top_left" or inp.N == inp.S:
                attn_mask, is_causal = None, True
            else:
                attn_mask = dense_allowed(inp)
        elif isinstance(inp.pattern, Full) or inp.pattern is None:
            attn_mask = inp.mask
        else:
            attn_mask = dense_allowed(inp)
        if inp.bias is not None:
            bias = inp.bias.to(inp.dtype)
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        seen = None
        if attn_mask is not None and inp.device.type != "cpu":
            attn_mask, seen = _rows.give_unseen_rows_every_key(attn_mask)
        out = F.scaled_dot_product_attention(
            inp.q,
            inp.k,
            inp.v,
            attn_mask=attn_mask,
            dropout_p=inp.dropout_p,
            is_causal=is_causal,
            scale=inp.scale,
            enable_gqa=inp.G > 1,
        )
        if seen is not None:
            out = torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return AttentionResult(out)


def _is_cheap(p) -> bool:
    """Patterns whose SDPA mask is free or small: no mask, is_causal, or a (B, 1, 1, S) row."""
    return isinstance(p, (Full, Causal, KeyPadding))
