"""Shared benchmark machinery (see ../shared/BENCHMARKS.md for the method).

* ``alternate`` times the compared callables in one process, warm, each round in a fresh
  seeded random order (a fixed or rotated order would let one method always follow the same
  memory-hungry neighbour and pay for its cache and page-fault debris), and reports median,
  min and max.
* ``peak_memory`` runs one configuration in a fresh subprocess and reports how far the
  process's resident memory rose above its level before the call, in MiB (Linux's resettable
  high-water mark ``VmHWM``; ``ru_maxrss`` growth where that is unavailable).
* ``environment`` records what the numbers depend on.
* ``run_batches`` and ``train_steps`` give the training benchmarks a run's real batches and
  one full training step (forward, backward, AdamW) of a model on them; ``run_parser`` and
  ``load_run`` their common arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "bench"


def environment() -> dict:
    cpu, flags = platform.processor(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(
            line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")
        )
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        commit += "+dirty" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "avx512": " avx512f " in f" {flags} ",
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "attnkit_commit": commit,
        "machine": platform.machine(),
    }


def calibration(dtypes) -> dict:
    """This machine's block-sparse tuning per dtype (measured now if not yet in the tuning
    file), to store beside results that depend on it."""
    from attnkit.backends import _tuning

    out = {}
    for dtype in dtypes:
        t = _tuning.current(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        out[str(dtype).replace("torch.", "")] = {
            "key": t.key or "built-in",
            "source": t.source,
            **t.to_json(),
        }
    return out


def calibration_line(cal: dict) -> str:
    """One markdown sentence summarizing :func:`calibration` for a results page."""
    parts = []
    for dtype, c in cal.items():
        fwd = c["kernel_rates"]["forward"]["band"]
        rates = ", ".join(f"{b}: {r:.0f}" for b, r in fwd.items())
        parts.append(
            f"{dtype}: forward band GFLOP/s by tile {{{rates}}}, gathered tile {c['gather_copy']:.2f}x, "
            f"masked SDPA {c['sdpa_mask_rate']:.0f} GFLOP/s ({c['source']})"
        )
    return "Block-sparse calibration (`attnkit tune`): " + "; ".join(parts) + "."


def alternate(
    fns: dict[str, Callable[[], object]], *, rounds: int = 5, budget_s: float = 3.0, max_rounds: int = 25
) -> dict:
    """Warm each callable once, then run them in turn for at least ``rounds`` rounds.

    More rounds (up to ``max_rounds``) are added while one round costs under ``budget_s / rounds``.
    """
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in fns}
    round_cost = sum(first.values())
    total = max(rounds, min(max_rounds, int(budget_s / max(round_cost, 1e-9))))
    names, order = list(fns), random.Random(0)
    for _ in range(total):
        order.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "rounds": len(ts),
            "first_call_s": first[name],
        }
        for name, ts in times.items()
    }


def run_lengths(run: str | Path, cache_dir: str | None = None):
    """``(config, trainer)``: the training run in directory ``run``, its training split encoded
    with its tokenizer from the corpus its config names (``trainer.lengths``, ``trainer.train``).
    The run itself is not touched (its tokenizer is copied into a scratch directory)."""
    from attnkit.apps.train import Trainer, load_config

    cfg = load_config(Path(run) / "train.json")
    with tempfile.TemporaryDirectory(prefix="attnkit-bench-run-") as scratch:
        shutil.copy(Path(run) / "tokenizer.json", scratch)
        trainer = Trainer(cfg, scratch, cache=cache_dir, progress=False, log=lambda m: None)
        trainer.prepare()  # encodes the splits
    return cfg, trainer


def run_batches(run: str | Path, count: int, cache_dir: str | None = None):
    """``(config, batches, vocabulary size)``: the first ``count`` batches of the batch plan of the
    training run in directory ``run`` (see :func:`run_lengths`)."""
    from attnkit.apps.train import collate, token_batches

    cfg, trainer = run_lengths(run, cache_dir)
    plan = token_batches(trainer.lengths, cfg.batch_tokens, cfg.seed, 0, cfg.batch_sort)[:count]
    return cfg, [collate([trainer.train[i] for i in idx]) for idx in plan], trainer.tokenizer.vocab_size


def run_parser(doc: str, *, run_help: str, batches: int, required: bool = True) -> argparse.ArgumentParser:
    """The arguments every benchmark on a training run's batches takes: ``--run`` (``None``
    when not ``required`` and not given), ``--batches``, ``--threads``, ``--cache-dir`` (add
    your own, then call :func:`load_run`)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--run", required=required, help=run_help)
    ap.add_argument("--batches", type=int, default=batches, help="how many of the run's first batches")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    return ap


