"""``attnkit.fit``: coverage on synthetic heads whose weights are known, blockwise coverage against
the dense weights, and fitting that picks the known answer."""

from __future__ import annotations

import pytest
import torch

from attnkit import fit
from attnkit import patterns as P
from attnkit.fit import measure as coverage_mod
from attnkit.models import Seq2Seq, Seq2SeqConfig
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
    assert cov.layers and cov.mass.shape == (1, 2, 4) and cov.density.shape == (1, 2, 4)
    assert cov.rows.tolist() == [[2 * N, 2 * N]] and cov.own == [None]
    # head 1 is uniform over all 8 keys: a candidate keeps (allowed keys in the row) / 8, averaged
    for c, pattern in enumerate(candidates):
        want = pattern.to_dense(N, N).double().sum(-1).div(N).mean()
        assert cov.mass[0, 1, c].item() == pytest.approx(want.item(), abs=1e-6)
        assert cov.density[0, :, c].tolist() == pytest.approx([pattern.density(N, N)] * 2, abs=1e-6)
    # head 0 puts 1 - 7 e^-40 on its own position: every candidate keeps it
    assert torch.allclose(cov.mass[0, 0], torch.ones(4), atol=1e-6)
    assert cov.mass[0, 1, 3].item() == pytest.approx(1.0)
    assert cov.own_density.tolist() == [[1.0, 1.0]]


def _dense_masses(model, batches, candidates, forward):
    """The oracle: every layer's float64 weights materialized by ``viz.record``, then summed
    under each candidate's dense mask, over the rows that see a key."""
    kept, rows = {}, {}
    for batch in batches:
        with torch.no_grad(), record(model) as rec:
            forward(model, batch)
        for name, w in zip(rec.layers, rec.weights, strict=True):
            w = w.double()  # (B, H, N, S)
            n, s = w.shape[-2:]
            live = w.sum(-1) > 0
            masses = torch.stack(
                [(w * c.to_dense(n, s)).sum(-1).mul(live).sum((0, 2)) for c in candidates], -1
            )
            kept[name] = kept.get(name, 0) + masses
            rows[name] = rows.get(name, 0) + live.sum((0, 2))
    return {name: kept[name] / rows[name][:, None] for name in kept}


