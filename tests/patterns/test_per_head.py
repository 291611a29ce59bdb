"""``PerHead``: one pattern per head, on every backend, forward and backward, against the oracle."""

from __future__ import annotations

import pytest
import torch

from attnkit import attention
from attnkit import patterns as P
from attnkit.backends.triton import TritonBackend
from attnkit.nn import MultiHeadAttention

from ..backends.test_numerics import ATOL, RATIO
from ..reference import attention_ref, grads, max_err, naive_eager, report

WINDOW, CAUSAL, BIGBIRD = P.SlidingWindow(5, 2), P.Causal(), P.SlidingWindow(3) | P.Global((0, 7))
LAYOUTS = {
    # query heads of one key/value group differ: each pattern's heads run as GQA parts
    "mixed-groups": [WINDOW, CAUSAL, WINDOW, BIGBIRD],
    # whole key/value groups share a pattern: GQA is kept
    "whole-groups": [CAUSAL, CAUSAL, BIGBIRD, BIGBIRD],
    "one-pattern": [WINDOW] * 4,
}
BACKENDS = ["reference", "sdpa", "tiled", "blocksparse", "triton"]


@pytest.fixture
def interpreted_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(TritonBackend, "block", (16, 16))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_head_matches_the_oracle(backend, layout, small_tiles, interpreted_triton):
    pattern = P.PerHead(LAYOUTS[layout])
    q = torch.randn(2, 4, 29, 16, dtype=torch.float64)
    k = torch.randn(2, 2, 37, 16, dtype=torch.float64)
    v = torch.randn(2, 2, 37, 24, dtype=torch.float64)
    dout = torch.randn(2, 4, 29, 24, dtype=torch.float64)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
        return grads(lambda: fn(*leaves), leaves, dout)

    want, want_g = run(lambda q, k, v: attention_ref(q, k, v, pattern=pattern), torch.float64)
    eager, eager_g = run(lambda q, k, v: naive_eager(q, k, v, pattern=pattern), torch.float32)
    got, got_g = run(lambda q, k, v: attention(q, k, v, pattern=pattern, backend=backend), torch.float32)
    for name, g, e, w in zip(
        ["out", "dq", "dk", "dv"], [got, *got_g], [eager, *eager_g], [want, *want_g], strict=True
    ):
        bound = RATIO * max_err(e, w) + ATOL[torch.float32]
        assert max_err(g, w) <= bound, report(name, g, w, bound)


def test_each_head_equals_running_it_alone():
    pattern = P.PerHead(LAYOUTS["mixed-groups"])
    q, k, v = torch.randn(1, 4, 21, 8), torch.randn(1, 2, 21, 8), torch.randn(1, 2, 21, 8)
    out, lse = attention(q, k, v, pattern=pattern, return_lse=True)
    for h, p in enumerate(pattern.heads):
        alone, alone_lse = attention(
            q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1], pattern=p, return_lse=True
        )
        assert torch.allclose(out[:, h : h + 1], alone, atol=1e-6)
        assert torch.allclose(lse[:, h : h + 1], alone_lse, atol=1e-6)


