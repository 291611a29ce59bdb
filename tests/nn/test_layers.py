"""Transformer layers: equal to torch's on shared weights, caches equal to full forwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit import patterns as P
from attnkit.nn import (
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    FeedForward,
    RMSNorm,
    RotaryEmbedding,
)


def _copy_torch_encoder_layer(ours: EncoderLayer, theirs: nn.TransformerEncoderLayer) -> None:
    ours.self_attn.load_state_dict(theirs.self_attn.state_dict())
    ours.ffn.up_proj.load_state_dict(theirs.linear1.state_dict())
    ours.ffn.down_proj.load_state_dict(theirs.linear2.state_dict())
    ours.norm1.load_state_dict(theirs.norm1.state_dict())
    ours.norm2.load_state_dict(theirs.norm2.state_dict())


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_layer_equals_torch(norm_first):
    theirs = nn.TransformerEncoderLayer(
        32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first
    ).eval()
    ours = EncoderLayer(32, 4, 64, activation="relu", norm_first=norm_first).eval()
    _copy_torch_encoder_layer(ours, theirs)
    x = torch.randn(3, 9, 32)
    pad = torch.tensor([[False] * 9, [False] * 6 + [True] * 3, [False] * 2 + [True] * 7])
    want = theirs(x, src_key_padding_mask=pad)
    got = ours(x, key_mask=~pad)
    keep = ~pad  # torch's fast path leaves padded rows undefined; compare real tokens
    assert torch.allclose(got[keep], want[keep], atol=1e-5)


def test_shared_keywords_default_to_torchs():
    """EncoderLayer's keywords shared with nn.TransformerEncoderLayer mean the same with the same
    defaults: post-norm, ReLU, dropout 0.1 on the sub-layers and on the attention weights."""
    theirs, ours = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), EncoderLayer(32, 4, 64)
    assert ours.norm_first is theirs.norm_first is False
    assert ours.dropout.p == theirs.dropout1.p == 0.1 and ours.self_attn.dropout == theirs.self_attn.dropout
    _copy_torch_encoder_layer(ours, theirs)
    x = torch.randn(2, 5, 32)
    assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-5)  # ReLU, post-norm


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_layer_equals_torch(norm_first):
    theirs = nn.TransformerDecoderLayer(
        32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first
    ).eval()
    ours = DecoderLayer(32, 4, 64, activation="relu", norm_first=norm_first).eval()
    ours.self_attn.load_state_dict(theirs.self_attn.state_dict())
    ours.cross_attn.load_state_dict(theirs.multihead_attn.state_dict())
    ours.ffn.up_proj.load_state_dict(theirs.linear1.state_dict())
    ours.ffn.down_proj.load_state_dict(theirs.linear2.state_dict())
    for a, b in (("norm1", "norm1"), ("norm_cross", "norm2"), ("norm2", "norm3")):
        getattr(ours, a).load_state_dict(getattr(theirs, b).state_dict())
    x, memory = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    want = theirs(x, memory, tgt_mask=causal, tgt_is_causal=True)
    assert torch.allclose(ours(x, memory), want, atol=1e-5)


def test_decoder_cache_equals_full_forward_with_rotary_and_gqa():
    rope = RotaryEmbedding(8)
    layer = DecoderLayer(32, 4, 48, cross_attention=False, num_kv_heads=2, activation="swiglu", norm="rms",
                         rotary=rope, pattern=P.SlidingWindow(3))  # fmt: skip
    dec = Decoder(layer, 2, norm=RMSNorm(32)).eval()
    x = torch.randn(2, 9, 32)
    full = dec(x)
    assert not torch.allclose(full, Decoder(layer, 1)(x))  # sanity: the stack matters
    cache = dec.new_cache()
    steps = [dec(x[:, :4], cache=cache)] + [dec(x[:, t : t + 1], cache=cache) for t in range(4, 9)]
    assert cache.length == 9
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_cross_attention_cache_is_filled_once():
    dec = Decoder(DecoderLayer(16, 2, 32), 2).eval()
    x, memory = torch.randn(1, 5, 16), torch.randn(1, 8, 16)
    full = dec(x, memory)
    cache = dec.new_cache()
    first = dec(x[:, :2], memory, cache=cache)
    rest = [dec(x[:, t : t + 1], None, cache=cache) for t in range(2, 5)]  # memory no longer needed
    assert torch.allclose(torch.cat([first, *rest], 1), full, atol=1e-5)
    assert cache[0].cross_attn.static and cache[0].cross_attn.length == 8


def test_stacks_initialise_layers_independently_and_return_weights():
    enc = Encoder(EncoderLayer(16, 2, 32), 3, norm=nn.LayerNorm(16)).eval()
    w0, w1 = enc.layers[0].self_attn.q_proj.weight, enc.layers[1].self_attn.q_proj.weight
    assert not torch.equal(w0, w1)
    out, weights = enc(torch.randn(2, 5, 16), need_weights=True)
    assert out.shape == (2, 5, 16) and len(weights) == 3
    assert torch.allclose(weights[0].sum(-1), torch.ones(2, 2, 5, dtype=weights[0].dtype))


def test_decoder_computes_weights_only_where_asked():
    dec = Decoder(DecoderLayer(16, 2, 32), 3).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    asked = []  # (layer, attention) of every call that computed its weights
    for i, layer in enumerate(dec.layers):
        for kind in ("self_attn", "cross_attn"):
            getattr(layer, kind).register_forward_pre_hook(
                lambda m, args, kwargs, key=(i, kind): (
                    asked.append(key) if kwargs.get("return_weights") else None
                ),
                with_kwargs=True,
            )
    out_all, every = dec(x, memory, need_weights=True)
    assert len(asked) == 6 and len(every) == 3
    asked.clear()
    out, weights = dec(x, memory, need_weights="cross", weights_layers=[-1])
    assert asked == [(2, "cross_attn")]
    assert weights[:2] == [(None, None), (None, None)] and weights[2][0] is None
    assert torch.allclose(weights[2][1], every[2][1], atol=1e-6) and weights[2][1].shape == (2, 2, 5, 7)
    assert torch.allclose(out, out_all, atol=1e-5)
    asked.clear()
    _, weights = dec(x, memory, need_weights="self", weights_layers=[0, 1])
    assert asked == [(0, "self_attn"), (1, "self_attn")] and weights[2] == (None, None)
    asked.clear()
    assert torch.equal(dec(x, memory, weights_layers=[0]), dec(x, memory))  # ignored without need_weights
    assert asked == []
    with pytest.raises(ValueError, match=r"weights_layers to hold layer indices in \[-3, 3\), but got \[3\]"):
        dec(x, memory, need_weights=True, weights_layers=[0, 3])
    with pytest.raises(ValueError, match="need_weights to be True, False, 'self' or 'cross', but got 'both'"):
        dec(x, memory, need_weights="both")
    with pytest.raises(ValueError, match="DecoderLayer: expected need_weights"):
        dec.layers[0](x, memory, need_weights="all")


def test_decoder_layer_memory_errors():
    with pytest.raises(ValueError, match="expected memory \\(the encoder output\\)"):
        DecoderLayer(16, 2, 32)(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="expected memory=None"):
        DecoderLayer(16, 2, 32, cross_attention=False)(torch.randn(1, 3, 16), torch.randn(1, 3, 16))


_ACT = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "silu": torch.nn.functional.silu,
}


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu"])
def test_feed_forward_activations(activation):
    ffn = FeedForward(8, 16, activation)
    x = torch.randn(3, 8)
    gated = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
    if activation in gated:
        h = _ACT[gated[activation]](ffn.gate_proj(x)) * ffn.up_proj(x)
    else:
        assert ffn.gate_proj is None
        h = _ACT[activation](ffn.up_proj(x))
    assert torch.allclose(ffn(x), ffn.down_proj(h), atol=1e-6)


def test_feed_forward_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        FeedForward(8, 16, "tanh")


def test_rms_norm_formula():
    norm = RMSNorm(4, eps=0.0)
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    assert torch.allclose(norm(x), x / 2.5)  # sqrt((9 + 16) / 4)


@pytest.mark.parametrize(
    ("make", "args", "keyword", "ours"),
    [
        (lambda: EncoderLayer(16, 2, 32), (torch.randn(1, 3, 16),), "key_padding_mask", "key_mask"),
        (lambda: EncoderLayer(16, 2, 32), (torch.randn(1, 3, 16),), "src_key_padding_mask", "key_mask"),
        (lambda: Encoder(EncoderLayer(16, 2, 32), 2), (torch.randn(1, 3, 16),), "src_mask", "mask"),
        (
            lambda: DecoderLayer(16, 2, 32),
            (torch.randn(1, 3, 16), torch.randn(1, 4, 16)),
            "memory_key_padding_mask",
            "memory_key_mask",
        ),
        (
            lambda: Decoder(DecoderLayer(16, 2, 32), 2),
            (torch.randn(1, 3, 16), torch.randn(1, 4, 16)),
            "tgt_key_padding_mask",
            "key_mask",
        ),
    ],
)
def test_torchs_mask_keywords_are_refused_with_the_replacement(make, args, keyword, ours):
    """torch's boolean masks mean "True = ignore"; attnkit's mean "True = may attend". The same
    keyword must never mean both: torch's spellings fail and name the replacement."""
    with pytest.raises(TypeError, match=rf"torch's '{keyword}': pass {ours}= instead"):
        make()(*args, **{keyword: torch.zeros(1, 4, dtype=torch.bool)})
    with pytest.raises(TypeError, match="unexpected keyword argument 'typo'"):
        make()(*args, typo=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_rms_norm_matches_the_llama_formula(dtype):
    """The fused float32 path and the explicit one compute Llama's RMSNorm: in float32, then
    cast back before the weight."""
    norm = RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, dtype=dtype) + 0.5)
    x = (torch.randn(3, 5, 48) * 4).to(dtype)
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    got = norm(x)
    assert got.dtype == dtype
    if dtype == torch.float32:  # the fused kernel: equal up to the order of the mean's sum
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_with_a_unit_offset_is_gemmas(dtype):
    """Gemma's norm: float32 throughout, scaled by 1 + weight, then cast (a zero weight is the
    identity scale)."""
    norm = RMSNorm(48, eps=1e-6, unit_offset=True).to(dtype)
    assert torch.equal(norm.weight, torch.zeros(48, dtype=dtype))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, dtype=dtype))
    x = (torch.randn(3, 5, 48) * 4).to(dtype)
    x32 = x.float()
    want = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight.float())).to(dtype)
    torch.testing.assert_close(norm(x), want, rtol=1e-6 if dtype == torch.float32 else 0, atol=1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_gradients_match_the_formula(unit_offset):
    """The float32 fast path (in-place only without a graph) differentiates as the formula."""
    norm = RMSNorm(16, eps=1e-6, unit_offset=unit_offset).double().float()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 16, requires_grad=True)
    dout = torch.randn(2, 3, 16)
    gx, gw = torch.autograd.grad(norm(x), (x, norm.weight), dout)
    scale = 1 + norm.weight if unit_offset else norm.weight
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale
    wx, ww = torch.autograd.grad(want, (x, norm.weight), dout)
    torch.testing.assert_close(gx, wx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, ww, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "geglu_tanh"])
def test_feed_forward_in_row_blocks_equals_one_call(activation, monkeypatch):
    """Inference on long inputs runs in blocks of rows (a ragged last block too): the same
    numbers as one call."""
    torch.manual_seed(0)
    ffn = FeedForward(16, 40, activation).eval()
    x = torch.randn(2, 37, 16)
    with torch.no_grad():
        whole = ffn(x)
        monkeypatch.setattr("attnkit.nn._rows.BLOCK_BYTES", 5 * 40 * 4)  # 5 rows a block
        assert torch.allclose(ffn(x), whole, atol=1e-6)
