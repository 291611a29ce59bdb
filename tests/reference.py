"""The test oracle: obvious attention in float64, and naive eager attention at the input dtype.

``attention_ref`` is slow and obvious by design (einsum strings, materialized masks). The
naive eager version is what a user would write in plain PyTorch at the input's own dtype;
its error against the oracle is the yardstick for every backend ("at most 2x").
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.patterns import EMPTY, FULL, PARTIAL, Pattern


def allowed_mask(pattern: Pattern | None, mask: Tensor | None, n: int, s: int) -> Tensor | None:
    """Dense ``allowed`` (broadcastable to ``(B, H, N, S)``) from a pattern and a bool mask."""
    allowed = None
    if pattern is not None:
        dense = pattern.to_dense(n, s)
        allowed = dense if dense.dim() == 4 else dense.view(1, 1, n, s)
    if mask is not None and mask.dtype == torch.bool:
        allowed = mask if allowed is None else allowed & mask
    return allowed


def attention_ref(q, k, v, *, pattern=None, mask=None, scale=None, dtype=torch.float64, return_lse=False):
    """Attention computed in ``dtype`` (float64 by default) with explicit masking.

    Rows with no allowed key give 0 (and, with ``return_lse``, a log-sum-exp of -inf).
    Differentiable (use float64 leaves for golden grads).
    """
    H, Hkv = q.shape[1], k.shape[1]
    n, s = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = torch.einsum("bhnd,bhsd->bhns", q, k) * scale
    if mask is not None and mask.is_floating_point():
        scores = scores + mask.to(dtype)
    allowed = allowed_mask(pattern, mask, n, s)
    if allowed is None:
        allowed = torch.ones(1, 1, n, s, dtype=torch.bool)
    allowed = allowed & torch.isfinite(scores)  # -inf bias entries hide keys too
    has_any = allowed.any(-1, keepdim=True)
    # Rows that see nothing: softmax over a dummy all-visible row, then zeroed.
    scores = scores.masked_fill(~allowed & has_any, float("-inf"))
    scores = torch.where(has_any, scores, torch.zeros_like(scores))
    probs = scores.softmax(-1) * has_any
    out = torch.einsum("bhns,bhsd->bhnd", probs, v)
    if not return_lse:
        return out
    lse = torch.where(has_any[..., 0], torch.logsumexp(scores, -1), -torch.inf)
    return out, lse


def naive_eager(q, k, v, *, pattern=None, mask=None, scale=None):
    """What plain PyTorch at the inputs' own dtype would give (the yardstick)."""
    return attention_ref(q, k, v, pattern=pattern, mask=mask, scale=scale, dtype=q.dtype)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def report(name: str, got: Tensor, want: Tensor, bound: float) -> str:
    """A failure message naming the worst element and how many elements exceed the bound."""
    diff = (got.double() - want.double()).abs()
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    bad = int((diff > bound).sum())
    return (
        f"{name}: max |err| {diff.max().item():.3e} > bound {bound:.3e} at {worst} "
        f"(got {got.flatten()[diff.argmax()].item():.6g}, want "
        f"{want.flatten()[diff.argmax()].item():.6g}); {bad}/{diff.numel()} elements "
        f"({100 * bad / diff.numel():.2f}%) exceed it"
    )


def grads(fn, leaves: list[Tensor], dout: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Output of ``fn()`` and the gradients of ``leaves`` for the loss ``(out * dout).sum()``."""
    for t in leaves:
        t.grad = None
    out = fn()
    (out.double() * dout.double()).sum().backward()
    return out.detach(), [t.grad.detach().clone() for t in leaves]


def assert_block_map_exact(pattern: Pattern, n: int, s: int, block: tuple[int, int]) -> None:
    """Every tile's state is what the dense mask says: FULL and EMPTY exactly, never just "safe"."""
    dense = pattern.to_dense(n, s).reshape(-1, n, s)
    bm = pattern.block_map(n, s, block)
    bq, bk = block
    assert bm.states.shape == (-(-n // bq), -(-s // bk))
    for r in range(bm.num_q_blocks):
        for c in range(bm.num_k_blocks):
            t = dense[:, r * bq : (r + 1) * bq, c * bk : (c + 1) * bk]
            want = FULL if t.all() else EMPTY if not t.any() else PARTIAL
            assert bm.states[r, c] == want, (
                f"tile ({r}, {c}) of {pattern!r}: {int(bm.states[r, c])} != {want}"
            )


def spec_dense(pattern: Pattern, n: int, s: int) -> Tensor:
    """``pattern``'s mask from its documented definition, evaluated pair by pair in plain Python:
    ``(N, S)``, or ``(B, 1, N, S)`` when it has a batch dimension.

    Independent of the patterns' own code (no ``mask_mod``, no tensors), except for the cells
    ``Random`` draws, whose hash is pinned by its own test. Compositions combine their parts'
    answers with ``and``/``or``.
    """
    import attnkit.patterns as P

    def rule(p: Pattern, i: int, j: int, b: int) -> bool:
        q = i + (s - n if getattr(p, "align", "bottom_right") == "bottom_right" else 0)
        if isinstance(p, P.And):
            return all(rule(part, i, j, b) for part in p.parts)
        if isinstance(p, P.Or):
            return any(rule(part, i, j, b) for part in p.parts)
        if isinstance(p, P.Full):
            return True
        if isinstance(p, P.Causal):
            return j <= q
        if isinstance(p, P.SlidingWindow):
            return q - p.before <= j <= q + p.after
        if isinstance(p, P.Dilated):
            return q - p.before <= j <= q + p.after and (q - j) % p.dilation == 0
        if isinstance(p, P.Strided):
            return abs(q - j) < p.stride or (q - j) % p.stride == 0
        if isinstance(p, P.Fixed):
            return q // p.block == j // p.block or j % p.block >= p.block - p.summary
        if isinstance(p, P.Global):
            return q in p.indices or j in p.indices
        if isinstance(p, P.Document):
            ends = [sum(p.lengths[: k + 1]) for k in range(len(p.lengths))]
            if not 0 <= q < s:
                return False
            return next(k for k, e in enumerate(ends) if q < e) == next(
                k for k, e in enumerate(ends) if j < e
            )
        if isinstance(p, P.KeyPadding):
            return j < p.lengths[b]
        if isinstance(p, P.BlockLayout):
            return bool(p.layout[i // p.block, j // p.block])
        if isinstance(p, P.Random):
            first, table = p.cells(n, s)
            r = q // p.block - first
            return bool(table[r, j // p.block])  # every query block draws, wherever it sits
        raise TypeError(f"spec_dense: no definition for {type(p).__name__}")

    batch = pattern.batch_size
    dense = torch.tensor(
        [[[rule(pattern, i, j, b) for j in range(s)] for i in range(n)] for b in range(batch or 1)],
        dtype=torch.bool,
    )
    return dense[:, None] if batch is not None else dense[0]
