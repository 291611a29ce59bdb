"""``Full`` and ``Causal``: the two patterns every attention library knows."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import Pattern, _offset, check_align

__all__ = ["Causal", "Full"]


@dataclass(frozen=True, repr=False)
class Full(Pattern):
    """Every query sees every key (no mask).

    Picture, ``Full()`` with N=4, S=6::

        ██████
        ██████
        ██████
        ██████
    """

    is_toeplitz = True

    def _offset_rule(self, t: Tensor, n: int, s: int) -> Tensor:
        return torch.ones_like(t, dtype=torch.bool)


@dataclass(frozen=True, repr=False)
class Causal(Pattern):
    """Query at position ``p`` sees keys ``j <= p``.

    ``align="bottom_right"`` (default) puts query ``i`` at ``p = i + (S - N)``: the last query
    sees every key, as in decoding with a KV cache. ``align="top_left"`` uses ``p = i``, as
    ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` does.

    Picture, ``Causal()`` with N=3, S=5::

        ███··
        ████·
        █████

    Picture, ``Causal(align='top_left')`` with N=3, S=5::

        █····
        ██···
        ███··
    """

    align: str = field(default="bottom_right", kw_only=True)
    is_toeplitz = True

    def __post_init__(self) -> None:
        check_align("Causal", self.align)

    def _offset_rule(self, t: Tensor, n: int, s: int) -> Tensor:
        return t + _offset(self.align, n, s) >= 0