def page_or_args(
    doc: str,
    name: str,
    write_page: Callable[[dict], None],
    *,
    run_help: str,
    batches: int,
    parser: Callable[[argparse.ArgumentParser], None] | None = None,
):
    """Parse a benchmark's :func:`run_parser` arguments (``--run`` optional) plus ``--page``;
    with ``--page``, rewrite the page from ``bench/results/NAME.json`` and return ``None``.
    Otherwise set the thread count and return ``(parser, args)``. ``parser`` may add the
    benchmark's own arguments."""
    ap = run_parser(doc, run_help=run_help, batches=batches, required=False)
    ap.add_argument("--page", action="store_true", help="only rewrite the page from the stored results")
    if parser is not None:
        parser(ap)
    args = ap.parse_args()
    if args.page:
        write_page(json.loads((RESULTS / f"{name}.json").read_text()))
        return None
    torch.set_num_threads(args.threads)
    return ap, args


def load_run(ap: argparse.ArgumentParser, args):
    """Check ``--batches``, set the thread count and return :func:`run_batches`' triple."""
    if args.batches < 1:
        ap.error(f"--batches: expected a positive count, got {args.batches}")
    torch.set_num_threads(args.threads)
    return run_batches(args.run, args.batches, args.cache_dir)


def train_steps(model: torch.nn.Module, cfg, batches: list) -> Callable[[], float]:
    """A callable that trains ``model`` one step (AdamW, the run's settings) on the next of
    ``batches`` in turn, for :func:`alternate`."""
    from attnkit.apps.train import make_optimizer, train_step

    opt = make_optimizer(model, cfg)
    state = {"i": 0}

    def step() -> float:
        state["i"] += 1
        return train_step(model, opt, batches[state["i"] % len(batches)], cfg, 1000)

    return step


def peak_memory(script: Path, probe: dict, timeout: float = 900) -> dict:
    """Run ``script --probe JSON`` in a fresh interpreter; it prints ``{"extra_mib": ...}``."""
    cmd = [sys.executable, str(script), "--probe", json.dumps(probe)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    if res.returncode != 0:
        why = (
            "killed (out of memory?)"
            if res.returncode < 0
            else (res.stderr.strip().splitlines() or ["?"])[-1]
        )
        return {"status": f"failed: {why}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


class MaxRss:
    """``with MaxRss() as m: ...`` then ``m.extra_mib``: peak resident memory above the start.

    Resets Linux's high-water mark (``echo 5 > /proc/self/clear_refs``) so that peaks from
    imports and set-up do not hide the measured call's; falls back to ``ru_maxrss`` growth.
    First hands the heap's free pages back to the system (glibc's ``malloc_trim``): memory that
    earlier work freed (a loader's temporary copies, an earlier call's activations) would
    otherwise be reused without raising the resident size, and the call would look free.
    """

    def __enter__(self):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to trim
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.before, self.hwm = _status_kib("VmRSS"), True
        except OSError:
            self.before, self.hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
        return self

    def __exit__(self, *exc):
        after = _status_kib("VmHWM") if self.hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.extra_mib = max(0, after - self.before) / 1024  # KiB -> MiB
        return False


class AllocatorPeak:
    """``with AllocatorPeak() as m: ...`` then ``m.extra_mib``: the peak of live tensor bytes
    that torch's CPU allocator held during the block, above its start (what
    ``torch.cuda.max_memory_allocated`` reports on a GPU), from the profiler's allocation
    events. Unlike resident memory it leaves out the C allocator's fragmentation and code
    paged in, and it slows the block down (do not time it)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        events = []

        def walk(node) -> None:
            if node.tag == torch._C._profiler._EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            for child in node.children:
                walk(child)

        for root in self._prof.profiler.kineto_results.experimental_event_tree():
            walk(root)
        live = peak = 0
        for _, size in sorted(events):
            live += size
            peak = max(peak, live)
        self.extra_mib = peak / 2**20
        return False


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def env_line(env: dict) -> str:
    isa = "AVX-512" if env["avx512"] else "no AVX-512"
    isa += " + BF16" if env["avx512_bf16"] else ""
    isa += " + AMX" if env["amx"] else ", no AMX"
    return (
        f"{env['cpu']} ({isa}), {env['threads']} threads, torch {env['torch']}, "
        f"attnkit {env['attnkit_commit']}, {env['date'][:10]}"
    )


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"
