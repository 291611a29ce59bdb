"""``attnkit.nn.MultiHeadAttention`` against ``torch.nn.MultiheadAttention`` and itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit import patterns as P
from attnkit.nn import KVCache, MultiHeadAttention, RotaryEmbedding

TOL = 1e-6  # the bound for float32 parity with torch


def torch_pair(batch_first=True, kdim=None, bias=True):
    ref = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias).eval()
    mine = MultiHeadAttention(32, 4, context_dim=kdim, bias=bias).eval()
    mine.load_state_dict(ref.state_dict())
    return ref, mine


@pytest.mark.parametrize("backend", ["auto", "sdpa", "tiled", "reference"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_equals_torch(batch_first, backend):
    ref, mine = torch_pair(batch_first)
    mine.backend = backend
    x = torch.randn(3, 11, 32)  # (B, N, C), attnkit's layout whatever torch's module reads
    torch_x = x if batch_first else x.transpose(0, 1)
    want, _ = ref(torch_x, torch_x, torch_x, need_weights=False)
    want = want if batch_first else want.transpose(0, 1)
    assert (mine(x) - want).abs().max() <= TOL


@pytest.mark.parametrize("bias", [True, False])
def test_cross_attention_with_other_width_equals_torch(bias):
    ref, mine = torch_pair(kdim=20, bias=bias)
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, 13, 20)
    want, _ = ref(x, ctx, ctx, need_weights=False)
    assert (mine(x, ctx) - want).abs().max() <= TOL


def test_masks_equal_torch_with_its_inverted_convention():
    ref, mine = torch_pair()
    x = torch.randn(2, 9, 32)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    want, want_w = ref(x, x, x, key_padding_mask=~keep, attn_mask=~causal, average_attn_weights=False)
    got, got_w = mine(x, mask=causal, key_mask=keep, return_weights=True)
    assert (got - want).abs().max() <= TOL
    assert (got_w - want_w).abs().max() <= TOL
    # the same through a pattern instead of a tensor
    assert (mine(x, key_mask=keep, pattern=P.Causal()) - want).abs().max() <= TOL


def test_float_mask_equals_torch():
    ref, mine = torch_pair()
    x = torch.randn(2, 9, 32)
    bias = torch.randn(9, 9)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 7:] = False
    torch_padding = torch.zeros(2, 9).masked_fill(~keep, float("-inf"))  # same type as bias
    want, _ = ref(x, x, x, attn_mask=bias, key_padding_mask=torch_padding)
    assert (mine(x, mask=bias, key_mask=keep) - want).abs().max() <= TOL


def test_from_torch_and_gradients_match():
    ref = nn.MultiheadAttention(32, 8, batch_first=True)
    mine = MultiHeadAttention.from_torch(ref)
    x = torch.randn(2, 6, 32, requires_grad=True)
    want, _ = ref(x, x, x, need_weights=False)
    (gx_want,) = torch.autograd.grad(want.square().sum(), x)
    got = mine(x)
    (gx_got,) = torch.autograd.grad(got.square().sum(), x)
    assert (got - want).abs().max() <= TOL
    assert (gx_got - gx_want).abs().max() <= 1e-5


def test_from_torch_rejects_what_it_cannot_express():
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(NotImplementedError, match="kdim must equal vdim"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, kdim=4, vdim=6))
    with pytest.raises(TypeError, match=r"nn\.MultiheadAttention"):
        MultiHeadAttention.from_torch(nn.Linear(2, 2))


def test_gqa_equals_manual_heads():
    mha = MultiHeadAttention(48, 6, num_kv_heads=2).eval()
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    mha.double()
    q = mha.q_proj(x).view(2, 5, 6, 8).transpose(1, 2)
    k = mha.k_proj(x).view(2, 5, 2, 8).transpose(1, 2).repeat_interleave(3, 1)
    v = mha.v_proj(x).view(2, 5, 2, 8).transpose(1, 2).repeat_interleave(3, 1)
    heads = torch.softmax(q @ k.mT / 8**0.5, -1) @ v
    want = mha.out_proj(heads.transpose(1, 2).reshape(2, 5, 48))
    assert (mha(x) - want).abs().max() < 1e-12


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("pattern", [P.Causal(), P.SlidingWindow(3) & P.Causal()], ids=repr)
def test_kv_cache_decoding_equals_full_forward(num_kv_heads, pattern):
    mha = MultiHeadAttention(32, 4, num_kv_heads=num_kv_heads, pattern=pattern).eval()
    x = torch.randn(2, 12, 32)
    full = mha(x)
    cache = KVCache()
    steps = [mha(x[:, :5], cache=cache)]  # prompt
    steps += [mha(x[:, t : t + 1], cache=cache) for t in range(5, 12)]
    assert cache.length == 12
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_cross_attention_cache_is_filled_once():
    mha = MultiHeadAttention(32, 4, context_dim=16).eval()
    ctx, x = torch.randn(2, 9, 16), torch.randn(2, 4, 32)
    full = mha(x, ctx)
    cache = KVCache()
    first = mha(x[:, :1], ctx, cache=cache)
    assert cache.static and cache.length == 9
    rest = [mha(x[:, t : t + 1], cache=cache) for t in range(1, 4)]
    assert cache.length == 9
    assert (torch.cat([first, *rest], 1) - full).abs().max() < 1e-6


def test_cache_reorder_and_growth():
    cache = KVCache()
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 1, 2)
    for _ in range(40):  # grows past the initial capacity several times
        cache.update(k, k)
    assert cache.length == 40 and torch.equal(cache.keys[:, 0, 39, 0], torch.tensor([0.0, 1.0, 2.0]))
    cache.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.keys[:, 0, 0, 0], torch.tensor([2.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match=r"expected \(B, Hkv, D\)=\(3, 1, 2\) as cached"):
        cache.update(torch.zeros(3, 2, 1, 2), torch.zeros(3, 2, 1, 2))
    cache.reset()
    assert cache.is_empty
    with pytest.raises(ValueError, match="cache is empty"):
        _ = cache.keys


def test_dropout_only_in_training_and_reproducible():
    mha = MultiHeadAttention(32, 4, dropout=0.5)
    x = torch.randn(2, 8, 32)
    torch.manual_seed(3)
    a = mha(x)
    torch.manual_seed(3)
    assert torch.equal(a, mha(x))
    mha.eval()
    assert torch.equal(mha(x), mha(x))
    assert not torch.equal(mha(x), a)


def test_weights_shape_and_rows():
    mha = MultiHeadAttention(32, 4, pattern=P.Causal()).eval()
    out, w = mha(torch.randn(2, 6, 32), return_weights=True)
    assert out.shape == (2, 6, 32) and w.shape == (2, 4, 6, 6)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 6))
    assert torch.all(w.triu(1) == 0)


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (
            lambda: MultiHeadAttention(30, 4),
            ValueError,
            r"embed_dim divisible by num_heads, but got embed_dim=30, num_heads=4",
        ),
        (
            lambda: MultiHeadAttention(32, 4, num_kv_heads=3),
            ValueError,
            r"num_heads=4, num_kv_heads=3",
        ),
        (lambda: MultiHeadAttention(32, 0), ValueError, r"num_heads >= 1"),
        (lambda: MultiHeadAttention(32, 4, dropout=1.0), ValueError, r"0 <= dropout < 1"),
        (lambda: MultiHeadAttention(32, 4, pattern="causal"), TypeError, r"expected a Pattern"),
    ],
)
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_forward_errors():
    mha = MultiHeadAttention(32, 4)
    with pytest.raises(ValueError, match=r"x of shape \(B, N, C\) with C=32, but got x.shape=\(2, 5, 16\)"):
        mha(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"context of shape .* C=32"):
        mha(torch.randn(2, 5, 32), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"batch size B=2, but got 3"):
        mha(torch.randn(2, 5, 32), torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match=r"key_mask to be bool of shape \(B, S\)=\(2, 5\)"):
        mha(torch.randn(2, 5, 32), key_mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize(("keyword", "ours"), [("key_padding_mask", "key_mask"), ("attn_mask", "mask")])
def test_torchs_mask_keywords_are_refused(keyword, ours):
    """Moving code from ``torch.nn.MultiheadAttention`` fails loudly rather than inverting masks."""
    mha = MultiHeadAttention(32, 4)
    with pytest.raises(TypeError, match=rf"MultiHeadAttention.forward\(\) does not take torch's '{keyword}'"):
        mha(torch.randn(2, 5, 32), **{keyword: torch.zeros(2, 5, dtype=torch.bool)})
    with pytest.raises(TypeError, match=rf"pass {ours}= instead"):
        mha(torch.randn(2, 5, 32), **{keyword: torch.zeros(2, 5, dtype=torch.bool)})


def test_torch_keywords_with_another_meaning_are_refused_by_name():
    """A torch user's habits fail loudly: the sequence-first default, torch's need_weights (on by
    default, heads averaged), is_causal (top-left) and the inverted masks."""
    with pytest.raises(ValueError, match=r"batch_first=False.*\(B, N, C\).*x\.transpose\(0, 1\)"):
        MultiHeadAttention(32, 4, batch_first=False)
    assert MultiHeadAttention(32, 4, batch_first=True)(torch.randn(2, 3, 32)).shape == (2, 3, 32)
    mha = MultiHeadAttention(32, 4)
    x = torch.randn(2, 5, 32)
    for name, hint in [
        ("need_weights", "return_weights=True"),
        ("is_causal", r"pattern=Causal\(\)"),
        ("average_attn_weights", "per-head weights"),
        ("key_padding_mask", "key_mask=~key_padding_mask"),
    ]:
        with pytest.raises(TypeError, match=f"does not take torch's '{name}': .*{hint}"):
            mha(x, **{name: True})
    ref = nn.MultiheadAttention(32, 4)  # torch's default: sequence first
    seq_first = torch.randn(5, 2, 32)
    mine = MultiHeadAttention.from_torch(ref)
    want, _ = ref(seq_first, seq_first, seq_first, need_weights=False)
    assert (mine(seq_first.transpose(0, 1)).transpose(0, 1) - want).abs().max() <= TOL


@pytest.mark.parametrize("chunks", [[1] * 23, [9, 1, 1, 7, 5], [23]], ids=["one-by-one", "ragged", "one-call"])
def test_a_windowed_cache_decodes_as_the_full_sliding_window_pass_in_constant_memory(chunks):
    """A cache that keeps only the last W keys gives the full pass's outputs with
    SlidingWindow(W), step by step or in chunks, and its buffers stop growing."""
    torch.manual_seed(0)
    W = 4
    rotary = RotaryEmbedding(8)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, pattern=P.SlidingWindow(W), rotary=rotary).eval()
    x = torch.randn(2, sum(chunks), 32)
    full = mha(x)
    cache, outs, at, sizes = KVCache(window=W), [], 0, []
    for n in chunks:
        outs.append(mha(x[:, at : at + n], cache=cache))
        at += n
        sizes.append(cache.nbytes)
        assert cache.length == at and cache.keys.shape[2] == min(at, W)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)
    if chunks == [1] * 23:
        assert max(sizes) == sizes[6]  # after the first steps the buffers never grow again


def test_qk_norm_and_scale():
    """Queries and keys are normalized per head before the rotary embedding and the scores
    use the given scale, as a plain computation does."""
    torch.manual_seed(0)
    from attnkit.nn import RMSNorm

    mha = MultiHeadAttention(
        32, 2, head_dim=8, bias=False, qk_norm=lambda d: RMSNorm(d, unit_offset=True), scale=0.3
    ).eval()
    with torch.no_grad():
        mha.q_norm.weight.normal_()
        mha.k_norm.weight.normal_()
    x = torch.randn(1, 5, 32)

    def heads(t):
        return t.view(1, 5, 2, 8).transpose(1, 2)

    def norm(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)

    q = norm(heads(mha.q_proj(x)), mha.q_norm.weight)
    k = norm(heads(mha.k_proj(x)), mha.k_norm.weight)
    w = ((q @ k.mT) * 0.3).softmax(-1)
    want = mha.out_proj((w @ heads(mha.v_proj(x))).transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(mha(x), want, atol=1e-5, rtol=0)
    assert set(mha.state_dict()) >= {"q_norm.weight", "k_norm.weight"}
    with pytest.raises(ValueError, match=r"expected a finite scale > 0 or None, but got scale=-1"):
        MultiHeadAttention(32, 2, scale=-1)
    with pytest.raises(ValueError, match=r"expected window >= 1 or None, but got window=0"):
        KVCache(window=0)


@pytest.mark.parametrize("cached", [False, True])
def test_long_inputs_in_row_blocks_equal_one_pass(cached, monkeypatch):
    """Without autograd, a long self-attention input is projected, normed, rotated and
    projected out in blocks of rows (a ragged last block too): the same numbers as one pass,
    with GQA, QK-norm, rotary positions per batch item and a KV cache that already holds
    tokens."""
    from attnkit.nn import RMSNorm

    torch.manual_seed(0)
    mha = MultiHeadAttention(
        32, 4, num_kv_heads=2, head_dim=8, bias=True, pattern=P.Causal(),
        rotary=RotaryEmbedding(8), qk_norm=lambda d: RMSNorm(d, unit_offset=True),
    ).eval()  # fmt: skip
    x, past = torch.randn(2, 23, 32), torch.randn(2, 5, 32)
    positions = torch.arange(5, 28).repeat(2, 1) - torch.tensor([[0], [2]])  # left padding
    calls = []
    monkeypatch.setattr("attnkit.nn.attention.MultiHeadAttention._project_rows",
                        _counting(MultiHeadAttention._project_rows, calls))  # fmt: skip

    def run():
        cache = None
        if cached:
            cache = KVCache()
            mha(past, cache=cache)
        return mha(x, cache=cache, positions=positions), cache

    with torch.no_grad():
        whole, whole_cache = run()
        assert not calls  # 23 rows fit in one block
        monkeypatch.setattr("attnkit.nn._rows.BLOCK_BYTES", 2 * 5 * 32 * 4)  # 5 rows a block
        blocked, blocked_cache = run()
    assert calls, "the long input did not take the row-block path"
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=0)
    if cached:
        torch.testing.assert_close(blocked_cache.keys, whole_cache.keys, atol=1e-6, rtol=0)
        torch.testing.assert_close(blocked_cache.values, whole_cache.values, atol=1e-6, rtol=0)
    x.requires_grad_(True)  # autograd recording: one pass, whatever the length
    calls.clear()
    mha(x).sum().backward()
    assert not calls and x.grad is not None


@pytest.mark.parametrize("blocks", [False, True])
def test_last_rows_equal_the_last_rows_of_the_whole_output(blocks, monkeypatch):
    """``last_rows`` computes only the last queries' output, attending to every key (as the
    newest tokens of a cache do): float64, GQA, rotary, a window, a mask over (N, S), a key
    mask, a cache that already holds tokens (which still receives every new key), and the
    row-block path for long inputs."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(
        32, 4, num_kv_heads=2, head_dim=8, pattern=P.SlidingWindow(9), rotary=RotaryEmbedding(8)
    ).double().eval()  # fmt: skip
    x, past = torch.randn(2, 23, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    mask = torch.rand(23, 28) > 0.2
    mask[:, :5] = True  # every row keeps a key
    key_mask = torch.ones(2, 28, dtype=torch.bool)
    key_mask[1, :3] = False

    def run(last_rows=None):
        cache = KVCache()
        mha(past, cache=cache)
        out = mha(x, cache=cache, mask=mask, key_mask=key_mask, last_rows=last_rows)
        return out, cache

    with torch.no_grad():
        whole, whole_cache = run()
        if blocks:
            monkeypatch.setattr("attnkit.nn._rows.BLOCK_BYTES", 2 * 5 * 32 * 8)  # 5 rows a block
        for last in (1, 7, 23):
            got, cache = run(last)
            assert got.shape == (2, last, 32)
            torch.testing.assert_close(got, whole[:, -last:], atol=1e-12, rtol=0)
            torch.testing.assert_close(cache.keys, whole_cache.keys, atol=1e-12, rtol=0)
    for bad in (0, 24, True, 1.0):
        with pytest.raises(ValueError, match=rf"expected last_rows to be an int in \[1, N=23\], but got {bad!r}"):
            mha(x, last_rows=bad)
    with pytest.raises(ValueError, match="last_rows is for self-attention on one process, not cross-attention"):
        mha(x, torch.randn(2, 4, 32, dtype=torch.float64), last_rows=1)


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped
