"""Attention rollout and lost mass, checked by hand on tiny models and known weights."""

from __future__ import annotations

import pytest
import torch

from attnkit import patterns as P
from attnkit.cli import main
from attnkit.models import BertConfig, BertEncoder
from attnkit.viz import AttentionRecord, lost_mass, record, rollout


def _tiny_bert() -> BertEncoder:
    config = BertConfig(
        vocab_size=30, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
        max_position_embeddings=16, max_seq_length=16, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(3)
    return BertEncoder(config).double().eval()


def test_rollout_equals_a_hand_computation_on_a_tiny_model():
    model = _tiny_bert()
    with record(model) as rec:
        model(torch.tensor([[1, 7, 4]]))
    got = rollout(rec)[0]
    # by hand: per layer, average the heads, add the identity half and half, renormalize the
    # rows; then multiply the layers, first layer innermost
    mixed = []
    for w in rec.weights:
        a = [[0.5 * (i == j) + 0.5 * (float(w[0, 0, i, j]) + float(w[0, 1, i, j])) / 2 for j in range(3)]
             for i in range(3)]  # fmt: skip
        mixed.append([[x / sum(row) for x in row] for row in a])
    first, second = mixed
    want = [[sum(second[i][m] * first[m][j] for m in range(3)) for j in range(3)] for i in range(3)]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(3, dtype=torch.float64))  # rows stay distributions


def test_rollout_errors():
    rec = AttentionRecord(layers=["a"], heads=[0], weights=[torch.rand(1, 1, 3, 3)], num_heads=2)
    with pytest.raises(ValueError, match="every head recorded"):
        rollout(rec)
    with pytest.raises(ValueError, match="0 <= residual <= 1"):
        rollout(rec, residual=2)


def test_lost_mass_on_known_weights():
    # two heads over 4 keys: head 0 uniform, head 1 all on the query's own position
    w = torch.zeros(1, 2, 4, 4)
    w[0, 0] = 0.25
    w[0, 1] = torch.eye(4)
    rec = AttentionRecord(layers=["l0", "l1"], heads=[0, 1], weights=[w, w], num_heads=2)
    window = P.SlidingWindow(1, 1)  # rows keep 2, 3, 3, 2 of 4 keys
    lost = lost_mass(rec, [window, P.PerHead([P.Full(), P.SlidingWindow(0, 0)])])
    assert torch.allclose(lost[0], torch.tensor([1 - (2 + 3 + 3 + 2) / 16, 0.0]))
    assert torch.allclose(lost[1], torch.zeros(2))
    assert torch.equal(lost_mass(rec, [None, None]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="one pattern per recorded layer"):
        lost_mass(rec, [window])


def test_explain_rollout_and_lost_mass_in_the_terminal_and_png(tmp_path, capsys):
    png = tmp_path / "w.png"
    argv = ["explain", "The cat sat on the mat.", "--pattern", "SlidingWindow(1, 1)", "--rollout"]
    assert main([*argv, "--png", str(png), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "Attention each head loses to its pattern" in out and "layer 5" in out
    assert "Attention rollout (Abnar & Zuidema 2020)" in out
    assert png.with_suffix(".rollout.png").stat().st_size > 0
