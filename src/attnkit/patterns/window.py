"""Local attention: ``SlidingWindow`` (Longformer, Mistral) and ``Dilated`` windows."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import Pattern, _offset, check_align, check_int

__all__ = ["Dilated", "SlidingWindow"]


@dataclass(frozen=True, repr=False)
class SlidingWindow(Pattern):
    """Query at position ``p`` sees keys ``p - before <= j <= p + after``.

    ``SlidingWindow(w)`` is a causal window of ``w + 1`` keys (Mistral's sliding window of
    size ``W`` is ``SlidingWindow(W - 1)``); ``SlidingWindow(w, w)`` is Longformer's symmetric
    local attention. Beltagy et al. 2020, https://arxiv.org/abs/2004.05150.

    Args:
        before: Keys visible before the query's own position (``>= 0``).
        after: Keys visible after it (``>= 0``).
        align: Where queries sit on the key axis when ``N != S`` (see :class:`Causal`).

    Picture, ``SlidingWindow(2)`` with N=6, S=6::

        █·····
        ██····
        ███···
        ·███··
        ··███·
        ···███

    Picture, ``SlidingWindow(1, 2)`` with N=6, S=6::

        ███···
        ████··
        ·████·
        ··████
        ···███
        ····██
    """

    before: int
    after: int = 0
    align: str = field(default="bottom_right", kw_only=True)
    is_toeplitz = True

    def __post_init__(self) -> None:
        check_int("SlidingWindow", "before", self.before, 0)
        check_int("SlidingWindow", "after", self.after, 0)
        check_align("SlidingWindow", self.align)

    def _offset_rule(self, t: Tensor, n: int, s: int) -> Tensor:
        d = t + _offset(self.align, n, s)  # p - j
        return (d <= self.before) & (d >= -self.after)


@dataclass(frozen=True, repr=False)
class Dilated(Pattern):
    """A window with holes: ``p - before <= j <= p + after`` and ``(p - j) % dilation == 0``.

    Dilated sliding windows widen the receptive field at the same cost (Longformer's upper
    layers). ``Dilated(b, 1)`` is ``SlidingWindow(b)``.

    Args:
        before: Reach before the query's position (``>= 0``), in keys, holes included.
        dilation: Step between visible keys (``>= 1``).
        after: Reach after the query's position (``>= 0``).

    Picture, ``Dilated(4, 2)`` with N=6, S=6::

        █·····
        ·█····
        █·█···
        ·█·█··
        █·█·█·
        ·█·█·█

    Picture, ``Dilated(4, 2, 2)`` with N=6, S=6::

        █·█···
        ·█·█··
        █·█·█·
        ·█·█·█
        █·█·█·
        ·█·█·█
    """

    before: int
    dilation: int
    after: int = 0
    align: str = field(default="bottom_right", kw_only=True)
    is_toeplitz = True

    def __post_init__(self) -> None:
        check_int("Dilated", "before", self.before, 0)
        check_int("Dilated", "dilation", self.dilation, 1)
        check_int("Dilated", "after", self.after, 0)
        check_align("Dilated", self.align)

    def _offset_rule(self, t: Tensor, n: int, s: int) -> Tensor:
        d = t + _offset(self.align, n, s)
        return (d <= self.before) & (d >= -self.after) & (torch.remainder(d, self.dilation) == 0)

    def _periods(self) -> tuple[int, ...]:
        return (self.dilation,)
