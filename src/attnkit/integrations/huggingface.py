"""attnkit as an attention implementation of Hugging Face ``transformers``.

Importing this module registers ``"attnkit"`` with ``transformers``' attention and mask
interfaces, so any model written against them (BERT, Llama, Mistral, Qwen, ...) runs its
attention on attnkit backends::

    import attnkit.integrations.huggingface as hf_attnkit
    model = AutoModel.from_pretrained(path, attn_implementation="attnkit")
    hf_attnkit.set_pattern(model, SlidingWindow(64, 64))    # optional: a sparse pattern
    out = model(**batch, output_attentions=True)            # weights for visualization

Masks arrive as ``transformers`` builds them for SDPA (boolean, ``True`` = may attend, or
``None`` when the causal/bidirectional structure alone describes them); causal layers without
a mask get attnkit's ``Causal()`` (or ``SlidingWindow`` for sliding-window layers).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._hooks import AttentionCall, call_attention_hooks, hooks_active
from ..functional import attention
from ..patterns import Causal, Pattern, SlidingWindow

__all__ = ["NAME", "attnkit_attention_forward", "register", "set_backend", "set_pattern"]

NAME = "attnkit"
_PATTERN_ATTR = "attnkit_pattern"
_BACKEND_ATTR = "attnkit_backend"


def attnkit_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """``transformers`` attention function: ``query (B, H, N, D)``, ``key/value (B, Hkv, S, D)``
    -> ``(out (B, N, H, Dv), weights (B, H, N, S) or None)``."""
    for unsupported in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"attnkit attention: {unsupported!r} is not supported.")
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    parts: list[Pattern] = []
    if attention_mask is None and causal and query.shape[2] > 1:
        parts.append(SlidingWindow(sliding_window - 1) if sliding_window else Causal())
    user = getattr(module, _PATTERN_ATTR, None)
    if user is not None:
        parts.append(user)
    pattern = None
    for p in parts:
        pattern = p if pattern is None else pattern & p
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)
    want_weights = bool(kwargs.get("output_attentions", False))
    result = attention(
        query, key, value, pattern=pattern, mask=attention_mask, scale=scaling,
        dropout_p=dropout if module.training else 0.0, return_weights=want_weights,
        backend=getattr(module, _BACKEND_ATTR, "auto") if not want_weights else "auto",
    )  # fmt: skip
    out, weights = result if want_weights else (result, None)
    if hooks_active():
        call_attention_hooks(AttentionCall(module, query, key, value, out, pattern, attention_mask, scaling))
    if weights is not None:
        weights = weights.to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


def register(name: str = NAME) -> None:
    """Register attnkit under ``name`` in ``transformers``' attention and mask interfaces
    (done on import with ``"attnkit"``; idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attnkit_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def _self_attention_modules(model: nn.Module):
    for module in model.modules():
        if (
            hasattr(module, "is_causal")
            and hasattr(module, "config")
            and not getattr(module, "is_cross_attention", False)
        ):
            yield module


def set_pattern(model: nn.Module, pattern: Pattern | None) -> int:
    """Give every self-attention layer of a ``transformers`` model an attnkit pattern (None
    removes it); combined with the model's own masks. Returns the number of layers changed."""
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(
            f"set_pattern: expected an attnkit Pattern or None, but got {type(pattern).__name__}."
        )
    count = 0
    for module in _self_attention_modules(model):
        setattr(module, _PATTERN_ATTR, pattern)
        count += 1
    if count == 0:
        raise ValueError(f"set_pattern: found no self-attention layers in {type(model).__name__}.")
    return count


def set_backend(model: nn.Module, backend: str) -> None:
    """Force an attnkit backend (``"blocksparse"``, ``"sdpa"``, ...) in every attention layer."""
    for module in model.modules():
        setattr(module, _BACKEND_ATTR, backend)


register()
