"""What explain shows: head summaries, the --steps walk-through, terminal tables, HTML, PNG."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch

from attnkit.apps.explain import default_head, explain
from attnkit.viz import AttentionRecord
from attnkit.viz.heads import head_shares, summarize_heads
from attnkit.viz.html import render_html
from attnkit.viz.plot import plot_pattern, plot_record
from attnkit.viz.steps import head_walkthrough
from attnkit.viz.terminal import render_head_summary, render_matrix, render_top_k
from attnkit.viz.walkthrough import render


def _record(w: torch.Tensor, tokens: list[str]) -> AttentionRecord:
    return AttentionRecord(layers=["l0"], heads=list(range(w.shape[0])), weights=[w[None]], tokens=tokens,
                           num_heads=w.shape[0])  # fmt: skip


def test_head_summary_names_synthetic_heads_from_their_weights():
    N = 6
    tokens = ["[CLS]", "a", "b", ",", "c", "[SEP]"]
    prev = torch.zeros(N, N)
    prev[0, 0] = 1
    prev[torch.arange(1, N), torch.arange(N - 1)] = 1
    first = torch.zeros(N, N)
    first[:, 0] = 1
    uniform = torch.full((N, N), 1 / N)
    content = torch.zeros(N, N)
    content[:, 2] = 1  # everyone looks at "b"
    rec = _record(torch.stack([prev, first, uniform, content]), tokens)
    s = summarize_heads(rec)
    assert [h.label for h in s] == ["previous token", "first token", "broad", "content words"]
    assert s[0].share == pytest.approx(1.0) and s[2].entropy == pytest.approx(1.0)
    assert s[3].focus == "b"
    assert head_shares(uniform[None], tokens)["punctuation"].item() == pytest.approx(1 / N)
    assert default_head(rec) == (0, 3)  # the head that looks at other words
    with pytest.raises(ValueError, match="N == S"):
        head_shares(torch.ones(1, 2, 3) / 3)


def test_minilm_heads_include_positional_heads(cat_explanation):
    labels = {(s.layer, s.head): s.label for s in summarize_heads(cat_explanation.record)}
    assert len(labels) == 72
    # all-MiniLM-L6-v2 has a previous-token head in its first layer (layer 0, head 2)
    assert labels[(0, 2)] == "previous token"
    assert "first token" in labels.values()


def test_steps_numbers_equal_the_models_own_head_output(cat_explanation):
    ex = cat_explanation
    for layer, head in [(0, 2), (5, 11), (3, 0)]:
        w = head_walkthrough(ex.model, ex.record, layer, head, text=ex.text)
        D = w.q.shape[1]
        assert D == 32
        assert torch.allclose(w.scores, w.q @ w.k.T) and torch.allclose(w.scaled, w.scores / D**0.5)
        assert torch.allclose(w.weights.sum(-1), torch.ones(9, dtype=torch.float64))
        assert w.check_error < 1e-4  # against the model's own output for this head (float32)
        # Q is the projection of the layer input, equal to what the model attended with
        torch.testing.assert_close(w.q, ex.record.captures[layer].q[0, head].double(), atol=1e-4, rtol=0)
        torch.testing.assert_close(w.weights.float(), ex.record.weights[layer][0, head], atol=1e-5, rtol=0)
    text = render(w, max_dims=4)
    assert "first 4 of 32 dimensions" in text and "the model's own output of this head" in text


def test_steps_need_captures(minilm):
    ex = explain("cat", loaded=minilm)
    with pytest.raises(ValueError, match="capture_inputs"):
        head_walkthrough(ex.model, ex.record, 0, 0)


def test_terminal_matrix_top_k_and_summary(cat_explanation):
    rec = cat_explanation.record
    w = rec.weights[5][0, 11]
    plain = render_matrix(w, rec.tokens, rec.tokens, title="t")
    assert "\x1b[" not in plain and plain.splitlines()[0] == "t"
    rows = [ln for ln in plain.splitlines() if re.match(r"\s+\d+ ", ln)]
    assert len(rows) == 9
    for ln, row in zip(rows, w, strict=True):  # each row's percentages are the weights, summing to ~100
        cells = [int(x) for x in ln.split()[2:]]
        assert cells == [round(100 * float(v)) for v in row] and abs(sum(cells) - 100) <= 5
    colored = render_matrix(w, rec.tokens, rec.tokens, color=True)
    assert "\x1b[48;5;" in colored
    short = render_matrix(w, rec.tokens, rec.tokens, max_tokens=4)
    assert "showing the first 4 of 9" in short
    top = render_top_k(w, rec.tokens, rec.tokens, k=2)
    assert "cat -> cat 93%" in top
    assert "Heads per behaviour" in render_head_summary(summarize_heads(rec))


def test_html_is_self_contained_and_carries_the_weights(cat_explanation):
    rec = cat_explanation.record
    page = render_html(rec, text="The cat sat on the mat.", layer=5, head=11)
    assert (
        "<script src" not in page
        and "<link" not in page
        and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    )
    assert "default-src 'none'" in page
    data = json.loads(re.search(r'id="attn-data">(.*?)</script>', page, re.S).group(1))
    assert data["tokens"] == rec.tokens and data["initial"] == [5, 11] and len(data["weights"]) == 6
    w = torch.frombuffer(bytearray(base64.b64decode(data["weights"][5])), dtype=torch.uint8).reshape(12, 9, 9)
    torch.testing.assert_close(w.float() / 255, rec.weights[5][0], atol=0.5 / 255 + 1e-6, rtol=0)
    evil = AttentionRecord(layers=["l"], heads=[0], weights=[torch.ones(1, 1, 1, 1)], tokens=["</script><b>"])
    assert "</script><b>" not in render_html(evil)
    with pytest.raises(ValueError, match="layer"):
        render_html(rec, layer=6)


def test_png_pictures(tmp_path, cat_explanation):
    from attnkit.patterns import parse_pattern

    p = plot_record(cat_explanation.record, tmp_path / "w.png", layers=[0, 5], heads=[2, 11])
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    q = plot_pattern(parse_pattern("SlidingWindow(16) & Causal()"), 128, path=tmp_path / "p.png", block=32)
    assert q.stat().st_size > 1000
    with pytest.raises(ValueError, match="layer indices"):
        plot_record(cat_explanation.record, tmp_path / "x.png", layers=[7])


def test_html_size_at_12_layers_12_heads_128_tokens():
    # one byte per weight, base64: 12 * 12 * 128 * 128 * 4 / 3 bytes plus the page itself
    w = torch.rand(1, 12, 128, 128).softmax(-1)
    rec = AttentionRecord(layers=[f"l{i}" for i in range(12)], heads=list(range(12)), weights=[w] * 12,
                          tokens=[f"t{i}" for i in range(128)])  # fmt: skip
    size = len(render_html(rec).encode())
    assert 12 * 12 * 128 * 128 * 4 / 3 < size < 3.3e6
