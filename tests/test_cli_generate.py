"""``attnkit generate`` on small decoders, and ``attnkit explain`` naming Gemma 3's local and
global layers."""

from __future__ import annotations

import pytest
import torch

from attnkit.cli import main


def _word_tokenizer(directory, vocab: int = 97) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.models.conftest import save_tiny_decoder

    d = tmp_path_factory.mktemp("lm")
    save_tiny_decoder(d)
    _word_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    d = tmp_path_factory.mktemp("gemma")
    Gemma3ForCausalLM(cfg).save_pretrained(d)
    _word_tokenizer(d)
    return d


def test_generate_prints_the_greedy_continuation_and_its_speed(llama_dir, capsys):
    from attnkit.models import load

    assert main(["generate", str(llama_dir), "w5 w7 w9", "--max-new-tokens", "6", "--show-tokens"]) == 0
    out, err = capsys.readouterr()
    loaded = load(llama_dir)
    want = loaded.model.generate(torch.tensor([[5, 7, 9]]), max_new_tokens=6)[0, 3:].tolist()
    assert out.startswith("w5 w7 w9") and loaded.tokenizer.decode(want) in out
    assert "tokens: " + " ".join(f"{i}:'w{i}'" for i in want) in out
    assert "prompt of 3 tokens in" in err and "6 new tokens" in err and "tokens/s" in err


def test_generate_samples_reproducibly_and_checks_its_arguments(llama_dir, capsys):
    argv = ["generate", str(llama_dir), "w5 w7", "--max-new-tokens", "8", "--sample", "--top-k", "5"]
    assert main([*argv, "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*argv, "--seed", "3"]) == 0
    assert capsys.readouterr().out == first
    for extra, message in [
        (["--temperature", "0"], "--temperature/--top-k/--top-p: generate: expected temperature > 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer"),
        (["--max-new-tokens", "9999"], "exceed"),
    ]:
        assert main(["generate", str(llama_dir), "w5", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["generate", str(llama_dir / "missing"), "w5"]) == 1
    assert "MODEL: " in capsys.readouterr().err


def test_explain_names_gemma_layers_local_and_global(gemma_dir, capsys):
    assert main(["explain", "--model", str(gemma_dir), "w3 w4 w5 w6 w7 w8 w9", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "Layers: 0-4 local, 5 global (local: a window of the last 4 tokens" in out
    # the local layers' weights outside their window are zero, and the page says what they lose
    assert "Attention each head loses to its pattern" in out
