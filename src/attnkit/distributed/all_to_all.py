"""All-to-all attention (``method="all_to_all"``, DeepSpeed-Ulysses, Jacobs et al. 2023):
sequence sharding swapped for head sharding, the whole sequence attended on ``H / P`` heads by
any local backend, and swapped back."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional
from .layouts import _reorder
from .ring import _Plan
from .transport import _exchange_all, _Group


# --------------------------------------------------------------------------- all-to-all
def _all_to_all_attention(q, k, v, plan: _Plan, mask, scale, return_lse):
    P, me = plan.g.size, plan.g.rank
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv % P:  # this rank's query heads need key heads that other ranks need too: expand
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    qh = _SeqToHeads.apply(q, plan.q_ranges, plan.g)
    kh = _SeqToHeads.apply(k, plan.k_ranges, plan.g)
    vh = _SeqToHeads.apply(v, plan.k_ranges, plan.g)
    mh = None
    if mask is not None:
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        per = H // P
        mh = m[:, me * per : (me + 1) * per] if m.shape[1] > 1 else m
    res = functional.attention(qh, kh, vh, pattern=plan.pattern, mask=mh, scale=scale, return_lse=return_lse)
    if return_lse:
        out_h, lse_h = res
        lse = _SeqToHeads.apply(lse_h[..., None], plan.q_ranges, plan.g, True)[..., 0]
        return _SeqToHeads.apply(out_h, plan.q_ranges, plan.g, True), lse
    return _SeqToHeads.apply(res, plan.q_ranges, plan.g, True)


class _SeqToHeads(torch.autograd.Function):
    """``(B, X, n_local, E)`` sequence-sharded <-> ``(B, X / P, n, E)`` head-sharded (``back``)."""

    @staticmethod
    def forward(ctx, x, ranges, g: _Group, back: bool = False):
        ctx.ranges, ctx.g, ctx.back = ranges, g, back
        return _swap(x, ranges, g, back)

    @staticmethod
    def backward(ctx, grad):
        return _swap(grad.contiguous(), ctx.ranges, ctx.g, not ctx.back), None, None, None


def _swap(x: Tensor, ranges, g: _Group, back: bool) -> Tensor:
    P, me = g.size, g.rank
    lengths = [sum(b - a for a, b in r) for r in ranges]
    if not back:  # send head chunk r of my tokens to rank r; receive my head chunk of theirs
        B, X, _, E = x.shape
        chunks = [c.contiguous() for c in x.chunk(P, 1)]
        shape = lambda r: (B, X // P, lengths[r], E)  # noqa: E731
        got = _exchange_all(g, chunks, shape, x.dtype, "all_to_all (sequence to heads)")
        full = torch.cat(got, 2)
        return _reorder(full, ranges, to_global=True)
    B, Xp, _, E = x.shape
    ordered = _reorder(x, ranges, to_global=False)
    chunks = [c.contiguous() for c in ordered.split(lengths, 2)]
    got = _exchange_all(
        g, chunks, lambda r: (B, Xp, lengths[me], E), x.dtype, "all_to_all (heads to sequence)"
    )
    return torch.cat(got, 1)
