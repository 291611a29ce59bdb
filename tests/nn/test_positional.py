"""Positional encodings: formulas, the relative-position property of RoPE, ALiBi slopes."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.nn import ALiBi, LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding


def test_sinusoidal_matches_formula_and_extends():
    pe = SinusoidalPositionalEncoding(8, max_len=4)
    x = torch.zeros(1, 6, 8)
    out = pe(x, offset=3)  # positions 3..8, beyond the initial table
    for p in range(3, 9):
        for i in range(4):
            angle = p / 10000 ** (2 * i / 8)
            assert out[0, p - 3, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert out[0, p - 3, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_rejects_odd_dim():
    with pytest.raises(ValueError, match="even dim"):
        SinusoidalPositionalEncoding(7)


def test_learned_embedding_adds_rows_and_checks_range():
    pe = LearnedPositionalEmbedding(5, 4)
    x = torch.zeros(2, 3, 4)
    assert torch.equal(pe(x, offset=2)[0], pe.weight[2:5])
    with pytest.raises(ValueError, match="max_len=5"):
        pe(x, offset=3)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_scores_depend_on_distance_only(layout):
    rope = RotaryEmbedding(16, layout=layout)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    rope.inv_freq = rope.inv_freq.double()

    def score(pq, pk):
        rq = rope(q, torch.tensor([pq]))
        rk = rope(k, torch.tensor([pk]))
        return (rq * rk).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-9)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-12)  # position 0: identity


def test_rope_half_layout_matches_pairing_formula():
    d = 8
    rope = RotaryEmbedding(d, base=100.0)
    x = torch.randn(1, 1, 1, d, dtype=torch.float64)
    p = 5
    got = rope(x, torch.tensor([p]))[0, 0, 0]
    for i in range(d // 2):
        theta = p * 100.0 ** (-2 * i / d)
        a, b = x[0, 0, 0, i].item(), x[0, 0, 0, i + d // 2].item()
        assert got[i].item() == pytest.approx(a * math.cos(theta) - b * math.sin(theta), abs=1e-5)
        assert got[i + d // 2].item() == pytest.approx(b * math.cos(theta) + a * math.sin(theta), abs=1e-5)


def test_rope_batched_positions_and_partial_dims():
    rope = RotaryEmbedding(4)
    x = torch.randn(2, 3, 5, 6)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    out = rope(x, pos)
    assert torch.allclose(out[1], rope(x[1:2], pos[1])[0])
    assert torch.equal(out[..., 4:], x[..., 4:])  # dims beyond the rotary part pass through


def test_rope_linear_scaling_divides_positions():
    plain, scaled = RotaryEmbedding(8), RotaryEmbedding(8, scaling={"rope_type": "linear", "factor": 4.0})
    x = torch.randn(1, 1, 1, 8)
    assert torch.allclose(scaled(x, torch.tensor([8])), plain(x, torch.tensor([2])), atol=1e-6)


def test_rope_rejects_unknown_scaling():
    with pytest.raises(ValueError, match="rope_type"):
        RotaryEmbedding(8, scaling={"rope_type": "yarn", "factor": 2.0})


def test_alibi_slopes_follow_press_et_al():
    assert torch.allclose(ALiBi.compute_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    six = ALiBi.compute_slopes(6)  # 4 from the power of two below, then every other one of 8
    expected = [2.0 ** (-2 * (i + 1)) for i in range(4)] + [2.0**-1, 2.0**-3]
    assert torch.allclose(six, torch.tensor(expected))


def test_alibi_bias_is_minus_slope_times_distance():
    alibi = ALiBi(2, symmetric=False)
    bias = alibi(2, 4)  # queries at positions 2 and 3 (bottom-right)
    assert bias.shape == (1, 2, 2, 4)
    assert bias[0, 0, 1, 0].item() == pytest.approx(-alibi.slopes[0].item() * 3)
    sym = ALiBi(2)(3, 3)
    assert torch.equal(sym, sym.transpose(-1, -2))
