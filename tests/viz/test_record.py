"""attnkit.viz.record: shapes, rows summing to 1, unchanged outputs, layer/head selection."""

from __future__ import annotations

import pytest
import torch

from attnkit import nn as aknn
from attnkit.models import Seq2Seq, Seq2SeqConfig
from attnkit.patterns import SlidingWindow
from attnkit.viz import AttentionRecord, record


def _ids(minilm, texts):
    tok = minilm.tokenizer
    return tok.encode_batch(texts)


def test_record_minilm_shapes_rows_and_unchanged_outputs(minilm):
    model = minilm.model
    ids, mask, types = _ids(
        minilm, ["The cat sat on the mat.", "A much longer sentence, padded less than the other."]
    )
    ref = model(ids, mask, types)
    with record(model) as rec:
        out = model(ids, mask, types)
    assert torch.equal(out, ref)  # recording does not change what the model computes
    B, T = ids.shape
    assert len(rec.layers) == 6 and rec.heads == list(range(12)) and rec.num_heads == 12
    assert rec.layers[0] == "encoder.layers.0.self_attn"
    for w in rec.weights:
        assert w.shape == (B, 12, T, T) and w.dtype == torch.float32
        assert torch.allclose(w.sum(-1), torch.ones(B, 12, T), atol=1e-5)
        assert torch.all(w[0, :, :, mask[0] == 0] == 0)  # padding receives no weight
    # the same weights the model returns with need_weights (another code path)
    _, expected = model(ids, mask, types, need_weights=True)
    for got, want in zip(rec.weights, expected, strict=True):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)


def test_record_keeps_only_the_layers_and_heads_asked_for(minilm):
    model = minilm.model
    ids, mask, types = _ids(minilm, ["The cat sat on the mat."])
    with record(model) as full:
        model(ids, mask, types)
    with record(model, layers=[1, 4], heads=[0, 7]) as part:
        model(ids, mask, types)
    assert part.layers == [full.layers[1], full.layers[4]] and part.heads == [0, 7]
    torch.testing.assert_close(part.weights[1], full.weights[4][:, [0, 7]])
    with pytest.raises(ValueError, match="layers < 6"), record(model, layers=[9]):
        model(ids, mask, types)
    with pytest.raises(ValueError, match="heads < 12"), record(model, heads=[12]):
        model(ids, mask, types)
    with pytest.raises(ValueError, match="heads"):
        record(model, heads=[]).__enter__()


def test_record_ignores_other_models_and_stops_after_the_block(minilm):
    model = minilm.model
    other = aknn.MultiHeadAttention(16, 2)
    ids, mask, types = _ids(minilm, ["cat"])
    with record(model) as rec:
        other(torch.randn(1, 3, 16))
        model(ids, mask, types)
    assert len(rec.layers) == 6
    model(ids, mask, types)  # after the block: nothing more recorded
    assert len(rec.layers) == 6 and rec.weights[0].shape[2] == ids.shape[1]


def test_record_gqa_pattern_and_cross_attention_in_seq2seq():
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(src_vocab_size=30, dim=32, num_heads=4, num_kv_heads=2, ffn_dim=64, encoder_layers=1,
                        decoder_layers=1, dropout=0.0, encoder_pattern="SlidingWindow(2, 2)")  # fmt: skip
    model = Seq2Seq(cfg).eval()
    src = torch.tensor([[5, 6, 7, 8, 9, 10, 2]])
    tgt = torch.tensor([[1, 4, 5, 6]])
    with record(model, capture_inputs=True) as rec:
        model(src, tgt)
    assert rec.layers == [
        "encoder.layers.0.self_attn",
        "decoder.layers.0.self_attn",
        "decoder.layers.0.cross_attn",
    ]
    enc, dec_self, cross = rec.weights
    allowed = SlidingWindow(2, 2).to_dense(7, 7)
    assert torch.all(enc[0][:, ~allowed] == 0) and rec.patterns[0] == repr(SlidingWindow(2, 2))
    assert torch.all(dec_self[0].triu(1) == 0)  # causal decoder
    assert cross.shape == (1, 4, 4, 7)
    torch.testing.assert_close(cross.sum(-1), torch.ones(1, 4, 4))
    assert torch.equal(rec.captures[0].allowed[0], allowed)


def test_record_step_by_step_decoding_builds_the_full_matrix():
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(src_vocab_size=30, dim=32, num_heads=4, ffn_dim=64, encoder_layers=1, decoder_layers=1,
                        dropout=0.0)  # fmt: skip
    model = Seq2Seq(cfg).eval()
    src = torch.tensor([[5, 6, 7, 2]])
    tgt = torch.tensor([[1, 9, 8, 7]])
    with record(model) as full:
        model(src, tgt)
    memory, src_mask = model.encode(src)
    cache = model.decoder.new_cache()
    with record(model) as steps:
        for t in range(tgt.shape[1]):
            model.decode(tgt[:, t : t + 1], memory, src_mask, cache=cache)
    for name in ("decoder.layers.0.self_attn", "decoder.layers.0.cross_attn"):
        torch.testing.assert_close(steps.layer(name), full.layer(name), atol=1e-6, rtol=0)


def test_record_hugging_face_model_through_the_integration(minilm_path):
    from transformers import AutoModel

    import attnkit.integrations.huggingface  # noqa: F401  registers "attnkit"

    hf = AutoModel.from_pretrained(minilm_path, attn_implementation="attnkit").eval()
    ids = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 1012, 102]])
    with torch.no_grad():
        plain = hf(input_ids=ids)
        ref = hf(input_ids=ids, output_attentions=True)  # weights via the reference backend
        with record(hf) as rec:
            out = hf(input_ids=ids)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    assert len(rec.layers) == 6 and all("attention" in name for name in rec.layers)
    for got, want in zip(rec.weights, ref.attentions, strict=True):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)


def test_record_round_trips_through_json(tmp_path, cat_explanation):
    rec = cat_explanation.record
    path = rec.save(tmp_path / "rec.json")
    back = AttentionRecord.load(path)
    assert back.tokens == rec.tokens and back.layers == rec.layers and back.heads == rec.heads
    for a, b in zip(back.weights, rec.weights, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown fields"):
        AttentionRecord.from_dict({"bogus": 1})
