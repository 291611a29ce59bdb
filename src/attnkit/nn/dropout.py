"""Dropout that costs less on CPU: the keep mask drawn as 16-bit lanes of 64-bit random words.

``torch.nn.functional.dropout`` on CPU draws one Bernoulli sample per element with
``bernoulli_`` into a float tensor, scales it, multiplies, and keeps that float tensor for
the backward. Training the translation and summarization models on a 2-core CPU, dropout 0.1
made a step 1.5-1.7x as long, a quarter of it in ``bernoulli_`` (``bench/dropout_cost.py``;
``bench/results/dropout_cost-torch-run{1,2}.json``).

Here one 64-bit random word from torch's default generator gives four 16-bit lanes; an
element is dropped when its lane falls below ``round(p * 2**16)``. The output is
``(x * scale).masked_fill(drop, 0)``, whose backward keeps only the boolean mask (1 byte per
element, not 4). ``p`` is thus rounded to a multiple of ``2**-16`` (0.1 becomes 0.100006) and
``scale`` is ``1 / (1 - rounded p)``, so that the expectation is kept exactly.

Other devices keep torch's kernels: CUDA fuses dropout into one kernel already. Draws come
from torch's default generator, so ``torch.manual_seed`` reproduces them and a checkpoint that
saves the generator's state resumes exactly; they are not the same draws as torch's dropout.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Dropout", "dropout"]

_LANES = 1 << 16  # values of one 16-bit lane


def _drop_mask(shape: torch.Size, p: float) -> Tensor:
    """Boolean ``shape`` mask on CPU, each element True (dropped) with probability
    ``round(p * 2**16) / 2**16``, from torch's default generator."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:n]  # uniform on [-2**15, 2**15)
    return (lanes < round(p * _LANES) - _LANES // 2).view(shape)


def _check_p(p: float, who: str) -> None:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{who}: expected p in [0, 1], but got p={p!r}.")


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element of ``x`` (any shape) with probability ``p`` and scale the rest by
    ``1 / (1 - p)`` while ``training``; ``x`` unchanged otherwise. Like
    :func:`torch.nn.functional.dropout` (which runs on devices other than CPU); on CPU ``p``
    is rounded to a multiple of ``2**-16`` and the mask costs less (module docstring)."""
    _check_p(p, "dropout")
    if not x.is_floating_point():
        raise TypeError(f"dropout: expected a floating-point x, but got {x.dtype}.")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    kept = 1.0 - round(p * _LANES) / _LANES
    if kept == 0.0:
        return x * 0.0
    return (x * (1.0 / kept)).masked_fill(_drop_mask(x.shape, p), 0.0)


class Dropout(nn.Module):
    """:func:`dropout` as a module, a drop-in for :class:`torch.nn.Dropout` (no parameters,
    so checkpoints are unchanged).

    Args:
        p: Probability of zeroing an element, in ``[0, 1]``.

    Shape: any; the output has the input's shape.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        _check_p(p, "Dropout")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
