"""BertEncoder on all-MiniLM-L6-v2: the same sentence embeddings as sentence-transformers."""

from __future__ import annotations

import pytest
import torch

from attnkit import patterns as P
from attnkit.models import BertEncoder

SENTENCES = [
    "The cat sat on the mat.",
    "A man is playing a guitar on stage.",
    "Self-attention lets every token look at every other token.",
    "Stock markets fell sharply on Tuesday after the announcement.",
    "How do I reset my password?",
    "Je pense, donc je suis.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "Emojis 🙂 and symbols ∑∫ should not break tokenization!",
    "1234567890 3.14159 2026-11-28",
    "   leading and trailing spaces   ",
    "?",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Photosynthesis converts light energy into chemical energy in plants.",
    "She sells sea shells by the sea shore.",
    "Python's GIL serializes bytecode execution in CPython.",
    "The mitochondria is the powerhouse of the cell.",
    "In 1969, humans first walked on the Moon.",
    "It's raining cats and dogs — take an umbrella!",
    "word " * 300,  # far beyond max_seq_length (256 tokens): truncated
    "Long inputs are cut at the model's maximum length. " * 40,
    "UPPER CASE and lower case map to the same uncased tokens.",
    "tab\tseparated\tvalues",
]


@pytest.fixture(scope="module")
def attnkit_model(minilm_path):
    return BertEncoder.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def reference(minilm_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path), device="cpu")
    return model.encode(SENTENCES, batch_size=8, convert_to_tensor=True)


def test_embeddings_equal_sentence_transformers(attnkit_model, reference):
    ours = attnkit_model.encode(SENTENCES, batch_size=8)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == torch.float32
    assert (ours - reference).abs().max().item() <= 1e-5
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_long_inputs_are_truncated_to_max_seq_length(attnkit_model):
    assert attnkit_model.config.max_seq_length == 256
    ids, _, _ = attnkit_model.tokenizer.encode_batch(["word " * 300])
    assert ids.shape[1] == 256 and attnkit_model.tokenizer.truncated == [True]


def test_batch_size_and_order_do_not_change_embeddings(attnkit_model):
    one_by_one = attnkit_model.encode(SENTENCES[:6], batch_size=1)
    batched = attnkit_model.encode(SENTENCES[:6], batch_size=6)
    assert (one_by_one - batched).abs().max().item() <= 1e-5


def test_hf_integration_gives_the_same_embeddings(minilm_path, reference):
    from sentence_transformers import SentenceTransformer

    import attnkit.integrations.huggingface  # noqa: F401  (registers "attnkit")

    model = SentenceTransformer(
        str(minilm_path), device="cpu", model_kwargs={"attn_implementation": "attnkit"}
    )
    assert model[0].auto_model.config._attn_implementation == "attnkit"
    ours = model.encode(SENTENCES, batch_size=8, convert_to_tensor=True)
    assert (ours - reference).abs().max().item() <= 1e-5


def test_pattern_matches_hf_integration_with_the_same_pattern(minilm_path, attnkit_model):
    from transformers import AutoModel

    from attnkit.integrations.huggingface import set_pattern

    window = P.SlidingWindow(3, 3)
    hf = AutoModel.from_pretrained(minilm_path, attn_implementation="attnkit").eval()
    assert set_pattern(hf, window) == 6
    ids, mask, types = attnkit_model.tokenizer.encode_batch(SENTENCES[:4])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours = attnkit_model(ids, mask, types, pattern=window)
        full = attnkit_model(ids, mask, types)
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5
    assert (ours[real] - full[real]).abs().max().item() > 1e-2  # the window really changes things


def test_attention_weights_through_the_integration(minilm_path, attnkit_model):
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    ids, mask, types = attnkit_model.tokenizer.encode_batch(SENTENCES[:2])
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True).attentions
        _, ours = attnkit_model(ids, mask, types, need_weights=True)
    assert len(ours) == 6 and ours[0].shape == (2, 12, ids.shape[1], ids.shape[1])
    for w_ours, w_hf in zip(ours, want, strict=True):
        real = mask.bool()[:, None, :, None].expand_as(w_hf)  # padded queries are undefined in HF
        assert (w_ours.float()[real] - w_hf[real]).abs().max().item() <= 1e-5


def test_save_and_load_round_trip(attnkit_model, tmp_path):
    attnkit_model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json",
    ]  # fmt: skip
    again = BertEncoder.from_pretrained(tmp_path / "ckpt")
    assert again.config == attnkit_model.config
    assert torch.equal(again.encode(SENTENCES[:3]), attnkit_model.encode(SENTENCES[:3]))


def test_errors(tmp_path, attnkit_model):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        BertEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        BertEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        attnkit_model(torch.zeros(1, 600, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids int64"):
        attnkit_model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="list of str"):
        attnkit_model.tokenizer.encode_batch([1, 2])
