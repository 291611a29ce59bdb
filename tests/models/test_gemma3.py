"""``Gemma3LM`` against ``transformers``' Gemma 3 on a tiny random model (a Hugging Face directory):
logits, KV-cache decoding, greedy generation, and local layers' caches of constant size."""

from __future__ import annotations

import pytest
import torch

from attnkit import patterns as P
from attnkit.models import Gemma3Config, Gemma3LM, load

WINDOW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random ``transformers`` Gemma 3 (6 layers: 5 local with a window of 6, 1 global; GQA;
    a head dim unlike hidden / heads; query scalar unlike the head dim) saved as a directory,
    and attnkit's model loaded from it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=20,
        max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    hf = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at zero offsets; give them values so that they matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    d = tmp_path_factory.mktemp("gemma3")
    hf.save_pretrained(d)
    return hf, Gemma3LM.from_pretrained(d), d


def _ids(t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (2, t), generator=torch.Generator().manual_seed(seed))


def test_config_and_layer_kinds_read_from_the_directory(tiny):
    _, ours, d = tiny
    c = ours.config
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.sliding_window, c.query_pre_attn_scalar) == (
        4,
        2,
        16,
        6,
        20,
    )
    assert ours.layer_kinds == ["local"] * 5 + ["global"]
    assert [layer.self_attn.pattern for layer in ours.layers] == [P.SlidingWindow(WINDOW - 1)] * 5 + [
        P.Causal()
    ]
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer\.json"):  # a model alone is not enough
        load(d)


@pytest.mark.parametrize("t", [1, 5, 23])
def test_logits_equal_transformers(tiny, t):
    """Beyond the window (t = 23) the local layers' window matters; within it (t = 5) it does not."""
    hf, ours, _ = tiny
    ids = _ids(t)
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_the_window_is_what_the_local_layers_see(tiny):
    """Widening the local layers' window changes the logits beyond it, not before it."""
    _, ours, _ = tiny
    ids = _ids(23)
    with torch.no_grad():
        base = ours(ids)
        ours.set_patterns([P.Causal()] * 6)
        wide = ours(ids)
        ours.set_patterns(None)
        assert torch.allclose(ours(ids), base)
    assert torch.allclose(wide[:, :WINDOW], base[:, :WINDOW], atol=1e-5)
    assert (wide[:, WINDOW + 2 :] - base[:, WINDOW + 2 :]).abs().max() > 1e-3


def test_cache_decoding_equals_the_full_pass_and_local_caches_stay_at_the_window(tiny):
    _, ours, _ = tiny
    ids = _ids(30)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()
        steps = [ours(ids[:, :9], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(9, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=0)
    held = [cache[i].self_attn.keys.shape[2] for i in range(6)]
    assert held == [WINDOW - 1] * 5 + [30]  # local layers: the window before the next token
    per_position = 2 * 2 * 16 * 4 * 2  # (k and v) x B x Hkv x D x float32 bytes
    assert [cache[i].self_attn.nbytes for i in range(5)] == [(WINDOW - 1) * per_position] * 5


def test_long_prompts_in_row_blocks_equal_transformers(tiny, monkeypatch):
    """A prefill long enough to run its token-wise work in blocks of rows (every norm,
    projection and feed-forward; forced here with a small block) gives transformers' logits."""
    from attnkit.nn import _rows, attention

    hf, ours, _ = tiny
    ids = _ids(40)
    blocked, row_blocks = [], _rows.row_blocks

    def recording(*args):
        blocks = row_blocks(*args)
        blocked.append(blocks is not None)
        return blocks

    monkeypatch.setattr(_rows, "BLOCK_BYTES", 7 * 80 * 4 * 2)  # 7 rows of the FFN, B = 2
    monkeypatch.setattr(_rows, "row_blocks", recording)  # the norms' and feed-forward's blocks
    monkeypatch.setattr(attention, "row_blocks", recording)  # the attention's projections'
    with torch.no_grad():
        got, want = ours(ids), hf(ids).logits
    # per layer: its input norm, its attention's projections, and what follows the attention
    # (the feed-forward inside a block is then one block already)
    assert sum(blocked) == 3 * len(ours.layers), "a token-wise step ran whole"
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_last_logits_equal_transformers_and_the_last_layer_runs_those_rows_alone(tiny, monkeypatch):
    """``logits_to_keep`` leaves the last (global) layer only the kept rows to compute, through
    the row-block path too, with transformers' logits; with attention hooks recording (what
    ``attnkit.fit`` and ``attnkit.viz`` use), every layer keeps every row."""
    from attnkit.nn import _rows
    from attnkit.viz import record

    hf, ours, _ = tiny
    ids = _ids(40)
    rows = []
    handle = ours.layers[-1].self_attn.register_forward_hook(lambda m, args, out: rows.append(out.shape[1]))
    try:
        with torch.no_grad():
            want = hf(ids).logits
            for keep in (1, 3):
                torch.testing.assert_close(ours(ids, logits_to_keep=keep), want[:, -keep:], atol=2e-5, rtol=0)
            monkeypatch.setattr(_rows, "BLOCK_BYTES", 7 * 80 * 4 * 2)  # long-input path: blocks of rows
            torch.testing.assert_close(ours(ids, logits_to_keep=1), want[:, -1:], atol=2e-5, rtol=0)
            monkeypatch.undo()
            assert rows == [1, 3, 1]
            rows.clear()
            torch.testing.assert_close(ours(ids, logits_to_keep=0), want, atol=2e-5, rtol=0)  # 0: all
            with record(ours):
                ours(ids, logits_to_keep=1)
            assert rows == [40, 40]
    finally:
        handle.remove()
    with pytest.raises(ValueError, match=r"expected logits_to_keep to be None or an int >= 0, but got -1"):
        ours(ids, logits_to_keep=-1)


def test_greedy_generation_equals_transformers(tiny):
    hf, ours, _ = tiny
    ids = _ids(4)
    with torch.no_grad():
        want = ids
        for _ in range(20):  # transformers' logits, the greedy choice, no end-of-sequence rule
            want = torch.cat([want, hf(want).logits[:, -1].argmax(-1, keepdim=True)], 1)
        got = ours.generate(ids, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(got, want)


def test_config_checks_its_fields():
    with pytest.raises(ValueError, match=r"layer_types"):
        Gemma3Config(num_layers=2, layer_types=("sliding_attention", "other"))
    with pytest.raises(ValueError, match=r"expected num_kv_heads to divide num_heads=4"):
        Gemma3Config(num_heads=4, num_kv_heads=3)
    with pytest.raises(NotImplementedError, match="attn_logit_softcapping"):
        Gemma3Config.from_hf({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0})
