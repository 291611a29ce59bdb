"""Rows that see no key, and the log-sum-exp: the one place attnkit's convention is written.

The softmax of a row whose every score is ``-inf`` is undefined (``0 / 0``). attnkit defines
it: such a row's output is **0**, its gradient **0**, and its log-sum-exp **-inf**. Every
backend computes through these helpers, so the convention holds on each of them without relying
on what a kernel happens to return for such rows:

* :func:`shift` -- the finite value subtracted from scores before ``exp`` (the row maximum, or 0
  for a row with no finite score);
* :func:`normalize` and :func:`lse_from` -- finishing an online softmax from its running
  maximum ``m`` and normalizer ``l``;
* :func:`zero_unseen` -- force the convention onto a kernel's output;
* :func:`give_unseen_rows_every_key` -- the same, for kernels that may return NaN there (the
  row is made finite before the call, its output replaced by 0 after);
* :func:`for_recompute` -- the log-sum-exp a backward subtracts to recompute ``p = exp(s - lse)``
  (``+inf`` for empty rows, so ``p`` is exactly 0 whatever ``s`` is);
* :func:`combine` -- the exact union of two attentions over disjoint key sets;
* :func:`correction` -- the per-row term a softmax backward subtracts, with the log-sum-exp's
  own gradient folded in (so ``lse`` is differentiable on every backend).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "combine",
    "correction",
    "for_recompute",
    "give_unseen_rows_every_key",
    "lse_from",
    "normalize",
    "shift",
    "zero_unseen",
]


def shift(row_max: Tensor) -> Tensor:
    """The row maximum with infinities (rows with no finite score) replaced by 0."""
    return torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)


def normalize(acc: Tensor, l: Tensor) -> Tensor:
    """``acc / l`` per row (``l`` has one dim fewer); rows with ``l == 0`` give 0, not NaN."""
    return acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]


def lse_from(m: Tensor, l: Tensor) -> Tensor:
    """``m + log(l)``, and ``-inf`` where ``l == 0`` (``m`` is the shift that was subtracted)."""
    return torch.where(l > 0, m + torch.log(torch.where(l > 0, l, torch.ones_like(l))), -torch.inf)


def zero_unseen(out: Tensor, lse: Tensor) -> Tensor:
    """``out (..., E)`` with the rows whose ``lse (...)`` is ``-inf`` set to exactly 0."""
    return torch.where((lse == -torch.inf)[..., None], torch.zeros((), dtype=out.dtype), out)


def give_unseen_rows_every_key(attn_mask: Tensor) -> tuple[Tensor, Tensor]:
    """For kernels that do not promise the convention (torch's CUDA SDPA kernels): rows of a
    bool mask or float bias that see no key are given every key, so the kernel computes
    something finite there; the caller replaces their output by 0 with ``torch.where(seen,
    out, 0)`` (no gradient reaches the keys through them). Returns the mask and ``seen
    (..., N, 1)``. Elementwise, no host synchronization."""
    if attn_mask.dtype == torch.bool:
        seen = attn_mask.any(-1, keepdim=True)
        return attn_mask | ~seen, seen
    seen = torch.isfinite(attn_mask).any(-1, keepdim=True)
    return torch.where(seen, attn_mask, torch.zeros((), dtype=attn_mask.dtype, device=attn_mask.device)), seen


def for_recompute(lse: Tensor) -> Tensor:
    """``lse`` with ``-inf`` replaced by ``+inf``: then ``exp(s - lse)`` is 0 for every ``s``."""
    return torch.where(lse == -torch.inf, torch.inf, lse)


def combine(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Exact union of two attentions over disjoint key sets, through their log-sum-exps.

    ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b`` with ``lse = logaddexp(lse_a,
    lse_b)``. A side whose ``lse`` is ``-inf`` contributes nothing, even if its ``out`` holds
    garbage (NaN, uninitialized memory): it is selected away, never multiplied by 0.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    base = shift(lse)
    a = torch.where((lse_a == -torch.inf)[..., None], 0.0, out_a * torch.exp(lse_a - base)[..., None])
    b = torch.where((lse_b == -torch.inf)[..., None], 0.0, out_b * torch.exp(lse_b - base)[..., None])
    return a + b, lse


def correction(dout: Tensor, out: Tensor, dlse: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``rowsum(dO * O) - dlse`` in ``dtype``, shape ``out.shape[:-1]``.

    The backward of ``out = softmax(s) V`` gives ``dS = P * (dO V^T - rowsum(dO * O))``; the
    log-sum-exp's gradient is ``d lse / d s = P``, so a gradient ``dlse`` flowing into the
    returned ``lse`` adds ``P * dlse``. Both fit in the one per-row term subtracted here.
    """
    delta = (dout.to(dtype) * out.to(dtype)).sum(-1)
    return delta if dlse is None else delta - dlse.to(dtype)
