"""attnkit.nn.cross_entropy: torch's cross-entropy in blocks of rows, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnkit.nn import cross_entropy
from attnkit.nn import loss as loss_module


def case(n: int, v: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = (3 * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g)
    return scores, target


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (37, 300), (2, 5000)])
def test_matches_torch_in_float64(shape, label_smoothing, reduction):
    scores, target = case(*shape)
    got = cross_entropy(scores, target, label_smoothing=label_smoothing, reduction=reduction)
    want = F.cross_entropy(scores, target, label_smoothing=label_smoothing, reduction=reduction)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    weight = torch.randn(want.shape, dtype=torch.float64)  # a non-uniform incoming gradient
    (a,) = torch.autograd.grad((got * weight).sum(), scores)
    (b,) = torch.autograd.grad((want * weight).sum(), scores)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_blocks_do_not_change_the_result(monkeypatch):
    """Rows not divisible by the block (one row per block, a ragged last block, one block)."""
    scores, target = case(23, 64)
    want = F.cross_entropy(scores, target, label_smoothing=0.1, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), scores)
    for block_bytes in (1, 64 * 8 * 5, 1 << 30):
        monkeypatch.setattr(loss_module, "_BLOCK_BYTES", block_bytes)
        got = cross_entropy(scores, target, label_smoothing=0.1, reduction="none")
        (grad,) = torch.autograd.grad(got.sum(), scores)
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
        assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_scores_computed_in_float32(dtype):
    """The loss is float32 for half-precision scores, and close to float64 on the same
    (rounded) scores; the gradient has the scores' dtype."""
    scores, target = case(50, 1000, dtype=dtype)
    got = cross_entropy(scores, target, label_smoothing=0.1)
    exact = F.cross_entropy(scores.detach().double(), target, label_smoothing=0.1)
    assert got.dtype == torch.float32
    assert abs(float(got.detach()) - float(exact)) < 1e-5 * float(exact)
    (grad,) = torch.autograd.grad(got, scores)
    ref = scores.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy(ref, target, label_smoothing=0.1), ref)
    tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-6}[dtype]
    assert grad.dtype == dtype
    assert (grad.double() - want).abs().max() <= tol * want.abs().max()


def test_under_autocast_and_huge_scores():
    """bf16 autocast around the call changes nothing (the loss stays float32); scores of 1e4
    give finite values."""
    scores, target = case(8, 100, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cross_entropy(scores, target)
    assert got.dtype == torch.float32
    assert torch.allclose(got, F.cross_entropy(scores, target), rtol=1e-6)
    big = (scores.detach() * 1e4).requires_grad_()
    out = cross_entropy(big, target, label_smoothing=0.1)
    (grad,) = torch.autograd.grad(out, big)
    assert torch.isfinite(out) and torch.isfinite(grad).all()


def test_no_rows():
    scores = torch.zeros(0, 5, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    assert cross_entropy(scores, target, reduction="sum").item() == 0.0
    assert cross_entropy(scores, target, reduction="none").shape == (0,)


def test_errors_name_the_argument():
    scores, target = case(4, 6)
    with pytest.raises(ValueError, match=r"scores of shape \(N, V\), but got torch.float64 \(4, 6, 1\)"):
        cross_entropy(scores[..., None], target)
    with pytest.raises(ValueError, match=r"floating-point scores.*torch.int64"):
        cross_entropy(torch.zeros(4, 6, dtype=torch.long), target)
    with pytest.raises(ValueError, match=r"int64 target of shape \(4,\), but got torch.int32 \(4,\)"):
        cross_entropy(scores, target.int())
    with pytest.raises(ValueError, match=r"target of shape \(4,\), but got torch.int64 \(3,\)"):
        cross_entropy(scores, target[:3])
    with pytest.raises(ValueError, match=r"target ids in \[0, 6\), but got \[-1, "):
        cross_entropy(scores, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match=r"target ids in \[0, 6\), but got \[0, 6\]"):
        cross_entropy(scores, torch.tensor([0, 6, 2, 3]))
    with pytest.raises(ValueError, match="V >= 1"):
        cross_entropy(torch.zeros(4, 0), target)
    with pytest.raises(ValueError, match=r"label_smoothing in \[0, 1\], but got 1.5"):
        cross_entropy(scores, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction in"):
        cross_entropy(scores, target, reduction="avg")
