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


def attention_ref(q, k, v, *, pattern=None, mask=None, scale=None, dtype=torch.float64):
    """Attention computed in ``dtype`` (float64 by default) with explicit masking.

    Rows with no allowed key give 0. Differentiable (use float64 leaves for golden grads).
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
    return torch.einsum("bhns,bhsd->bhnd", probs, v)


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