def test_patterns_that_split_a_key_value_group_keep_gqa():
    """Heads of one pattern run in parts where every key/value head serves as many query heads
    (so each part is one GQA call on shared keys, no per-query-head copies), and a layer whose
    groups split that way equals its heads run alone."""
    from attnkit.functional import _gqa_parts

    assert _gqa_parts((1, 2, 3, 4, 5, 6, 7, 8), 3) == [(1, 2), (3, 4, 5, 6, 7, 8)]
    assert _gqa_parts((0,), 3) == [(0,)]
    assert _gqa_parts((0, 2, 3, 5), 2) == [(0, 5), (2, 3)]
    assert _gqa_parts((0, 1, 2, 3), 1) == [(0, 1, 2, 3)]
    wide, narrow = P.SlidingWindow(6) | P.Global((0,)), P.SlidingWindow(2) | P.Global((0,))
    pattern = P.PerHead([narrow] + [wide] * 8)  # 9 heads, 3 per key/value head
    q, k, v = torch.randn(2, 9, 19, 8), torch.randn(2, 3, 19, 8), torch.randn(2, 3, 19, 8)
    out = attention(q, k, v, pattern=pattern)
    for h, p in enumerate(pattern.heads):
        alone = attention(q[:, h : h + 1], k[:, h // 3 : h // 3 + 1], v[:, h // 3 : h // 3 + 1], pattern=p)
        assert torch.allclose(out[:, h : h + 1], alone, atol=1e-6), h


def test_weights_mask_and_padding_per_head():
    pattern = P.PerHead([WINDOW, CAUSAL])
    q = k = v = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    mask = torch.rand(2, 2, 9, 9) > 0.2  # a per-head bool mask on top
    out, w = attention(q, k, v, pattern=pattern, mask=mask, return_weights=True)
    dense = pattern.to_dense(9, 9) & mask
    assert torch.equal(w != 0, dense & (w != 0)) and (w[~dense] == 0).all()
    assert torch.allclose(out, attention_ref(q, k, v, pattern=pattern, mask=mask))
    padded = pattern & P.KeyPadding([9, 4])  # & applies to every head
    assert isinstance(padded, P.PerHead) and padded.heads[1] == CAUSAL & P.KeyPadding([9, 4])
    assert torch.allclose(attention(q, k, v, pattern=padded), attention_ref(q, k, v, pattern=padded))


def test_multi_head_attention_takes_a_per_head_pattern():
    """The output projection is linear in the heads: with ``W_o`` cut to head ``h``'s columns, a
    module whose heads all use ``p_h`` gives head ``h``'s share of the per-head module's output."""
    layout = LAYOUTS["mixed-groups"]
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, bias=False, pattern=P.PerHead(layout)).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    total = torch.zeros(2, 13, 32, dtype=torch.float64)
    for h, p in enumerate(layout):
        alone = MultiHeadAttention(32, 4, num_kv_heads=2, bias=False, pattern=p).double()
        state = mha.state_dict()
        keep = torch.zeros(32, dtype=torch.float64)
        keep[h * 8 : (h + 1) * 8] = 1  # head_dim = 32 / 4
        state["out_proj.weight"] = state["out_proj.weight"] * keep
        alone.load_state_dict(state)
        total += alone(x)
    assert torch.allclose(mha(x), total, atol=1e-12)


def test_views_and_errors():
    pattern = P.PerHead([WINDOW, CAUSAL, CAUSAL])
    assert pattern.to_dense(6, 8).shape == (1, 3, 6, 8)
    assert pattern.num_allowed(6, 8) == WINDOW.num_allowed(6, 8) + 2 * CAUSAL.num_allowed(6, 8)
    union = (WINDOW | CAUSAL).block_map(40, 40, 8).states
    assert torch.equal(pattern.block_map(40, 40, 8).states, union)
    assert repr(pattern) == f"PerHead([{WINDOW!r}] + [{CAUSAL!r}] * 2)"
    mixed = P.PerHead([BIGBIRD, WINDOW | CAUSAL, BIGBIRD])
    assert P.parse_pattern(repr(mixed)) == mixed
    assert P.parse_pattern(repr(pattern)) == pattern
    assert P.parse_pattern("PerHead([Causal(), SlidingWindow(2)] * 2)").num_heads == 4
    art = pattern.to_string(6)
    assert "heads 0:" in art and "heads 1, 2:" in art and art.count("N=6 S=6") == 2
    assert P.Causal() & pattern == P.PerHead([CAUSAL & WINDOW, CAUSAL & CAUSAL, CAUSAL & CAUSAL])
    with pytest.raises(TypeError, match="combine a PerHead with & or \\|"):
        P.And(pattern, CAUSAL)
    with pytest.raises(TypeError, match="one Pattern"):
        P.PerHead(CAUSAL)
    with pytest.raises(ValueError, match="at least one pattern"):
        P.PerHead([])
    with pytest.raises(ValueError, match="the same number of heads"):
        pattern & P.PerHead([CAUSAL])
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match=r"one pattern per query head \(H=4\), but got 3"):
        attention(q, q, q, pattern=pattern)
