"""One log-sum-exp contract: ``attention(..., return_lse=True)`` returns an lse that is
differentiable on every backend and at every length, equal to the float64 oracle's value and
gradient (``d lse / d s = softmax(s)``), so ``(out.sum() + lse.sum()).backward()`` never drops a
term because ``auto`` routed a call to another backend."""

from __future__ import annotations

import pytest
import torch

from attnkit import attention, backends
from attnkit import patterns as P
from attnkit.backends import _tuning
from attnkit.functional import build_inputs

from ..reference import attention_ref, max_err, report
from .cases import SHAPES, make_inputs, shape_id

CASES = ["none", "causal", "window", "bigbird", "padding", "bool-mask", "bias"]


def _loss_grads(fn, tensors, dout, dlse):
    """``out``, ``lse`` and the gradients of ``(out * dout).sum() + (lse * dlse).sum()`` (rows
    whose lse is -inf contribute no lse term)."""
    leaves = [
        t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in tensors
    ]
    out, lse = fn(*leaves)
    finite = torch.isfinite(lse)
    loss = (out.double() * dout).sum() + torch.where(finite, lse.double() * dlse, 0.0).sum()
    trainable = [t for t in leaves if t is not None and t.requires_grad]
    return out.detach(), lse.detach(), torch.autograd.grad(loss, trainable)


def _check(backend, pattern, mask, q, k, v, tol):
    dout = torch.randn(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    dlse = torch.randn(*q.shape[:3], dtype=torch.float64)

    def ref(q, k, v, m):
        return attention_ref(q, k, v, pattern=pattern, mask=m, return_lse=True)

    def got(q, k, v, m):
        return attention(q, k, v, pattern=pattern, mask=m, backend=backend, return_lse=True)

    w_out, w_lse, w_g = _loss_grads(
        ref,
        [t.double() if t is not None and t.is_floating_point() else t for t in (q, k, v, mask)],
        dout,
        dlse,
    )
    g_out, g_lse, g_g = _loss_grads(got, [q, k, v, mask], dout, dlse)
    assert torch.equal(torch.isfinite(g_lse), torch.isfinite(w_lse)), "rows with no key: lse -inf"
    g_lse, w_lse = (torch.where(torch.isfinite(w_lse), t, 0.0) for t in (g_lse, w_lse))
    assert max_err(g_lse, w_lse) <= tol, report("lse", g_lse, w_lse, tol)
    assert max_err(g_out, w_out) <= tol, report("out", g_out, w_out, tol)
    for name, g, w in zip(["dq", "dk", "dv", "dbias"], g_g, w_g, strict=False):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        assert max_err(g, w) <= tol, report(name, g, w, tol)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mask_case", CASES)
@pytest.mark.parametrize("backend", ["reference", "eager", "tiled", "blocksparse", "triton"])
def test_lse_gradient_equals_the_oracle(backend, mask_case, shape, small_tiles):
    # float64 where a backend takes it (exact up to rounding); Triton's kernels are float32 at most
    dtype, tol = (torch.float32, 2e-5) if backend == "triton" else (torch.float64, 1e-10)
    pattern, mask, q, k, v = make_inputs(shape, dtype, mask_case)
    inp = build_inputs(q, k, v, pattern=pattern, mask=mask, return_lse=True)
    reasons = backends.get(backend).unsupported_reasons(inp)
    if reasons:
        pytest.skip("; ".join(reasons))
    _check(backend, pattern, mask, q, k, v, tol)


def test_lse_gradient_is_the_same_on_both_sides_of_every_crossover():
    """auto's routes by length: eager below this machine's measured crossover, a tiled backend
    above; blocksparse past its smallest tile. Each length keeps the lse term (float32)."""
    longest_eager = _tuning.current(torch.float32).eager_keys
    smallest_tile = min(_tuning.TILES)
    lengths = sorted(
        {
            1,
            17,
            max(2, longest_eager),
            longest_eager + 1,
            smallest_tile,
            smallest_tile + 1,
            3 * smallest_tile + 5,
        }
    )
    chosen = set()
    for pattern in (P.Causal(), P.SlidingWindow(8, 0)):
        for n in lengths:
            q, k, v = (torch.randn(1, 4, n, 16) for _ in range(3))
            inp = build_inputs(q.requires_grad_(), k, v, pattern=pattern, return_lse=True)
            chosen.add(backends.select(inp).name)
            _check("auto", pattern, None, q.detach(), k, v, 2e-5)
    assert len(chosen) >= 2, f"every length took one route ({chosen}): the test crosses nothing"
