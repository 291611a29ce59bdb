"""Per-layer (and per-head) patterns in the models: ``set_patterns``, the config, and
``save_pretrained`` / ``from_pretrained`` keeping them."""

from __future__ import annotations

import pytest
import torch

from attnkit import patterns as P
from attnkit.models import BertConfig, BertEncoder, DecoderLM, DecoderLMConfig

WINDOW, SINKS = P.SlidingWindow(3, 3), P.SlidingWindow(3, 3) | P.Global((0,))


def _bert() -> BertEncoder:
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=64, max_seq_length=64, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return BertEncoder(config).double().eval()


def _decoder() -> DecoderLM:
    config = DecoderLMConfig(
        vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    return DecoderLM(config).double().eval()


def test_bert_layers_take_their_own_patterns(tmp_path):
    model = _bert()
    ids = torch.randint(1, 50, (2, 20))
    layers = [P.PerHead([WINDOW, SINKS, WINDOW, P.Full()]), WINDOW]
    want = model(ids, pattern=layers)  # the same patterns passed per call
    model.set_patterns(layers)
    assert model.config.layer_patterns == tuple(repr(p) for p in layers)
    got = model(ids)
    assert torch.equal(got, want)
    assert not torch.allclose(got, model(ids, pattern=P.Full()))  # the patterns matter
    model.save_pretrained(tmp_path / "fitted")
    loaded = BertEncoder.from_pretrained(tmp_path / "fitted").double().eval()
    assert loaded.layer_patterns == layers
    assert torch.allclose(loaded(ids), got)
    model.set_patterns(WINDOW)  # one pattern for every layer
    assert model.config.layer_patterns is None and torch.equal(model(ids), model(ids, pattern=[WINDOW] * 2))
    model.set_patterns(None)
    assert torch.equal(model(ids), model(ids, pattern=P.Full()))


def test_decoder_layers_take_their_own_patterns(tmp_path):
    model = _decoder()
    ids = torch.randint(1, 50, (2, 20))
    dense = model(ids)
    layers = [P.PerHead([P.SlidingWindow(2)] * 2 + [P.Causal()] * 2), P.SlidingWindow(4)]
    model.set_patterns(layers)
    fitted = model(ids)
    assert [layer.self_attn.pattern for layer in model.decoder.layers] == layers
    assert not torch.allclose(fitted, dense)
    # with a cache, step-by-step decoding gives the same last logits as the whole prompt
    cache = model.new_cache()
    model(ids[:, :12], cache=cache)
    step = model(ids[:, 12:], cache=cache)
    assert torch.allclose(step[:, -1], fitted[:, -1], atol=1e-10)
    model.save_pretrained(tmp_path / "lm")
    loaded = DecoderLM.from_pretrained(tmp_path / "lm").double().eval()
    assert torch.allclose(loaded(ids), fitted)
    model.set_patterns(None)
    assert torch.allclose(model(ids), dense)


def test_set_patterns_errors():
    model = _bert()
    with pytest.raises(ValueError, match=r"one pattern per layer \(num_layers=2\), but got 3"):
        model.set_patterns([WINDOW] * 3)
    with pytest.raises(TypeError, match=r"expected patterns\[1\] to be a Pattern"):
        model.set_patterns([WINDOW, "SlidingWindow(3)"])
    with pytest.raises(ValueError, match="one pattern per layer"):
        model(torch.randint(1, 50, (1, 5)), pattern=[WINDOW])
