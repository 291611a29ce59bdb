"""``attnkit fit``: per-head patterns fitted to a pretrained model, measured, written, saved."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit import patterns as P
from attnkit.apps.fit import split_texts
from attnkit.cli import main

PARAGRAPHS = [
    "The cat sat on the mat and looked at the garden for a long while.",
    "A library for attention lets you choose which words each word may look at.",
    "Sparse patterns keep the words nearby and a few words at the start.",
    "The weather was cold, so the children stayed inside and read their books.",
    "Every head of a trained model does a different job, some local and some global.",
    "The train left the station at noon and arrived in the city before dark.",
    "Dense attention costs time and memory that grow with the square of the length.",
    "She wrote a letter to her friend about the trip to the mountains last summer.",
]


def test_split_texts_holds_out_every_fourth_paragraph():
    fit, held = split_texts("\n\n".join(PARAGRAPHS))
    assert held == [PARAGRAPHS[3], PARAGRAPHS[7]] and len(fit) == 6
    fit, held = split_texts("one\ntwo\nthree\nfour")  # no blank lines: lines are the texts
    assert held == ["four"]


def test_fit_minilm_writes_json_png_and_a_model_that_keeps_its_patterns(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(PARAGRAPHS))
    out, saved = tmp_path / "out", tmp_path / "fitted"
    argv = ["fit", "--texts", str(texts), "--windows", "2,4,8", "--out", str(out), "--save", str(saved)]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Held-out quality against dense attention" in printed and "fitted per head" in printed
    report = json.loads((out / "fit.json").read_text())
    assert report["model"] == "all-MiniLM-L6-v2" and len(report["layers"]) == 6
    assert len(report["mass"]) == 6 and len(report["mass"][0]) == 12 and len(report["candidates"]) == 10
    dense, fitted, window, sinks = report["comparison"]
    assert dense["cosine"] == pytest.approx(1.0) and dense["density"] == 1.0
    # the fitted heads are sparser than dense, the uniform baselines are matched to their density,
    # and at that density the fit keeps the embeddings closer to dense than either baseline
    assert fitted["density"] < 0.95
    for base in (window, sinks):
        assert base["density"] == pytest.approx(fitted["density"], abs=0.03), base
        assert fitted["cosine"] > base["cosine"], (fitted, base)
    assert f"{fitted['density']:.4f}  {fitted['cosine']:.4f}" in printed
    assert (out / "fit.png").stat().st_size > 0
    page = (out / "fit.html").read_text()
    assert '"headPatterns"' in page and '"lost": [[' in page and '"rollout": "' in page
    from attnkit.models import BertEncoder

    model = BertEncoder.from_pretrained(saved)
    assert [repr(p) for p in model.layer_patterns] == report["fitted"]
    assert all(isinstance(p, P.PerHead) for p in model.layer_patterns)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--keep", "1.5"], "--keep: expected a share in (0, 1]"),
        (["--windows", "4,x"], "--windows: "),
        (["--max-texts", "0"], "--max-texts: expected a positive integer"),
    ],
)
def test_fit_usage_errors(tmp_path, extra, message, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(PARAGRAPHS))
    assert main(["fit", "--texts", str(texts), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_fit_input_errors(tmp_path, capsys):
    assert main(["fit", "--texts", str(tmp_path / "missing.txt")]) == 1
    assert "--texts: " in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("just one paragraph")
    assert main(["fit", "--texts", str(one)]) == 2
    assert "at least 2 held out" in capsys.readouterr().err


def test_fit_a_llama_checkpoint_reports_perplexity(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.models.conftest import save_tiny_decoder

    save_tiny_decoder(tmp_path / "lm")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "lm" / "tokenizer.json"))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(" ".join(f"w{(7 * p + 3 * i) % 97}" for i in range(30)) for p in range(8)))
    argv = [
        "fit",
        str(tmp_path / "lm"),
        "--texts",
        str(texts),
        "--windows",
        "2,4",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--no-progress"]) == 0
    report = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert report["kind"] == "decoder" and all("perplexity" in row for row in report["comparison"])
    assert all("Causal()" in p for p in report["fitted"])  # decoders stay causal
    dense, fitted, window, _sinks = report["comparison"]
    # densities count the square: the decoder's own causal attention is about half of it
    lengths = [30] * 2  # the two held-out texts of 30 words
    causal = sum(P.Causal().num_allowed(n) for n in lengths) / sum(n * n for n in lengths)
    assert dense["density"] == pytest.approx(causal)
    assert report["own_density"] == [[pytest.approx(causal, abs=0.02)] * 4] * 2  # the fit texts
    assert fitted["density"] <= dense["density"] and window["density"] <= fitted["density"] + 0.05


def test_decoder_baselines_stay_causal():
    import torch

    from attnkit.apps.fit import baseline

    (sinks,) = baseline(3, [P.Causal()], sinks=4)
    dense = sinks.to_dense(12, 12)
    assert not torch.triu(dense, 1).any()  # the sink positions do not see the future
    assert dense[:, 0].all() and dense[11, 8:].all() and not dense[11, 4:8].any()
    (window,) = baseline(3, [None])
    assert torch.equal(window.to_dense(12, 12), P.SlidingWindow(3, 3).to_dense(12, 12))
    (local,) = baseline(8, [P.SlidingWindow(2)])  # a sliding-window layer keeps its own window
    assert torch.equal(local.to_dense(12, 12), P.SlidingWindow(2).to_dense(12, 12))


def test_a_budget_no_candidate_fits_is_refused_before_the_coverage_pass(tmp_path, capsys, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(PARAGRAPHS))

    def no_coverage(*args, **kwargs):
        raise AssertionError("the coverage pass ran")

    monkeypatch.setattr("attnkit.apps.fit.coverage", no_coverage)
    assert main(["fit", "--texts", str(texts), "--budget", "0.05", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--budget: " in err and "no candidate has density <= budget=0.05 (the sparsest is" in err, err
    assert err.count("\n") == 1


def test_fit_by_effect_writes_a_fit_within_the_budget_and_its_weighting(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(PARAGRAPHS))
    out = tmp_path / "out"
    argv = [
        "fit",
        "--texts",
        str(texts),
        "--windows",
        "2,4,8",
        "--budget",
        "0.6",
        "--by",
        "effect",
        "--max-texts",
        "3",
    ]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Fitted patterns (by the effect on the loss; strength " in printed
    report = json.loads((out / "fit.json").read_text())
    assert report["fitted_by"].startswith("effect (strength ")
    fitted = report["comparison"][1]
    assert fitted["name"] == "fitted per head" and fitted["density"] <= 0.6 + 0.05  # held-out lengths
    # every head's choice is a candidate, and the fitted patterns are those candidates in its layer
    chosen = {report["candidates"][c] for row in report["choice"] for c in row}
    assert chosen and all(any(c in f for f in report["fitted"]) for c in chosen)


def test_fit_by_effect_needs_a_budget(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(PARAGRAPHS))
    assert main(["fit", "--texts", str(texts), "--by", "effect"]) == 2
    assert "--by effect: expected --budget" in capsys.readouterr().err


def test_fit_a_gemma3_checkpoint_keeps_its_local_windows_and_fits_its_global_layer(tmp_path, capsys):
    """Gemma 3 (5 local layers with a window of 6, then 1 global) is fitted like any decoder:
    every head's pattern stays within its layer's own (causal everywhere, the local layers'
    window at most), and by the effect on the loss the budget is spent within the layers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=20,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    Gemma3ForCausalLM(cfg).save_pretrained(tmp_path / "gemma")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "gemma" / "tokenizer.json"))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(" ".join(f"w{(7 * p + 3 * i) % 97}" for i in range(40)) for p in range(8)))
    argv = ["fit", str(tmp_path / "gemma"), "--texts", str(texts), "--windows", "2,4,16", "--budget", "0.15",
            "--by", "effect", "--out", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert report["kind"] == "decoder" and report["fitted_by"].startswith("effect (strength ")
    n = 40
    fitted = [P.parse_pattern(p) for p in report["fitted"]]
    own = [P.SlidingWindow(5)] * 5 + [P.Causal()]
    for layer, (p, mine) in enumerate(zip(fitted, own, strict=True)):
        allowed, limit = p.to_dense(n, n), mine.to_dense(n, n)
        assert not (allowed & ~limit).any(), f"layer {layer} sees past its own pattern"
    # the global layer's heads were fitted: sparser than causal, as the budget requires
    dense = report["comparison"][0]
    assert report["comparison"][1]["density"] < dense["density"]
    assert fitted[5].num_allowed(n, n) < 4 * P.Causal().num_allowed(n, n)
