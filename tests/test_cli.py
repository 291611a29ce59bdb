"""The command line: the demo walk-through and the pattern drawer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from attnkit.apps.demo import tokenize, walkthrough
from attnkit.cli import main


def test_walkthrough_numbers_are_the_textbook_steps():
    w = walkthrough()
    assert w.tokens == ["The", "cat", "sat", "on", "the", "mat", "."]
    assert torch.allclose(w.scores, w.q @ w.k.T)
    assert torch.allclose(w.scaled, w.scores / 2.0)  # sqrt(d_k) = 2
    assert torch.allclose(w.weights.sum(-1), torch.ones(7, dtype=torch.float64))
    assert torch.allclose(w.out, w.weights @ w.v)
    assert w.check_error < 1e-12


def test_walkthrough_is_deterministic_and_causal_hides_the_future():
    assert torch.equal(walkthrough().weights, walkthrough().weights)
    c = walkthrough(causal=True)
    assert torch.all(c.weights.triu(1) == 0) and c.check_error < 1e-12
    # "The" and "the" share an embedding; only their positions differ
    w = walkthrough()
    assert not torch.allclose(w.x[0], w.x[4])


def test_tokenize():
    assert tokenize("Hello, world!") == ["Hello", ",", "world", "!"]


def test_demo_command_prints_every_step(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for heading in ("Q\n", "K\n", "V\n", "Q K^T\n", "Q K^T / sqrt(d_k)", "softmax", "output", "Check:"):
        assert heading in out
    assert "1.000" in out.split("\nsoftmax\n")[1].split("\n\n")[0]


def test_demo_rejects_empty_text(capsys):
    assert main(["demo", "   "]) == 2
    assert "expected a text with at least one word" in capsys.readouterr().err


def test_patterns_command(capsys):
    assert main(["patterns", "SlidingWindow(64) & Causal()", "-n", "512"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SlidingWindow(before=64) & Causal()   N=512 S=512   tile=8x8")
    assert "allowed pairs: 31,200 of 262,144 (11.90%)" in out
    assert "15 partial, 49 empty" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["patterns", "Sliding(3)"], "unknown pattern 'Sliding'"),
        (["patterns", "Document((3, 4))", "-n", "8"], "sum(lengths) == S"),
        (["patterns", "Causal()", "-n", "0"], "N to be a positive int"),
    ],
)
def test_patterns_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_console_script_entry_point():
    res = subprocess.run(
        [sys.executable, "-m", "attnkit.cli", "patterns", "Causal()", "-n", "8"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0 and "█·······" in res.stdout


def test_internal_errors_keep_their_traceback(monkeypatch):
    """A bug (here: an unexpected exception inside a command) is not hidden as a one-line
    usage error: it propagates with its traceback."""
    import attnkit.apps.demo as demo

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(demo, "walkthrough", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["demo"])


def test_usage_errors_exit_2_runtime_errors_exit_1(tmp_path, capsys):
    assert main(["patterns", "Causal()", "--width", "0"]) == 2
    assert "--width: expected a positive integer" in capsys.readouterr().err
    assert main(["explain", "hi", "--model", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    res = subprocess.run([sys.executable, "-m", "attnkit.cli", "patterns"], capture_output=True, text=True)
    assert res.returncode == 2 and "usage:" in res.stderr  # argparse: missing SPEC
