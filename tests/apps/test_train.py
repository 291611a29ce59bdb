"""Training, resuming, evaluating and running a tiny translator on the committed sample pages."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from attnkit.apps.tasks import evaluate, load_task_model, score
from attnkit.apps.train import TrainConfig, Trainer, budget_done, lr_factor, token_batches, valid_loss
from attnkit.apps.train import steps as steps_mod
from attnkit.apps.train import trainer as train_mod
from attnkit.cli import main
from attnkit.data import DataError
from attnkit.models import Seq2Seq

from ..tiny_run import TINY, build_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    meta = build_cache(root)
    assert meta["counts"]["train"] > 10
    return root


def _config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.json')))}.json"
    path.write_text(json.dumps({**TINY, **changes}))
    return path


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, cache, monkeypatch):
    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(TINY)
    full = Trainer(cfg, tmp_path / "full", cache=cache, progress=False, log=lambda m: None)
    full.run()
    real_step = train_mod.train_step

    def ctrl_c_after_step_4(model, opt, batch, cfg, step, done):
        loss = real_step(model, opt, batch, cfg, step, done)
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 4
        return loss

    monkeypatch.setattr(train_mod, "train_step", ctrl_c_after_step_4)
    messages = []
    part = Trainer(cfg, tmp_path / "part", cache=cache, progress=False, log=messages.append)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run in the background
    state = part.run()
    assert state["interrupted"] and state["step"] == 4
    assert any("interrupted: saved step 4" in m for m in messages)
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is restored
    monkeypatch.setattr(train_mod, "train_step", real_step)
    resumed = Trainer(cfg, tmp_path / "part", cache=cache, progress=False, log=lambda m: None)
    state = resumed.run(resume=True)
    assert state["step"] == 6 and "interrupted" not in state
    a, b = _state(full.model), _state(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert full.state["tokens"] == resumed.state["tokens"]
    log = [json.loads(x) for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [3, 6]  # validations only; the interrupt saves without one


def test_run_directory_files_and_errors(tmp_path, cache):
    cfg = TrainConfig.from_dict(TINY)
    out = tmp_path / "run"
    Trainer(cfg, out, cache=cache, progress=False, log=lambda m: None).run()
    for name in ("train.json", "tokenizer.json", "checkpoint.pt", "log.jsonl", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json", "model/task.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries
    before = (out / "train.json").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg.replace(lr=1e-4), out, cache=cache, progress=False).run()
    assert (out / "train.json").read_bytes() == before  # the refused run wrote nothing
    with pytest.raises(ValueError, match="config differs"):
        Trainer(cfg.replace(lr=1e-4), out, cache=cache, progress=False).run(resume=True)
    longer = Trainer(cfg.replace(max_steps=8), out, cache=cache, progress=False, log=lambda m: None)
    assert longer.run(resume=True)["step"] == 8  # more budget for a finished run
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(cfg, tmp_path / "empty", cache=cache, progress=False).run(resume=True)
    with pytest.raises(Exception, match="attnkit data summarize"):
        Trainer(cfg.replace(task="summarize", corpus="summarize-debian"), tmp_path / "s", cache=cache).run()


def test_a_config_that_names_its_sources_refuses_a_corpus_built_from_others(tmp_path, cache):
    cfg = TrainConfig.from_dict({**TINY, "max_steps": 1})
    messages = []
    Trainer(
        cfg.replace(sources=["help"]), tmp_path / "a", cache=cache, progress=False, log=messages.append
    ).run()
    assert any("training pairs (help)," in m for m in messages)
    with pytest.raises(
        DataError, match=r"from sources \['help', 'ui'\], but .* from \['help'\]; .*--sources help,ui`"
    ):
        Trainer(cfg.replace(sources=["help", "ui"]), tmp_path / "b", cache=cache, progress=False).run()
    assert not (tmp_path / "b").exists()  # refused before writing anything
    for bad in (["ui"], ["help", "web"], "help"):
        with pytest.raises(ValueError, match="expected sources a list of names from"):
            cfg.replace(sources=bad)
    with pytest.raises(ValueError, match="sources are for translation"):
        cfg.replace(task="summarize", sources=["help"])


def test_resume_a_checkpoint_written_before_a_config_field_existed(tmp_path, cache):
    cfg = TrainConfig.from_dict({**TINY, "max_steps": 3})
    out = tmp_path / "run"
    Trainer(cfg, out, cache=cache, progress=False, log=lambda m: None).run()
    blob = torch.load(out / "checkpoint.pt", weights_only=False)
    for field in ("batch_sort", "sources"):  # what an older attnkit wrote: no such keys
        del blob["config"][field]
    torch.save(blob, out / "checkpoint.pt")
    longer = Trainer(cfg.replace(max_steps=4), out, cache=cache, progress=False, log=lambda m: None)
    assert longer.run(resume=True)["step"] == 4  # the missing fields mean their defaults
    with pytest.raises(ValueError, match="config differs"):
        Trainer(cfg.replace(batch_sort="longer"), out, cache=cache, progress=False).run(resume=True)


def test_eval_translate_and_show_attention(tmp_path, cache, capsys):
    out = tmp_path / "run"
    Trainer(TrainConfig.from_dict(TINY), out, cache=cache, progress=False, log=lambda m: None).run()
    result = evaluate(out, split="test", beam_size=2, progress=False)
    assert set(result) >= {"bleu", "chrf", "bleu_signature", "chrf_signature", "examples"}
    assert result["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert (out / "model" / "eval-test-beam2.hyp.txt").read_text().count("\n") == result["examples"]
    assert (
        main(["translate", "Specifies general Load/Save settings.", "--model", str(out), "--show-attention"])
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip() and "Cross-attention of the first output" in captured.err
    assert "Alignment:" in captured.err
    tm = load_task_model(out)
    assert tm.generate(["a", "Click OK in the dialog."], beam_size=1)[0] == tm.generate(["a"], beam_size=1)[0]


def test_eval_on_a_test_file(tmp_path, cache, capsys):
    out = tmp_path / "run"
    Trainer(TrainConfig.from_dict(TINY), out, cache=cache, progress=False, log=lambda m: None).run()
    tsv = tmp_path / "mine.tsv"
    tsv.write_text("Click OK.\tKlicken Sie auf OK.\n\nOpen the file.\tÖffnen Sie die Datei.\n")
    assert main(["eval", str(out), "--test-file", str(tsv), "--beam", "1", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "file-mine" and result["examples"] == 2 and "bleu" in result
    assert result["test_file"] == str(tsv)
    assert (out / "model" / "eval-file-mine-beam1.hyp.txt").read_text().count("\n") == 2
    bad = tmp_path / "bad.tsv"
    bad.write_text("Click OK.\tKlicken Sie auf OK.\nno tab on this line\n")
    assert main(["eval", str(out), "--test-file", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"--test-file: {bad}:2: expected 'source<TAB>reference'" in err and err.count("\n") == 1
    assert main(["eval", str(out), "--test-file", str(tmp_path / "none.tsv")]) == 1
    assert "expected a test file" in capsys.readouterr().err


def test_eval_length_penalty(tmp_path, cache, capsys, monkeypatch):
    """``--length-penalty`` reaches beam search, is recorded in the score file, and names its
    files apart from the run's own setting; a non-finite value is a usage error."""
    out = tmp_path / "run"
    Trainer(TrainConfig.from_dict(TINY), out, cache=cache, progress=False, log=lambda m: None).run()
    seen = []
    generate = Seq2Seq.generate

    def spy(self, src, **kwargs):
        seen.append(kwargs["length_penalty"])
        return generate(self, src, **kwargs)

    monkeypatch.setattr(Seq2Seq, "generate", spy)
    run_lp = TINY.get("length_penalty", 1.0)
    assert evaluate(out, split="test", beam_size=2, progress=False, limit=3)["length_penalty"] == run_lp
    assert set(seen) == {run_lp} and (out / "model" / "eval-test-beam2.json").exists()
    seen.clear()
    assert (
        main(["eval", str(out), "--beam", "2", "--length-penalty", "0.6", "--limit", "3", "--no-progress"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["length_penalty"] == 0.6 and set(seen) == {0.6}
    saved = json.loads((out / "model" / "eval-test-beam2-lp0.6.json").read_text())
    assert saved == result and (out / "model" / "eval-test-beam2-lp0.6.hyp.txt").read_text().count("\n") == 3
    seen.clear()
    assert main(["translate", "Click OK.", "--model", str(out), "--beam", "2", "--length-penalty", "2"]) == 0
    assert seen == [2.0]
    capsys.readouterr()
    for bad in ("nan", "inf"):
        assert main(["eval", str(out), "--length-penalty", bad]) == 2
        assert f"--length-penalty: expected a finite number, but got {bad}" in capsys.readouterr().err
    assert main(["eval", str(out), "--beam", "0"]) == 2
    assert "--beam: expected >= 1, but got 0" in capsys.readouterr().err


def test_checkpoint_averaging_and_copy_attention(tmp_path, cache):
    """``average_last`` keeps the last validations' weights and writes their mean to
    ``model-avg/``, which evaluates like ``model/``; a copy-attention model trains through it."""
    cfg = TrainConfig.from_dict({**TINY, "max_steps": 8, "eval_every": 2, "average_last": 3,
                                 "model": {**TINY["model"], "copy_attention": True}})  # fmt: skip
    out = tmp_path / "run"
    trainer = Trainer(cfg, out, cache=cache, progress=False, log=lambda m: None)
    trainer.run()
    kept = sorted(p.name for p in (out / "snapshots").iterdir())
    assert kept == ["step-00000004.pt", "step-00000006.pt", "step-00000008.pt"]  # older ones removed
    states = [torch.load(out / "snapshots" / k, weights_only=True) for k in kept]
    averaged = Seq2Seq.from_pretrained(out / "model-avg")
    assert averaged.config.copy_attention
    for name, value in averaged.state_dict().items():
        assert torch.allclose(value, sum(st[name] for st in states) / 3, atol=1e-6), name
    task = json.loads((out / "model-avg" / "task.json").read_text())
    assert task["averaged_steps"] == [4, 6, 8]
    assert task["valid_loss"] == pytest.approx(valid_loss(averaged, trainer.valid, trainer.run_cfg), rel=1e-5)
    result = evaluate(out / "model-avg", split="test", beam_size=2, progress=False)
    assert result["examples"] > 0 and "bleu" in result
    with pytest.raises(ValueError, match="average_last"):
        TrainConfig.from_dict({**TINY, "average_last": 1})


def test_cli_errors(tmp_path, cache, capsys):
    """Missing or invalid files are runtime errors (1); arguments that contradict each other
    are usage errors (2). Both are one line."""
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    cases = [
        (["train", "translate", "--config", str(tmp_path / "none.json")], 1, "expected a config file"),
        (["train", "translate", "--config", str(bad_json)], 1, "is not valid JSON"),
        (
            ["train", "translate", "--config", str(_config(tmp_path, bogus=1))],
            1,
            "unknown config fields ['bogus']",
        ),
        (["train", "translate", "--config", str(_config(tmp_path, lr=-1))], 1, "expected lr > 0"),
        (["train", "summarize", "--config", str(_config(tmp_path))], 2, "expected a 'summarize' config"),
        (["eval", str(tmp_path / "nothing")], 1, "expected a trained model directory"),
        (["translate", "hi", "--model", str(tmp_path / "nothing")], 1, "expected a trained model directory"),
    ]
    for argv, code, message in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_cli_train_then_summarize_refuses_a_translation_model(tmp_path, cache, capsys):
    out = tmp_path / "run"
    argv = ["train", "translate", "--config", str(_config(tmp_path)), "--out", str(out), "--cache-dir", str(cache),
            "--no-progress", "--max-steps", "3"]  # fmt: skip
    assert main(argv) == 0
    assert "step 3, best valid loss" in capsys.readouterr().out
    assert main(["summarize", "text", "--model", str(out)]) == 2
    assert "expected a 'summarize' model" in capsys.readouterr().err
    assert main(["translate", "  ", "--model", str(out)]) == 2
    assert "expected some text" in capsys.readouterr().err


@pytest.mark.parametrize("sort", ["source", "longer"])
def test_batches_respect_the_token_budget_and_depend_only_on_seed_and_epoch(sort):
    g = torch.Generator().manual_seed(0)
    lengths = [(int(a), int(b)) for a, b in torch.randint(2, 60, (500, 2), generator=g)]
    b1 = token_batches(lengths, 600, seed=1, epoch=0, sort=sort)
    assert b1 == token_batches(lengths, 600, 1, 0, sort) and b1 != token_batches(lengths, 600, 1, 1, sort)
    assert sorted(i for b in b1 for i in b) == list(range(500))
    for b in b1:
        assert len(b) * (max(lengths[i][0] for i in b) + max(lengths[i][1] for i in b)) <= 600 or len(b) == 1


def padding_share(lengths, batches) -> float:
    padded = sum(len(b) * (max(lengths[i][0] for i in b) + max(lengths[i][1] for i in b)) for b in batches)
    return 1 - sum(lengths[i][0] + lengths[i][1] for b in batches for i in b) / padded


def test_sorting_by_the_longer_side_leaves_less_padding_when_the_sides_differ():
    g = torch.Generator().manual_seed(0)
    src = torch.randint(2, 60, (2000,), generator=g)
    tgt = (src * (0.6 + 0.8 * torch.rand(2000, generator=g))).long().clamp(min=2)  # a translation's spread
    lengths = list(zip(src.tolist(), tgt.tolist(), strict=True))
    by_source = token_batches(lengths, 1000, 0, 0, "source")
    by_longer = token_batches(lengths, 1000, 0, 0, "longer")
    assert sorted(i for b in by_longer for i in b) == list(range(2000))
    assert padding_share(lengths, by_longer) < padding_share(lengths, by_source) - 0.01  # 7.7% against 9.5%
    assert len(by_longer) < len(by_source)  # the same pairs in fewer batches of the same padded size
    with pytest.raises(ValueError, match=r"expected sort in .*'source', 'longer'.*got 'target'"):
        token_batches(lengths, 1000, 0, 0, "target")
    with pytest.raises(ValueError, match="batch_sort"):
        TrainConfig(batch_sort="target")


def test_lr_schedule_and_metrics():
    assert (
        lr_factor(1, 4) == 0.25
        and lr_factor(4, 4) == 1.0
        and lr_factor(16, 4) == 0.5
        and lr_factor(7, 0) == 1
    )
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(5, 2, "cosine")
    s = score("translate", ["Klicken Sie auf OK."], ["Klicken Sie auf OK."])
    assert s["bleu"] == 100.0 and s["chrf"] == 100.0
    r = score("summarize", ["a fast text editor"], ["fast text editor"])
    assert r["rouge1"] == pytest.approx(100 * 2 * 0.75 * 1 / 1.75, abs=0.01)


def test_linear_schedule_falls_in_a_straight_line_to_zero_at_the_end_of_either_budget():
    steps, warmup = 10, 2
    by_steps = TrainConfig.from_dict(
        {**TINY, "max_steps": steps, "warmup_steps": warmup, "lr_schedule": "linear"}
    )
    factors = [lr_factor(s, warmup, "linear", budget_done(by_steps, s - 1, 0.0)) for s in range(1, steps + 1)]
    # up over the warm-up, then 8/8, 7/8, ..., 1/8: the line that reaches 0 one step after the last
    assert factors == pytest.approx([0.5, 1.0] + [(steps - s + 1) / (steps - warmup) for s in range(3, 11)])
    # a time budget at a steady 3 s a step, ending after step 10, gives the same line
    by_time = TrainConfig.from_dict({**TINY, "max_steps": 10_000, "warmup_steps": warmup,
                                     "lr_schedule": "linear", "max_minutes": 30 / 60})  # fmt: skip
    timed = [lr_factor(s, warmup, "linear", budget_done(by_time, s - 1, 3.0 * (s - 1))) for s in range(1, 11)]
    assert timed == pytest.approx(factors)
    assert lr_factor(11, warmup, "linear", 1.0) == 0.0 and lr_factor(12, warmup, "linear", 1.5) == 0.0
    assert lr_factor(1, 0, "linear", 0.0) == 1.0  # no warm-up: the peak at the first step
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig.from_dict({**TINY, "lr_schedule": "cosine"})


def test_trainer_follows_the_linear_schedule(tmp_path, cache):
    cfg = TrainConfig.from_dict({**TINY, "lr_schedule": "linear"})
    trainer = Trainer(cfg, tmp_path / "run", cache=cache, progress=False, log=lambda m: None)
    trainer.run()
    last = cfg.max_steps  # its lr was set from the steps done before it
    expected = cfg.lr * lr_factor(last, cfg.warmup_steps, "linear", (last - 1) / cfg.max_steps)
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(expected)
    assert expected == pytest.approx(cfg.lr / (cfg.max_steps - cfg.warmup_steps))
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["lr"] for e in log] == pytest.approx([cfg.lr, expected])  # steps 3 (the peak) and 6


def test_shipped_configs_are_valid():
    from attnkit.apps.train import load_config

    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.json"))
    assert len(configs) == 4
    for path in configs:
        cfg = load_config(path)
        assert cfg.task in path.name and cfg.model_config(cfg.vocab_size).dim % cfg.model["num_heads"] == 0


def test_precision_auto_measures_and_keeps_its_choice(tmp_path, cache, monkeypatch):
    fake = {"fp32": 1.0, "bf16": 0.5}
    seen = []
    clock = [0.0]  # a fake clock that each step advances by its pretended duration

    def fake_step(net, batch, bf16, label_smoothing):
        seen.append(bf16)
        torch.rand(3)  # consumes random numbers, as dropout does
        clock[0] += fake["bf16" if bf16 else "fp32"]

    monkeypatch.setattr(steps_mod, "forward_backward", fake_step)
    monkeypatch.setattr("attnkit._timing.perf_counter", lambda: clock[0])
    net = torch.nn.Linear(2, 2)
    before = torch.get_rng_state()
    choice, seconds = steps_mod.choose_precision(net, None, 0.0, rounds=2)
    assert choice == "bf16" and seconds == fake and seen == [False, True] * 3  # warm-up, then in turns
    assert torch.equal(torch.get_rng_state(), before)  # the measurement leaves no trace
    fake["bf16"] = 0.95  # faster, but not by BF16_MIN_SPEEDUP
    assert steps_mod.choose_precision(torch.nn.Linear(2, 2), None, 0.0)[0] == "fp32"

    fake["bf16"] = 0.5
    messages = []
    cfg = TrainConfig.from_dict({**TINY, "precision": "auto", "max_steps": 3})
    state = Trainer(cfg, tmp_path / "run", cache=cache, progress=False, log=messages.append).run()
    assert state["precision"] == "bf16"
    assert any(m.startswith("precision: bf16 (a training step took 0.500 s in bf16") for m in messages)
    messages.clear()
    longer = cfg.replace(max_steps=4)
    Trainer(longer, tmp_path / "run", cache=cache, progress=False, log=messages.append).run(resume=True)
    assert "precision: bf16 (measured when the run started)" in messages
    messages.clear()
    Trainer(
        cfg.replace(precision="fp32"), tmp_path / "b", cache=cache, progress=False, log=messages.append
    ).run()
    assert "precision: fp32 (as configured)" in messages


def test_legacy_bf16_key_and_bad_precision():
    base = {k: v for k, v in TINY.items() if k != "precision"}
    assert TrainConfig.from_dict({**base, "bf16": True}).precision == "bf16"
    assert TrainConfig.from_dict({**base, "bf16": False}).precision == "fp32"
    assert TrainConfig.from_dict(base).precision == "auto"
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.from_dict({**TINY, "precision": "fp8"})
