"""Attention hooks: observers called with every attention call's inputs and output.

:class:`attnkit.nn.MultiHeadAttention` and the Hugging Face integration call
:func:`call_attention_hooks` after computing their output, so an observer (the recorder in
:mod:`attnkit.viz`) can see queries, keys, masks and patterns without changing what the model
computes. With no hook registered the cost is one dict lookup per call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .patterns import Pattern

__all__ = ["AttentionCall", "call_attention_hooks", "register_attention_hook"]


@dataclass(frozen=True)
class AttentionCall:
    """One attention call. ``q (B, H, N, D)``, ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)``
    exactly as attended (after projection, rotary and cache), ``out (B, H, N, Dv)`` the heads'
    outputs before the output projection, ``x (B, N, C)`` the module's input (None where the
    caller does not have it)."""

    module: nn.Module
    q: Tensor
    k: Tensor
    v: Tensor
    out: Tensor
    pattern: Pattern | None
    mask: Tensor | None
    scale: float | None
    x: Tensor | None = None
    context: Tensor | None = None


_HOOKS: OrderedDict[int, Callable[[AttentionCall], None]] = OrderedDict()  # weak-referenceable


def register_attention_hook(fn: Callable[[AttentionCall], None]) -> RemovableHandle:
    """Call ``fn(call)`` after every attention call of attnkit modules; ``handle.remove()``
    unregisters it."""
    handle = RemovableHandle(_HOOKS)
    _HOOKS[handle.id] = fn
    return handle


def hooks_active() -> bool:
    return bool(_HOOKS)


def call_attention_hooks(call: AttentionCall) -> None:
    for fn in list(_HOOKS.values()):
        fn(call)
