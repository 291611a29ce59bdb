"""The ``tiled`` backend: the FlashAttention algorithm in eager PyTorch.

Algorithm (Dao et al. 2022, https://arxiv.org/abs/2205.14135; the backward loop order of
FlashAttention-2, https://arxiv.org/abs/2307.08691):

* forward -- for each query tile, stream over its key tiles keeping a running row maximum
  ``m``, normalizer ``l`` and unnormalized output; finish with ``out = acc / l`` and the
  log-sum-exp ``lse = m + log(l)``. Memory is ``O(N)`` beyond the inputs: no ``N x S`` tensor.
* backward -- recompute each tile's probabilities from the saved ``lse``
  (``p = exp(s - lse)``), then ``dV += p^T dO``, ``dP = dO V^T``,
  ``dS = p * (dP - rowsum(dO * O))``, ``dQ += dS K``, ``dK += dS^T Q``; ``dS`` is also the
  gradient of an additive bias.

Tiles come from the pattern's :class:`~attnkit.patterns.BlockMap`: empty tiles are skipped,
full tiles run with no mask, partial tiles evaluate the pattern's element rule. Query heads
that share a key/value head (GQA) are stacked along the rows of one matmul.

Supports: every device and float dtype (half types accumulate in float32), every pattern,
boolean masks, float biases with gradients, dropout (the counter-based mask shared with
``reference``), the log-sum-exp. Known limitations: a Python loop over tiles, so small tiles
pay interpreter overhead; the returned log-sum-exp carries no gradient; no attention weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..patterns import BlockMap, Full
from . import _rows
from ._dropout import keep_grid
from ._masks import heads_as_groups, reduce_to, tile
from .base import AttentionInputs, AttentionResult, Backend, compute_dtype, lse_dtype

__all__ = ["TiledBackend"]


class TiledBackend(Backend):
    name = "tiled"
    supports_dropout = True
    supports_lse = True

    #: Tile size ``(queries, keys)``. 256 x 256 keeps the Python overhead per tile small next
    #: to the matmuls on CPU (see docs/benchmarks.md).
    block = (256, 256)

    @classmethod
    def forward(cls, inp: AttentionInputs) -> AttentionResult:
        bq, bk = cls.block
        pattern = inp.pattern if inp.pattern is not None else Full()
        plan = _Plan(inp=inp, blocks=pattern.block_map(inp.N, inp.S, (bq, bk)))
        bias = inp.bias if inp.bias is not None else torch.empty(0, device=inp.device)
        out, lse = _TiledAttention.apply(inp.q, inp.k, inp.v, bias, plan)
        return AttentionResult(out, None, lse if inp.return_lse else None)


@dataclass(frozen=True, eq=False)
class _Plan:
    inp: AttentionInputs
    blocks: BlockMap

    def tile_mask(self, r: int, c: int, full: bool) -> Tensor | None:
        """Boolean ``allowed`` mask of tile ``(r, c)`` in 5-D ``(b, Hkv, G, bq, bk)`` form."""
        inp, bm = self.inp, self.blocks
        i0, i1 = bm.q_range(r)
        j0, j1 = bm.k_range(c)
        allowed = None
        if not full:
            dev = inp.device
            q_idx = torch.arange(i0, i1, device=dev).view(-1, 1)
            kv_idx = torch.arange(j0, j1, device=dev).view(1, -1)
            allowed = inp.pattern.evaluate(q_idx, kv_idx, inp.N, inp.S)
            if inp.pattern.batch_size is not None:
                allowed = allowed.view(allowed.shape[0], 1, 1, *allowed.shape[1:])
        if inp.mask is not None:
            m = tile(heads_as_groups(inp.mask, inp.Hkv), i0, i1, j0, j1)
            allowed = m if allowed is None else allowed & m
        return allowed

    def tile_keep(self, r: int, c: int) -> Tensor:
        """Dropout keep mask of tile ``(r, c)``, ``(B, Hkv, G, bq, bk)``."""
        inp, bm = self.inp, self.blocks
        i0, i1 = bm.q_range(r)
        j0, j1 = bm.k_range(c)
        dev = inp.device
        keep = keep_grid(
            inp.dropout_seed,
            inp.dropout_p,
            torch.arange(inp.B, device=dev),
            torch.arange(inp.H, device=dev),
            torch.arange(i0, i1, device=dev),
            torch.arange(j0, j1, device=dev),
        )
        return keep.view(inp.B, inp.Hkv, inp.G, i1 - i0, j1 - j0)

    def scores(self, q_tile: Tensor, k_tile: Tensor, r: int, c: int, full: bool, bias5) -> Tensor:
        """Masked, biased scores of tile ``(r, c)`` as ``(B, Hkv, G, bq, bk)``.

        ``q_tile`` is ``(B, Hkv, G * bq, D)`` already multiplied by the scale.
        """
        inp, bm = self.inp, self.blocks
        i0, i1 = bm.q_range(r)
        j0, j1 = bm.k_range(c)
        s = q_tile @ k_tile.transpose(-1, -2)  # (B, Hkv, G * bq, bk)
        s = s.view(inp.B, inp.Hkv, inp.G, i1 - i0, j1 - j0)
        if bias5 is not None:
            s = s + tile(bias5, i0, i1, j0, j1)
        allowed = self.tile_mask(r, c, full)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        return s


def _q_tile(q5: Tensor, i0: int, i1: int, ct: torch.dtype) -> Tensor:
    """Rows ``i0:i1`` of every head of a ``(B, Hkv, G, N, D)`` view, as ``(B, Hkv, G*bq, D)``."""
    t = q5[:, :, :, i0:i1].to(ct)
    return t.reshape(t.shape[0], t.shape[1], -1, t.shape[-1])


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, plan: _Plan):
        inp, bm = plan.inp, plan.blocks
        ct = compute_dtype(q.dtype)
        B, Hkv, G, N, Dv = inp.B, inp.Hkv, inp.G, inp.N, inp.Dv
        q5 = q.view(B, Hkv, G, N, inp.D)
        bias5 = heads_as_groups(bias, Hkv) if bias.numel() else None
        out = torch.zeros(B, Hkv, G, N, Dv, dtype=ct, device=q.device)
        # The backward recomputes p = exp((s - row_max) - log_l): keeping the two terms apart
        # (rather than one lse) keeps p accurate to a few ulps when |lse| is large.
        row_max = torch.zeros(B, Hkv, G, N, dtype=ct, device=q.device)
        log_l = torch.full((B, Hkv, G, N), -torch.inf, dtype=ct, device=q.device)
        dropping = inp.dropout_p > 0
        for r, row in enumerate(bm.rows):
            if not row:
                continue  # every query of this tile sees nothing: zeros, lse -inf
            i0, i1 = bm.q_range(r)
            qt = _q_tile(q5, i0, i1, ct) * inp.scale
            m = torch.full((B, Hkv, G, i1 - i0), float("-inf"), dtype=ct, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros(B, Hkv, G, i1 - i0, Dv, dtype=ct, device=q.device)
            for c, full in row:
                j0, j1 = bm.k_range(c)
                s = plan.scores(qt, k[:, :, j0:j1].to(ct), r, c, full, bias5)
                m_new = torch.maximum(m, s.amax(-1))
                shift = _rows.shift(m_new)
                p = torch.exp(s - shift[..., None])
                alpha = torch.exp(m - shift)
                l = l * alpha + p.sum(-1)
                if dropping:
                    p = p * plan.tile_keep(r, c) * (1.0 / (1.0 - inp.dropout_p))
                pv = p.view(B, Hkv, -1, j1 - j0) @ v[:, :, j0:j1].to(ct)
                acc = acc * alpha[..., None] + pv.view(B, Hkv, G, i1 - i0, Dv)
                m = m_new
            out[:, :, :, i0:i1] = _rows.normalize(acc, l)
            row_max[:, :, :, i0:i1] = _rows.shift(m)
            # Kept apart from the shift: lse - row_max, -inf for rows that saw nothing
            log_l[:, :, :, i0:i1] = _rows.lse_from(torch.zeros_like(l), l)
        out = out.view(B, inp.H, N, Dv).to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, out, row_max, log_l)
        ctx.plan = plan
        lse = (row_max + log_l).view(B, inp.H, N)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return out, lse.to(lse_dtype(q.dtype))

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        q, k, v, bias, out, row_max, log_l = ctx.saved_tensors
        log_l = _rows.for_recompute(log_l)  # rows that saw nothing: p = exp(s - inf) = 0
        plan: _Plan = ctx.plan
        inp, bm = plan.inp, plan.blocks
        ct = compute_dtype(q.dtype)
        B, Hkv, G, N, S, D, Dv = inp.B, inp.Hkv, inp.G, inp.N, inp.S, inp.D, inp.Dv
        q5 = q.view(B, Hkv, G, N, D)
        if dout is None:  # only the lse is differentiated
            dout = torch.zeros_like(out)
        do5 = dout.reshape(B, Hkv, G, N, Dv)
        # rowsum(dO * O) - dlse: the softmax Jacobian's per-row term, (B, Hkv, G, N)
        dlse5 = None if dlse is None else dlse.reshape(B, Hkv, G, N)
        delta = _rows.correction(do5, out.view(B, Hkv, G, N, Dv), dlse5, ct)
        has_bias = bias.numel() > 0
        bias5 = heads_as_groups(bias, Hkv) if has_bias else None
        want_dbias = has_bias and ctx.needs_input_grad[3]
        dbias = torch.zeros(bias.shape, dtype=ct, device=bias.device) if want_dbias else None
        dq = torch.zeros(B, Hkv, G, N, D, dtype=ct, device=q.device)
        dk = torch.zeros(B, Hkv, S, D, dtype=ct, device=q.device)
        dv = torch.zeros(B, Hkv, S, Dv, dtype=ct, device=q.device)
        inv_keep = 1.0 / (1.0 - inp.dropout_p)
        for c, col in enumerate(bm.cols):
            if not col:
                continue
            j0, j1 = bm.k_range(c)
            kt, vt = k[:, :, j0:j1].to(ct), v[:, :, j0:j1].to(ct)
            dk_acc = torch.zeros(B, Hkv, j1 - j0, D, dtype=ct, device=q.device)
            dv_acc = torch.zeros(B, Hkv, j1 - j0, Dv, dtype=ct, device=q.device)
            for r, full in col:
                i0, i1 = bm.q_range(r)
                rows = G * (i1 - i0)
                qt = _q_tile(q5, i0, i1, ct)
                s = plan.scores(qt * inp.scale, kt, r, c, full, bias5)
                s = s - row_max[:, :, :, i0:i1, None]
                p = torch.exp(s - log_l[:, :, :, i0:i1, None])  # (B, Hkv, G, bq, bk)
                dot = _q_tile(do5, i0, i1, ct)  # (B, Hkv, G*bq, Dv)
                dp = (dot @ vt.transpose(-1, -2)).view_as(p)
                if inp.dropout_p > 0:
                    keep = plan.tile_keep(r, c).to(ct) * inv_keep
                    dv_acc += (p * keep).view(B, Hkv, rows, -1).transpose(-1, -2) @ dot
                    dp = dp * keep
                else:
                    dv_acc += p.view(B, Hkv, rows, -1).transpose(-1, -2) @ dot
                ds = p * (dp - delta[:, :, :, i0:i1, None])
                ds4 = ds.view(B, Hkv, rows, -1)
                dq[:, :, :, i0:i1] += (ds4 @ kt).view(B, Hkv, G, i1 - i0, D)
                dk_acc += ds4.transpose(-1, -2) @ qt
                if dbias is not None:
                    g = reduce_to(ds.reshape(B, inp.H, i1 - i0, j1 - j0), dbias.shape)
                    tile(dbias, i0, i1, j0, j1).add_(g)
            dk[:, :, j0:j1] = dk_acc * inp.scale
            dv[:, :, j0:j1] = dv_acc
        dq = (dq * inp.scale).view(B, inp.H, N, D).to(q.dtype)
        db = dbias.to(bias.dtype) if dbias is not None else None
        return dq, dk.to(k.dtype), dv.to(v.dtype), db, None
