"""`attnkit train` data-parallel: 2 ranks train exactly as 1 process on the same global
batches, resume on another number of ranks, and run under torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from attnkit.apps.train import TrainConfig, Trainer

from ..tiny_run import TINY, build_cache
from ._spawn import run_ranks, values

TINY = {**TINY, "model": {**TINY["model"], "dropout": 0.0}}  # ranks would draw other dropout masks


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    build_cache(root)
    return root


def _train(rank: int, world: int, out: str, cache: str, steps: int, resume: bool) -> dict:
    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict({**TINY, "max_steps": steps})
    trainer = Trainer(cfg, out, cache=cache, progress=False, log=lambda m: None)
    state = trainer.run(resume=resume)
    return {"state": state, "model": {k: v.clone() for k, v in trainer.model.state_dict().items()}}


def _agree(rank: int, world: int) -> tuple[bool, float]:
    # rank 1 asks to stop and has trained longer: every rank must see both
    comm = types.SimpleNamespace(_comm_device=torch.device("cpu"))
    return Trainer._agree(comm, rank == 1, 10.0 + rank)


def test_ranks_agree_on_stopping_and_on_the_time_spent():
    # the time budget and the linear learning-rate schedule read the longest time of any rank:
    # ranks that timed themselves apart would set different rates, or stop at different steps
    assert values(run_ranks(_agree, 2)) == [(True, 11.0), (True, 11.0)]


def _max_diff(a: dict, b: dict) -> float:
    """Largest parameter difference, key-projection biases left out: a bias added to every key
    shifts a query's scores by one constant, which the softmax ignores, so its true gradient
    is 0 and what backward gives is rounding noise -- which Adam scales up to full steps of
    size ``lr``, differently in every process layout."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if not k.endswith("k_proj.bias"))


def test_two_ranks_train_as_one_process_and_resume_on_one(tmp_path, cache):
    one = _train(0, 1, str(tmp_path / "one"), str(cache), 6, False)
    two = values(run_ranks(_train, 2, str(tmp_path / "two"), str(cache), 6, False))
    assert two[0]["state"]["step"] == 6 and two[0]["state"]["tokens"] == one["state"]["tokens"]
    assert _max_diff(two[0]["model"], two[1]["model"]) == 0.0  # DDP keeps the ranks identical
    assert _max_diff(two[0]["model"], one["model"]) <= 1e-5
    log = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [3, 6]  # written once, by rank 0
    # 3 steps on 2 ranks, then 3 more on 1 process: the same model as 6 steps on 1 process
    values(run_ranks(_train, 2, str(tmp_path / "mixed"), str(cache), 3, False))
    resumed = _train(0, 1, str(tmp_path / "mixed"), str(cache), 6, True)
    assert resumed["state"]["step"] == 6
    assert _max_diff(resumed["model"], one["model"]) <= 1e-5


def test_train_under_torchrun(tmp_path, cache):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**TINY, "max_steps": 2, "eval_every": 2}))
    env = {**os.environ, "ATTNKIT_TUNE": "off", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "attnkit.cli", "train", "translate", "--config", str(cfg), "--out", str(tmp_path / "run"),
        "--cache-dir", str(cache),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("step 2, best valid loss") == 1  # rank 0 reports; rank 1 stays quiet
    assert "2 data-parallel ranks" in done.stdout
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "model").is_dir()


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker process of ``rank`` that torchrun (``parent``) started, from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and env.get(b"RANK") == str(rank).encode():
            return int(entry)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc")
def test_a_killed_rank_ends_the_job_with_a_message_naming_it(tmp_path, cache):
    # rank 1 dies mid-training (SIGKILL: no chance to say anything); the job must end promptly,
    # well inside the collectives' timeout (rank 0 must not sit in an all-reduce waiting for
    # it), and the report must name rank 1 as the cause. Measured: about 1.3 s after the kill
    import signal
    import time

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**TINY, "max_steps": 100_000, "eval_every": 2}))
    env = {**os.environ, "ATTNKIT_TUNE": "off", "OMP_NUM_THREADS": "1", "ATTNKIT_DIST_TIMEOUT": "120"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "attnkit.cli", "train", "translate", "--config", str(cfg), "--out", str(tmp_path / "run"),
        "--cache-dir", str(cache), "--no-progress",
    ]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "log.jsonl").is_file():  # rank 0 logs step 2: both are training
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.2)
        pid = _rank_pid(job.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode != 0
    assert time.monotonic() - killed < 60  # far below ATTNKIT_DIST_TIMEOUT: no rank waited it out
    # torchrun's report: rank 0 was stopped by it, the first failure is rank 1's SIGKILL
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\).*?SIGKILL", err, re.DOTALL), err[-3000:]
