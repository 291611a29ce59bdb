"""attnkit's CPU dropout: its rate, scale, gradient, determinism and errors."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.nn import Dropout
from attnkit.nn.dropout import dropout


def effective(p: float) -> float:
    return round(p * 65536) / 65536


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_rate_and_scale_per_lane(p):
    """Each of the four 16-bit lanes of a random word drops at the rate p (a biased lane,
    such as a sign bit that is never set, would show here), and kept elements are scaled by
    exactly 1 / (1 - p)."""
    torch.manual_seed(0)
    n = 4 * 250_000
    out = dropout(torch.ones(n), p)
    q = effective(p)
    kept = out[out != 0]
    assert torch.equal(kept, torch.full_like(kept, 1 / (1 - q)))
    sigma = math.sqrt(q * (1 - q) / (n // 4))
    per_lane = (out == 0).view(-1, 4).double().mean(0)
    assert ((per_lane - q).abs() < 5 * sigma).all(), per_lane
    assert abs(float(out.double().mean()) - 1.0) < 5 * math.sqrt(q / (1 - q) / n)


def test_rounded_rate():
    torch.manual_seed(0)
    out = dropout(torch.ones(1000), 0.1)  # p rounds to 6554 / 65536; the scale follows it
    assert torch.equal(out[out != 0], torch.full_like(out[out != 0], 65536 / (65536 - 6554)))
    assert torch.equal(dropout(torch.ones(1000), 1e-6), torch.ones(1000))  # rounds to 0: nothing dropped


@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (2, 1, 9)])
def test_backward_is_the_mask_times_the_scale(shape):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape, dtype=torch.float64)
    torch.manual_seed(2)
    out = dropout(x, 0.4)
    assert out.shape == x.shape
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    kept = out != 0
    scale = 1 / (1 - effective(0.4))
    assert torch.equal(grad, torch.where(kept, w * scale, 0.0))
    assert torch.equal(out, torch.where(kept, x * scale, 0.0))


def test_same_seed_same_mask_and_other_seeds_differ():
    x = torch.randn(4, 33)
    torch.manual_seed(7)
    a = dropout(x, 0.5)
    torch.manual_seed(7)
    b = dropout(x, 0.5)
    c = dropout(x, 0.5)  # the generator moved on
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_module_identity_in_eval_and_bounds():
    x = torch.randn(5, 6, dtype=torch.bfloat16)
    m = Dropout(0.2)
    assert m(x).dtype == torch.bfloat16 and repr(m) == "Dropout(p=0.2)"
    m.eval()
    assert m(x) is x
    assert Dropout(0.0)(x) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert dropout(torch.empty(0, 3), 0.5).shape == (0, 3)
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match=f"expected p in \\[0, 1\\], but got p={bad!r}"):
            Dropout(bad)
    with pytest.raises(ValueError, match="dropout: expected p in"):
        dropout(x, 2.0)


def test_integer_input_is_refused():
    with pytest.raises(TypeError, match=r"expected a floating-point x, but got torch\.int64"):
        dropout(torch.ones(4, dtype=torch.long), 0.5)
