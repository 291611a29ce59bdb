"""DecoderLM against Hugging Face Llama and Mistral on the same saved weights."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.models import DecoderLM, DecoderLMConfig

from .conftest import save_tiny_decoder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return save_tiny_decoder(d), DecoderLM.from_pretrained(d), d


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistral")
    hf = save_tiny_decoder(d, "mistral", sliding_window=6, num_key_value_heads=1)
    return hf, DecoderLM.from_pretrained(d), d


def _ids(b=2, t=24, seed=0):
    return torch.randint(3, 97, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["llama", "mistral"])
def test_logits_equal_transformers(which, request):
    hf, ours, _ = request.getfixturevalue(which)
    ids = _ids()
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_config_read_from_hf(llama, mistral):
    c = llama[1].config
    assert (c.num_heads, c.num_kv_heads, c.sliding_window, c.tie_word_embeddings) == (4, 2, None, False)
    m = mistral[1].config
    assert (m.num_kv_heads, m.sliding_window) == (1, 6)  # MQA and a window


def test_sliding_window_matters(mistral):
    _, ours, _ = mistral
    ids = _ids(t=30)
    full = DecoderLM(ours.config.replace(sliding_window=None))
    full.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.allclose(ours(ids)[:, :6], full(ids)[:, :6], atol=1e-5)  # inside the window: same
        assert (ours(ids)[:, 10:] - full(ids)[:, 10:]).abs().max() > 1e-3  # beyond it: not


@pytest.mark.parametrize("which", ["llama", "mistral"])
def test_greedy_generation_equals_transformers(which, request):
    hf, ours, _ = request.getfixturevalue(which)
    prompt = _ids(t=5, seed=1)
    want = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                       attention_mask=torch.ones_like(prompt))  # fmt: skip
    got = ours.generate(prompt, max_new_tokens=20, eos_token_id=[])
    assert got.shape == (2, 25) and torch.equal(got, want)


@pytest.mark.parametrize("which", ["llama", "mistral"])
def test_kv_cache_decoding_equals_full_forward(which, request):
    _, ours, _ = request.getfixturevalue(which)
    ids = _ids(t=16)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()
        parts = [ours(ids[:, :5], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(5, 16)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


@pytest.mark.parametrize("which", ["llama", "mistral"])
def test_last_logits_are_the_full_passes_and_the_last_layer_computes_only_them(which, request):
    """``logits_to_keep`` runs the last layer on the kept rows alone (queries, attention,
    feed-forward; its keys and values still from every position, and into the cache), with
    the full pass's logits, left padding included; per-layer weights keep every row."""
    _, ours, _ = request.getfixturevalue(which)
    ids = _ids(t=16)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    rows = []
    def hook(module, args, out):
        rows.append((out[0] if isinstance(out, tuple) else out).shape[1])

    handle = ours.decoder.layers[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            full = ours(ids, mask)
            assert rows == [16]
            torch.testing.assert_close(ours(ids, mask, logits_to_keep=2), full[:, -2:], atol=1e-5, rtol=0)
            cache = ours.new_cache()
            first = ours(ids[:, :10], mask[:, :10], cache=cache, logits_to_keep=1)
            rest = ours(ids[:, 10:], mask, cache=cache)
            assert rows == [16, 2, 1, 6]
            logits, _ = ours(ids, mask, logits_to_keep=1, need_weights=True)
            assert rows[-1] == 16
    finally:
        handle.remove()
    torch.testing.assert_close(first, full[:, 9:10], atol=1e-5, rtol=0)
    torch.testing.assert_close(rest, full[:, 10:], atol=1e-5, rtol=0)  # the cache got every key
    torch.testing.assert_close(logits, full[:, -1:], atol=1e-5, rtol=0)


def test_left_padded_batch_generates_like_single_prompts(llama):
    _, ours, _ = llama
    a, b = _ids(1, 7, seed=3), _ids(1, 4, seed=4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    got = ours.generate(batch, max_new_tokens=8, attention_mask=mask, eos_token_id=[])
    assert torch.equal(got[0, 7:], ours.generate(a, max_new_tokens=8, eos_token_id=[])[0, 7:])
    assert torch.equal(got[1, 7:], ours.generate(b, max_new_tokens=8, eos_token_id=[])[0, 4:])


def test_generation_stops_at_eos_and_pads(llama):
    _, ours, _ = llama
    prompt = _ids(2, 4, seed=5)
    first = ours.generate(prompt, max_new_tokens=1, eos_token_id=[])[:, -1]
    eos = int(first[0])
    got = ours.generate(prompt, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert got[0, 4].item() == eos and (got[0, 5:] == 0).all()


def test_sampling(llama):
    _, ours, _ = llama
    prompt = _ids(2, 4, seed=6)
    greedy = ours.generate(prompt, max_new_tokens=6, eos_token_id=[])
    top1 = ours.generate(prompt, max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=[])
    assert torch.equal(greedy, top1)  # top-k 1 is greedy
    s1 = ours.generate(prompt, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=[],
                       generator=torch.Generator().manual_seed(7))  # fmt: skip
    s2 = ours.generate(prompt, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=[],
                       generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert torch.equal(s1, s2)
    with pytest.raises(ValueError, match="top_p"):
        ours.generate(prompt, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(prompt, do_sample=True, temperature=0)


def test_top_p_keeps_the_smallest_nucleus():
    from attnkit.models.generation import SamplingConfig, filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(True, top_p=0.75)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(True, top_k=3, top_p=0.95)))
    assert kept.tolist() == [[True, True, True, False]]


def test_tied_embeddings_and_own_checkpoint(tmp_path):
    hf = save_tiny_decoder(tmp_path / "hf", tie_word_embeddings=True)
    ours = DecoderLM.from_pretrained(tmp_path / "hf")
    assert ours.lm_head.weight is ours.embed.weight
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4
    ours.save_pretrained(tmp_path / "own")
    assert json.loads((tmp_path / "own" / "config.json").read_text())["attnkit_model"] == "DecoderLM"
    again = DecoderLM.from_pretrained(tmp_path / "own")
    assert again.config == ours.config and torch.equal(again(ids), ours(ids))
    assert not list((tmp_path / "own").glob(".*tmp"))  # atomic writes leave no temporaries


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip
    hf = save_tiny_decoder(tmp_path, rope_scaling=scaling, rope_theta=500000.0)
    ours = DecoderLM.from_pretrained(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    ids = _ids(t=100)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_hf_integration_runs_llama_on_attnkit(llama):
    from transformers import LlamaForCausalLM

    import attnkit.integrations.huggingface  # noqa: F401

    hf, _, d = llama
    on_attnkit = LlamaForCausalLM.from_pretrained(d, attn_implementation="attnkit").eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        want, got = hf(ids, attention_mask=mask).logits, on_attnkit(ids, attention_mask=mask).logits
    assert (want[mask.bool()] - got[mask.bool()]).abs().max() <= 1e-4


def test_config_validation_and_input_errors(llama, tmp_path):
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecoderLMConfig(num_heads=4, num_kv_heads=3, hidden_size=64)
    with pytest.raises(ValueError, match="unknown config fields"):
        DecoderLMConfig.from_dict({"hidden": 3})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'llama' or 'mistral'"):
        DecoderLM.from_pretrained(tmp_path)
    _, ours, _ = llama
    with pytest.raises(ValueError, match="attention_mask of shape"):
        ours(_ids(), torch.ones(2, 3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(_ids(), max_new_tokens=-1)