@pytest.mark.parametrize("block_elements", [1 << 23, 300], ids=["one-block", "many-blocks"])
def test_blockwise_coverage_equals_the_dense_weights_at_two_lengths(monkeypatch, block_elements):
    """An encoder-decoder (self-attention N x N, causal N x N, cross-attention N x S) with GQA and
    padding: each layer's mass is normalized by its own rows and its density by its own shape,
    so Full() keeps exactly 1 everywhere and never 2."""
    monkeypatch.setattr(coverage_mod, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(src_vocab_size=50, dim=32, num_heads=4, num_kv_heads=2, ffn_dim=48,
                        encoder_layers=2, decoder_layers=1, max_len=64, dropout=0.0)  # fmt: skip
    model = Seq2Seq(cfg).double().eval()
    src = torch.randint(4, 50, (2, 13))
    src[1, 9:] = cfg.pad_id  # padding: masked keys
    tgt = torch.randint(4, 50, (2, 5))
    batches = [(src, tgt), (src[:, :11], tgt[:, :4])]
    candidates = [P.SlidingWindow(1, 1), P.SlidingWindow(2, 2) | P.Global((0,)), P.Strided(3), P.Full()]

    def forward(m, batch):
        return m(*batch)

    cov = fit.coverage(model, batches, candidates, forward=forward)
    dense = _dense_masses(model, batches, candidates, forward)
    assert cov.layers == list(dense) and len(cov.layers) == 4
    for i, name in enumerate(cov.layers):
        assert torch.allclose(cov.mass[i].double(), dense[name], atol=1e-5), name
    assert torch.allclose(cov.mass[..., 3], torch.ones(4, 4))  # Full() keeps all, at every layer
    decoder_self = cov.layers.index(next(n for n in cov.layers if "self" in n and "decoder" in n))
    # the causal decoder layer: density counts the square's pairs, so dense causal is about half
    pairs = sum(2 * t.shape[1] ** 2 for _, t in batches)
    causal = sum(2 * P.Causal().num_allowed(t.shape[1]) for _, t in batches)
    assert cov.own_density[decoder_self].tolist() == pytest.approx([causal / pairs] * 4)
    assert cov.density[decoder_self, :, 3].tolist() == pytest.approx([causal / pairs] * 4)


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


def test_fitted_patterns_stay_within_the_layers_own_pattern():
    """A sliding-window layer keeps its window and a causal one stays causal; Full() becomes the
    layer's own pattern, not dense attention."""
    model = _two_head_model()
    own = P.SlidingWindow(2) & P.Causal()
    candidates = [P.Full(), P.SlidingWindow(1, 1), P.SlidingWindow(4, 4) | P.Global((0,))]
    cov = fit.coverage(
        model, [(x, own) for x in _inputs()], candidates, forward=lambda m, b: m(b[0], pattern=b[1])
    )
    assert cov.own == [own]
    assert cov.own_density[0, 0].item() == pytest.approx(own.density(N, N))
    (layer,) = fit.fit_patterns(cov, keep=0.95)
    for head in layer.heads:
        allowed = head.to_dense(N, N)
        assert not (allowed & ~own.to_dense(N, N)).any(), head  # never more than the layer allowed
    assert layer.heads[1] == own  # head 1 (uniform) needs everything: the window itself
    assert fit.choose.within_layer(P.SlidingWindow(1, 1), P.Causal()) == P.SlidingWindow(1, 1) & P.Causal()


def test_fit_chooses_on_synthetic_coverage_and_checks_arguments():
    candidates = [P.Full(), P.SlidingWindow(4, 4), P.SlidingWindow(4, 4) | P.Global((0,))]
    mass = torch.tensor([[[1.0, 0.5, 0.97], [1.0, 0.99, 0.995], [1.0, 0.2, 0.3]]])
    density = torch.tensor([1.0, 0.1, 0.15]).expand(1, 3, 3)
    cov = fit.Coverage(
        ["layer"], candidates, mass, density, torch.full((1, 3), 10.0), [None], torch.ones(1, 3)
    )
    (layer,) = fit.fit_patterns(cov, keep=0.95)
    assert layer.heads == (candidates[2], candidates[1], candidates[0])
    (layer,) = fit.fit_patterns(cov, budget=0.12)  # only the window fits; every head takes it
    assert layer.heads == (candidates[1],) * 3
    with pytest.raises(ValueError, match="not both"):
        fit.fit_patterns(cov, keep=0.9, budget=0.5)
    with pytest.raises(
        ValueError, match=r"no candidate has density <= budget=0\.05 \(the sparsest is 0\.100\)"
    ):
        fit.fit_patterns(cov, budget=0.05)
    with pytest.raises(ValueError, match=r"0 < keep <= 1"):
        fit.fit_patterns(cov, keep=1.5)
    with pytest.raises(ValueError, match="at least one candidate"):
        fit.coverage(_two_head_model(), _inputs(), [])
    with pytest.raises(ValueError, match=r"candidates\[0\] to be one Pattern for every head"):
        fit.coverage(_two_head_model(), _inputs(), [P.PerHead([P.Full(), P.Causal()])])
    with pytest.raises(ValueError, match="at least one input batch"):
        fit.coverage(_two_head_model(), [], candidates)
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


class _TwoLayers(torch.nn.Module):
    """Two attention layers whose heads spread their weight evenly (q = 0), so the attention
    mass each candidate keeps is the same in both; the first layer's output is scaled by 10 and
    the second's by 0.01, so only the first one's pattern matters to the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = torch.nn.ModuleList(MultiHeadAttention(16, 2, bias=False).double() for _ in range(2))
        with torch.no_grad():
            for m in self.attn:
                m.q_proj.weight.zero_()

    def set_patterns(self, patterns) -> None:
        for m, p in zip(self.attn, patterns, strict=True):
            m.pattern = p

    def forward(self, x):
        h = x + 10.0 * self.attn[0](x)
        return h + 0.01 * self.attn[1](h)


def test_the_effect_based_fit_spends_the_budget_where_the_loss_needs_it():
    model = _TwoLayers()
    own = [P.Causal(), P.Causal()]
    model.set_patterns(own)
    texts = [
        torch.randn(1, 48, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    with torch.no_grad():
        targets = [model(x) for x in texts]  # the dense model's outputs

    def loss(m, i):
        with torch.no_grad():
            return float((m(texts[i]) - targets[i]).pow(2).sum())

    candidates = [P.SlidingWindow(2, 2), P.SlidingWindow(8, 8), P.Full()]
    cov = fit.coverage(model, texts, candidates)
    assert torch.allclose(cov.mass[0], cov.mass[1])  # the mass cannot tell the layers apart
    sens = fit.sensitivity(model, range(2), P.SlidingWindow(2, 2), loss=loss, own=own)
    assert sens[0] > 100 * sens[1] > 0
    assert [m.pattern for m in model.attn] == own  # restored
    # enough for one layer dense and the other at the smallest window: the known best answer
    budget = float(cov.density[0, :, 2].mean() + cov.density[1, :, 0].mean()) / 2 + 1e-9
    layers = fit.allocate(cov, sens, budget)
    assert layers[0].heads == (P.Causal(),) * 2  # Full() within a causal layer: dense for layer 0
    assert layers[1].heads == (P.SlidingWindow(2, 2) & P.Causal(),) * 2  # the cheapest for layer 1
    # at that density, the allocation's loss is far below one window for every head with as
    # much density or more
    w = next(w for w in range(48) if (P.SlidingWindow(w, w) & P.Causal()).density(48, 48) >= budget)
    model.set_patterns(layers)
    fitted = sum(loss(model, i) for i in range(2))
    model.set_patterns([P.SlidingWindow(w, w) & P.Causal()] * 2)
    uniform = sum(loss(model, i) for i in range(2))
    assert fitted < uniform / 10
    with pytest.raises(ValueError, match="no choice meets budget"):
        fit.allocate(cov, sens, 0.001)
    with pytest.raises(ValueError, match=r"expected sens of shape \(L,\)=\(2,\)"):
        fit.allocate(cov, sens[:1], budget)
    # strength 0 weighs both layers alike: the masses being equal, both get the same choice,
    # which the model's loss rates far worse; choose_allocation tries both and keeps strength 1
    even = fit.allocate(cov, sens, budget, strength=0.0)
    assert even[0].heads == even[1].heads
    model.set_patterns(own)
    best = fit.choose_allocation(
        model, range(2), cov, sens, budget, loss=loss, strengths=(0.0, 1.0), exponents=(1.0,), own=own
    )
    assert best.weighting == fit.Weighting(strength=1.0) and [p.heads for p in best.patterns] == [
        p.heads for p in layers
    ]
    assert best.losses[fit.Weighting(1.0)] == pytest.approx(fitted)
    assert best.losses[fit.Weighting(0.0)] > 10 * best.losses[fit.Weighting(1.0)]
    assert [m.pattern for m in model.attn] == own  # restored


def _coverage(mass, density) -> fit.Coverage:
    """A Coverage of one layer with the given ``(H, C)`` masses and densities (candidates:
    windows 1..C), for checking :func:`fit.allocate`'s arithmetic on known answers."""
    mass, density = torch.tensor([mass], dtype=torch.float64), torch.tensor([density], dtype=torch.float64)
    H, C = mass.shape[1:]
    return fit.Coverage(
        layers=["layer0"], candidates=[P.SlidingWindow(c + 1, c + 1) for c in range(C)], mass=mass,
        density=density, rows=torch.ones(1, H), own=[None], own_density=torch.ones(1, H),
    )  # fmt: skip


def test_the_exponent_weighs_large_drops_more_than_many_small_ones():
    # two alike heads; candidates dense (keeps all, density 0.5), middle (0.75, 0.25) and
    # sparse (0.55, 0): at budget 0.25, one middle window per head drops 0.25 + 0.25 of mass,
    # while linear pricing never picks the middle (it lies above the line from dense to sparse)
    # and spends nothing; squared drops (0.0625 each against 0.2025) make the middle the answer
    cov = _coverage([[1.0, 0.75, 0.55]] * 2, [[0.5, 0.25, 0.0]] * 2)
    sens = torch.ones(1, dtype=torch.float64)
    _, middle, sparse = cov.candidates
    assert fit.allocate(cov, sens, 0.25)[0].heads == (sparse, sparse)
    assert fit.allocate(cov, sens, 0.25, exponent=2.0)[0].heads == (middle, middle)
    with pytest.raises(ValueError, match="exponent > 0"):
        fit.allocate(cov, sens, 0.25, exponent=0.0)


def test_calibrated_heads_are_priced_against_what_the_probe_drops():
    # head 1 drops a tenth of what head 0 drops under every candidate: raw, it looks cheap to
    # cut and gets the sparsest window while head 0 keeps the widest; calibrated to the probe
    # (the sparsest candidate, where the sensitivity was measured) the two heads are alike
    # and split nothing apart
    mass0 = [1.0, 0.9, 0.6]
    mass1 = [1 - (1 - m) / 10 for m in mass0]
    cov = _coverage([mass0, mass1], [[0.5, 0.3, 0.1]] * 2)
    sens = torch.ones(1, dtype=torch.float64)
    wide, _, narrow = cov.candidates
    raw = fit.allocate(cov, sens, 0.3)[0].heads
    assert raw == (wide, narrow)
    calibrated = fit.allocate(cov, sens, 0.3, probe=narrow)[0].heads
    assert calibrated[0] == calibrated[1]
    with pytest.raises(ValueError, match="probe to be one of the coverage's candidates"):
        fit.allocate(cov, sens, 0.3, probe=P.Causal())
