"""``attnkit explain``: the README's main command, its options and its errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from attnkit.cli import main


def test_explain_default_prints_tokens_matrix_and_top_k(capsys):
    assert main(["explain", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("all-MiniLM-L6-v2: 6 layers x 12 heads, 9 tokens")
    assert "Tokens: 0:[CLS] 1:the 2:cat 3:sat 4:on 5:the 6:mat 7:. 8:[SEP]" in out
    assert "Layer 5, head 11 (the head that looks most at other words" in out
    assert "Top 3 attended tokens per token:" in out and "sat -> cat" in out


def test_explain_steps_heads_html_png(tmp_path, capsys):
    html, png = tmp_path / "r.html", tmp_path / "r.png"
    argv = ["explain", "A dog barked.", "--layer", "0", "--head", "2", "--steps", "--heads", "--html", str(html),
            "--png", str(png), "--color", "never"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Layer 0, head 2 (as asked)" in out
    assert "Layer 0 (encoder.layers.0.self_attn), head 2 of all-MiniLM-L6-v2, step by step" in out
    check = next(ln for ln in out.splitlines() if ln.startswith("Check: the model's own output"))
    assert float(check.rsplit("= ", 1)[1].rstrip(").")) < 1e-4
    assert "previous token" in out and "Heads per behaviour" in out
    assert html.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


def test_explain_reads_stdin():
    res = subprocess.run([sys.executable, "-m", "attnkit.cli", "explain", "-", "--color", "never"],
                         input="Hello world", capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Tokens: 0:[CLS] 1:hello 2:world 3:[SEP]" in res.stdout


def test_explain_truncates_long_text_and_says_so(capsys):
    assert main(["explain", "word " * 400, "--color", "never", "--max-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "warning: the text has 402 tokens but all-MiniLM-L6-v2 reads at most 256" in captured.err
    assert "256 tokens" in captured.out.splitlines()[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", ""], "expected a non-empty TEXT"),
        (["explain", "   \n"], "expected a non-empty TEXT"),
        (["explain", "hi", "--layer", "6"], "--layer: expected 0..5"),
        (["explain", "hi", "--head", "-1"], "--head: expected 0..11"),
        (["explain", "hi", "--pattern", "Nope(1)"], "unknown pattern 'Nope'"),
        (["explain", "hi", "--top-k", "0"], "--top-k: expected a positive integer"),
        (["explain", "hi", "--dims", "-2"], "--dims: expected a positive integer"),
    ],
)
def test_explain_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_explain_rejects_a_directory_that_is_not_a_supported_model(tmp_path, capsys):
    """A model that cannot be loaded is a runtime error: exit 1, one line."""
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    assert main(["explain", "hi", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--model: " in err and "expected a BERT-family, Llama-family or Gemma 3 checkpoint" in err
    assert err.count("\n") == 1
    assert main(["explain", "hi", "--model", "/nonexistent/model"]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_explain_a_llama_checkpoint(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.models.conftest import save_tiny_decoder

    save_tiny_decoder(tmp_path)
    vocab = {f"w{i}": i for i in range(97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert (
        main(["explain", "w5 w6 w7 w8", "--model", str(tmp_path), "--steps", "--heads", "--color", "never"])
        == 0
    )
    out = capsys.readouterr().out
    assert "2 layers x 4 heads, 4 tokens" in out
    assert "causal (each token sees only itself and earlier tokens)" in out
    check = next(ln for ln in out.splitlines() if ln.startswith("Check: the model's own output"))
    assert float(check.rsplit("= ", 1)[1].rstrip(").")) < 1e-4


def test_patterns_png(tmp_path, capsys):
    assert (
        main(["patterns", "SlidingWindow(8) & Causal()", "-n", "64", "--png", str(tmp_path / "p.png")]) == 0
    )
    assert "wrote" in capsys.readouterr().out and (tmp_path / "p.png").stat().st_size > 1000
