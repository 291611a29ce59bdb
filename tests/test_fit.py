"""``attnkit.fit``: coverage on synthetic heads whose weights are known, and fitting that picks
the known answer."""

from __future__ import annotations

import pytest
import torch

from attnkit import fit
from attnkit import patterns as P
from attnkit.nn import MultiHeadAttention
from attnkit.viz import record

N = 8


def _two_head_model() -> MultiHeadAttention:
    """Head 0 attends to its own position (q.k = 40 on the diagonal, 0 elsewhere); head 1 has
    q = 0, so it spreads its weight evenly over every key it may see."""
    mha = MultiHeadAttention(16, 2, bias=False).double()
    with torch.no_grad():
        for proj in (mha.q_proj, mha.k_proj, mha.v_proj, mha.out_proj):
            proj.weight.zero_()
        mha.q_proj.weight[:8, :8] = 40 * 8**0.5 * torch.eye(8)  # cancels the 1/sqrt(8) scale
        mha.k_proj.weight[:8, :8] = torch.eye(8)
    return mha


def _inputs():
    x = torch.zeros(1, N, 16, dtype=torch.float64)
    x[0, :, :N] = torch.eye(N)  # position i is the one-hot e_i
    return [x, x.clone()]


def test_coverage_equals_the_hand_computation():
    model = _two_head_model()
    candidates = [
        P.SlidingWindow(0, 0),
        P.SlidingWindow(1, 1),
        P.SlidingWindow(1, 1) | P.Global((0,)),
        P.Full(),
    ]
    cov = fit.coverage(model, _inputs(), candidates)
    assert cov.layers and cov.mass.shape == (1, 2, 4) and cov.rows == 2 * N
    # head 1 is uniform over all 8 keys: a candidate keeps (allowed keys in the row) / 8, averaged
    for c, pattern in enumerate(candidates):
        want = pattern.to_dense(N, N).double().sum(-1).div(N).mean()
        assert cov.mass[0, 1, c].item() == pytest.approx(want.item(), abs=1e-6)
        assert cov.density[c].item() == pytest.approx(pattern.density(N, N), abs=1e-6)
    # head 0 puts 1 - 7 e^-40 on its own position: every candidate keeps it
    assert torch.allclose(cov.mass[0, 0], torch.ones(4), atol=1e-6)
    assert cov.mass[0, 1, 3].item() == pytest.approx(1.0)


def test_fit_picks_the_known_answer():
    model = _two_head_model()
    candidates = [P.Full(), P.SlidingWindow(1, 1), P.SlidingWindow(0, 0)]
    cov = fit.coverage(model, _inputs(), candidates)
    (layer,) = fit.fit_patterns(cov, keep=0.95)
    assert layer == P.PerHead([P.SlidingWindow(0, 0), P.Full()])  # the cheapest that keeps 95%
    (layer,) = fit.fit_patterns(cov, budget=0.4)  # head 1 keeps most under a window of 3
    assert layer == P.PerHead([P.SlidingWindow(0, 0), P.SlidingWindow(1, 1)])
    assert "h1:Full() keeps 1.00" in cov.table()
    # the fitted pattern runs: head 0 is unchanged by it, head 1 now sees three keys
    with record(model) as rec:
        model(_inputs()[0], pattern=layer)
    w = rec.weights[0][0]
    assert torch.allclose(w[0], torch.eye(N).float(), atol=1e-6)
    assert torch.equal(w[1] > 0, P.SlidingWindow(1, 1).to_dense(N, N))


def test_fit_chooses_on_synthetic_coverage_and_checks_arguments():
    candidates = [P.Full(), P.SlidingWindow(4, 4), P.SlidingWindow(4, 4) | P.Global((0,))]
    mass = torch.tensor([[[1.0, 0.5, 0.97], [1.0, 0.99, 0.995], [1.0, 0.2, 0.3]]])
    cov = fit.Coverage(["layer"], candidates, mass, torch.tensor([1.0, 0.1, 0.15]), rows=10)
    (layer,) = fit.fit_patterns(cov, keep=0.95)
    assert layer.heads == (candidates[2], candidates[1], candidates[0])
    with pytest.raises(ValueError, match="not both"):
        fit.fit_patterns(cov, keep=0.9, budget=0.5)
    with pytest.raises(ValueError, match=r"no candidate has density <= budget=0\.05"):
        fit.fit_patterns(cov, budget=0.05)
    with pytest.raises(ValueError, match=r"0 < keep <= 1"):
        fit.fit_patterns(cov, keep=1.5)
    with pytest.raises(ValueError, match="at least one candidate"):
        fit.coverage(_two_head_model(), _inputs(), [])
    assert len(fit.default_candidates()) == 16 and fit.default_candidates()[-1] == P.Full()


def test_record_keeps_each_heads_own_pattern():
    model = _two_head_model()
    pattern = P.PerHead([P.Causal(), P.SlidingWindow(1, 1)])
    with record(model, heads=[1]) as rec:
        model(_inputs()[0], pattern=pattern)
    assert torch.equal(rec.weights[0][0, 0] > 0, P.SlidingWindow(1, 1).to_dense(N, N))
    with (
        pytest.raises(ValueError, match="kept heads use different patterns"),
        record(model, capture_inputs=True),
    ):
        model(_inputs()[0], pattern=pattern)
