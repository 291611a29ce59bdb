"""Sparse attention: attnkit ``blocksparse`` against dense SDPA, masked SDPA, FlexAttention and ``tiled``.

    python bench/sparse.py                                  # the full run (about an hour, 2 cores)
    python bench/sparse.py --n 2048 4096 --dtypes float32   # a quick look

Patterns (B=1, H=8, D=64, N = S): ``SlidingWindow(256, 256)``, ``SlidingWindow(512) & Causal()``,
BigBird ``SlidingWindow(192, 192) | Global(range(64)) | Random(3, 64, seed=0)`` and
``Strided(128) & Causal()``. Methods, timed alternately in one process per configuration:

* ``blocksparse`` and ``tiled``: attnkit, forced by name (``tiled``, a baseline, for
  N <= ``--tiled-max``: on ``Strided`` it visits every strided tile, ~17 s per forward at 32k);
* ``sdpa``: torch SDPA without any mask (the dense work the pattern avoids; pattern-free, so
  timed once per N and dtype), and ``sdpa_mask``: torch SDPA with the pattern as a boolean
  mask. Both for N <= ``--dense-max`` (each dense call at 64k takes minutes);
* ``flex``: ``torch.compile(flex_attention)`` with FlexAttention's own ``create_block_mask``
  (compiled) on mask_mods written as FlexAttention users write them; forward only (on CPU its
  backward raises, recorded as such). Its block-mask build and first-call (compile) times are
  reported apart, measured cold (inductor's caches disabled).

FLOP model: useful = ``4 * B * H * D * allowed_pairs`` forward, x3.5 forward + backward. Memory:
resident-memory peak above the level before one call, in a fresh subprocess (``_common``).
Writes ``bench/results/sparse.json``, ``docs/bench/sparse.md`` and ``docs/bench/sparse.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DOCS,
    RESULTS,
    MaxRss,
    alternate,
    calibration,
    calibration_line,
    env_line,
    environment,
    fmt_time,
    peak_memory,
    save,
)
from attnkit import attention
from attnkit import patterns as P

B, H, D = 1, 8, 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PATTERNS = {
    "window": P.SlidingWindow(256, 256),
    "causal-window": P.SlidingWindow(512) & P.Causal(),
    "bigbird": P.SlidingWindow(192, 192) | P.Global(range(64)) | P.Random(3, 64, seed=0),
    "strided": P.Strided(128) & P.Causal(),
}
METHODS = ("blocksparse", "tiled", "sdpa", "sdpa_mask", "flex")


def flex_mask_mod(name: str, n: int):
    """The mask_mod a FlexAttention user writes for each benchmark pattern."""
    if name == "window":
        return lambda b, h, q, kv: (q - kv <= 256) & (kv - q <= 256)
    if name == "causal-window":
        return lambda b, h, q, kv: (q >= kv) & (q - kv <= 512)
    if name == "strided":
        return lambda b, h, q, kv: (q >= kv) & (((q - kv) < 128) | ((q - kv) % 128 == 0))
    _, table = PATTERNS["bigbird"].parts[-1].cells(n, n)  # the same random blocks as attnkit

    def bigbird(b, h, q, kv):
        window = (q - kv <= 192) & (kv - q <= 192)
        return window | (q < 64) | (kv < 64) | table[q // 64, kv // 64]

    return bigbird


def inputs(n: int, dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, n, D, generator=g).to(dtype) for _ in range(4))
    return [t.requires_grad_(grad) for t in (q, k, v)] + [dout]


def make_call(method: str, name: str, n: int, q, k, v, mask=None, block_mask=None, flex=None):
    if method in ("blocksparse", "tiled"):
        return partial(attention, q, k, v, pattern=PATTERNS[name], backend=method)
    if method == "sdpa":
        return partial(F.scaled_dot_product_attention, q, k, v)
    if method == "sdpa_mask":
        return partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)
    return partial(flex, q, k, v, block_mask=block_mask)


def timed(call, mode: str, tensors):
    q, k, v, dout = tensors

    def run():
        if mode == "fwd":
            with torch.no_grad():
                call()
        else:
            call().backward(dout)
            q.grad = k.grad = v.grad = None

    return run


def probe(spec: dict) -> None:
    """Subprocess entry: one call of one method, print its peak memory."""
    torch.set_num_threads(spec["threads"])
    n, name, mode = spec["n"], spec["pattern"], spec["mode"]
    tensors = inputs(n, DTYPES[spec["dtype"]], mode == "fwdbwd")
    mask = PATTERNS[name].to_dense(n, n) if spec["method"] == "sdpa_mask" else None
    run = timed(make_call(spec["method"], name, n, *tensors[:3], mask=mask), mode, tensors)
    with MaxRss() as m:
        run()
    print(json.dumps({"extra_mib": m.extra_mib}))


def flex_setup(name: str, n: int, dtype: torch.dtype, tensors):
    """Build FlexAttention's block mask (compiled) and compile the kernel; return timings."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh, cold compile per configuration: past Dynamo's recompile limit FlexAttention silently
    # falls back to its unfused (N x N) path, and inductor's on-disk cache would hide compile time.
    torch._dynamo.reset()
    torch._inductor.config.force_disable_caches = True
    t0 = time.perf_counter()
    bm = create_block_mask(flex_mask_mod(name, n), None, None, n, n, device="cpu", _compile=True)
    build = time.perf_counter() - t0
    flex = torch.compile(flex_attention)
    q, k, v, _ = tensors
    t0 = time.perf_counter()
    with torch.no_grad():
        flex(q.detach(), k.detach(), v.detach(), block_mask=bm)
    first = time.perf_counter() - t0
    return flex, bm, {"block_mask_s": build, "first_call_s": first}


def flex_backward(bm, tensors) -> str:
    """What FlexAttention does when asked for gradients on this device (run after timing: a failed
    compile makes Dynamo fall back to the unfused path for later calls)."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, _ = tensors
    try:
        torch.compile(flex_attention)(
            q.detach().requires_grad_(), k.detach(), v.detach(), block_mask=bm
        ).sum().backward()
        return "ok"
    except Exception as e:  # record what FlexAttention says
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--dense-max", type=int, default=16384, help="largest N for sdpa and sdpa_mask")
    ap.add_argument(
        "--tiled-max", type=int, default=16384, help="largest N for tiled (a baseline; slow on strided)"
    )
    ap.add_argument("--resume", action="store_true", help="keep the configurations already in the JSON")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--memory", nargs="*", default=["float32"], help="dtypes that get memory probes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--name", default="sparse")
    ap.add_argument("--render", action="store_true", help="only rewrite the docs from the JSON")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(json.loads(args.probe))
        return
    if args.render:
        payload = json.loads((RESULTS / f"{args.name}.json").read_text())
        write_docs(payload, args.name)
        return
    warnings.filterwarnings("ignore")
    env = environment()
    cal = calibration(args.dtypes)
    rows, flex_info = [], []
    if args.resume and (RESULTS / f"{args.name}.json").exists():
        done = json.loads((RESULTS / f"{args.name}.json").read_text())
        rows, flex_info = done["results"], done.get("flex", [])
    finished = {(r["dtype"], r["n"], r["pattern"], r["mode"]) for r in rows}
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for n in args.n:
            for name in args.patterns:
                pattern = PATTERNS[name]
                allowed = pattern.num_allowed(n)
                base = inputs(n, dtype, False)
                if all((dtype_name, n, name, mode) in finished for mode in args.modes):
                    continue
                flex = bm = None
                if not args.no_flex:
                    flex, bm, info = flex_setup(name, n, dtype, base)
                    flex_info.append({"n": n, "dtype": dtype_name, "pattern": name, **info})
                    built, first = info["block_mask_s"], info["first_call_s"]
                    print(
                        f"  flex {name} N={n}: block mask {built:.1f} s, first call {first:.1f} s", flush=True
                    )
                mask = pattern.to_dense(n, n) if n <= args.dense_max else None
                for mode in args.modes:
                    tensors = inputs(n, dtype, mode == "fwdbwd")
                    if (dtype_name, n, name, mode) in finished:
                        continue
                    methods = ["blocksparse"] + (["tiled"] if n <= args.tiled_max else [])
                    if n <= args.dense_max:
                        methods += ["sdpa", "sdpa_mask"]
                    if mode == "fwd" and flex is not None:
                        methods.append("flex")
                    fns = {
                        m: timed(
                            make_call(m, name, n, *tensors[:3], mask=mask, block_mask=bm, flex=flex),
                            mode,
                            tensors,
                        )
                        for m in methods
                    }
                    timing = alternate(fns, rounds=args.rounds, budget_s=3.0)
                    flops = 4 * B * H * D * allowed * (3.5 if mode == "fwdbwd" else 1.0)
                    for m in methods:
                        row = {"n": n, "dtype": dtype_name, "pattern": name, "mode": mode, "method": m,
                               "allowed_pairs": allowed, **timing[m],
                               "useful_gflops": flops / timing[m]["median_s"] / 1e9}  # fmt: skip
                        if dtype_name in args.memory and m != "flex":
                            spec = {"n": n, "dtype": dtype_name, "pattern": name, "mode": mode, "method": m,
                                    "threads": env["threads"]}  # fmt: skip
                            row |= peak_memory(Path(__file__), spec)
                        rows.append(row)
                    line = "  ".join(f"{m}={fmt_time(timing[m]['median_s'])}" for m in methods)
                    print(f"{dtype_name:8} N={n:6} {name:14} {mode:6} {line}", flush=True)
                if flex is not None:
                    flex_info[-1]["backward"] = flex_backward(bm, base)
                # checkpoint after every configuration: a long run loses nothing if stopped
                save(args.name, {"benchmark": "sparse", "env": env, "calibration": cal, "results": rows,
                                 "flex": flex_info})  # fmt: skip
    payload = {
        "benchmark": "sparse",
        "env": env,
        "calibration": cal,
        "shape": {"B": B, "H": H, "D": D},
        "patterns": {k: repr(v) for k, v in PATTERNS.items()},
        "flop_model": "useful: 4*B*H*D*allowed_pairs forward; x3.5 forward+backward",
        "memory_model": "peak resident memory above the level before one call, fresh subprocess, MiB",
        "dense_max": args.dense_max,
        "tiled_max": args.tiled_max,
        "results": rows,
        "flex": flex_info,
    }
    save(args.name, payload)
    write_docs(payload, args.name)


def _dense_gflops(row: dict, n: int, mode: str) -> float:
    """GFLOP/s of dense SDPA (no mask) on ``n``: the machine's practical attention rate."""
    return 4 * B * H * D * n * n * (3.5 if mode == "fwdbwd" else 1.0) / row["median_s"] / 1e9


def write_docs(payload: dict, name: str) -> None:
    rows = payload["results"]
    by = {(r["dtype"], r["n"], r["pattern"], r["mode"], r["method"]): r for r in rows}
    patterns = "; ".join(f"{k} = `{v}`" for k, v in payload.get("patterns", {}).items())
    lines = [
        "# Sparse attention benchmark",
        "",
        f"Generated by `python bench/sparse.py` from `bench/results/{name}.json`; do not edit by hand.",
        "",
        f"Machine: {env_line(payload['env'])}. B={B}, H={H}, D={D}, N = S.",
        f"Patterns: {patterns}.",
        f"FLOP model: {payload.get('flop_model', '')}. Memory: {payload.get('memory_model', '')}.",
        *([calibration_line(payload["calibration"])] if "calibration" in payload else []),
        "*eff* = useful GFLOP/s of `blocksparse` / GFLOP/s of dense SDPA (no mask) in the same run. "
        f"Dense and masked SDPA run for N <= {payload.get('dense_max', 16384)} only "
        f"(one dense call at 64k takes minutes), `tiled` for N <= {payload.get('tiled_max', 16384)}.",
        "",
        *_summary(by, rows),
    ]
    header = (
        "| pattern | N | blocksparse | useful GFLOP/s | eff | tiled | sdpa (dense) | sdpa + mask | flex "
        "| blocksparse MiB | tiled MiB | sdpa + mask MiB |"
    )
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            what = "forward" if mode == "fwd" else "forward + backward"
            lines += ["", f"## {dtype}, {what}", "", header, "|---" * 12 + "|"]
            for pattern in dict.fromkeys(r["pattern"] for r in rows):
                for n in sorted({r["n"] for r in rows}):
                    get = {m: by.get((dtype, n, pattern, mode, m)) for m in METHODS}
                    bs = get["blocksparse"]
                    if bs is None:
                        continue
                    eff = (
                        f"{bs['useful_gflops'] / _dense_gflops(get['sdpa'], n, mode):.2f}"
                        if get["sdpa"]
                        else "—"
                    )
                    times = [
                        fmt_time(get[m]["median_s"]) if get[m] else "—"
                        for m in ("tiled", "sdpa", "sdpa_mask", "flex")
                    ]
                    mem = [
                        f"{get[m]['extra_mib']:.0f}" if get[m] and "extra_mib" in get[m] else "—"
                        for m in ("blocksparse", "tiled", "sdpa_mask")
                    ]
                    cells = [
                        pattern,
                        str(n),
                        fmt_time(bs["median_s"]),
                        f"{bs['useful_gflops']:.0f}",
                        eff,
                        *times,
                        *mem,
                    ]
                    lines.append("| " + " | ".join(cells) + " |")
    if payload.get("flex"):
        lines += [
            "",
            "## FlexAttention set-up (compiled, CPU)",
            "",
            "| dtype | N | pattern | create_block_mask | first call (compile) | backward |",
            "|---|---|---|---|---|---|",
        ]
        for f in payload["flex"]:
            lines.append(
                f"| {f['dtype']} | {f['n']} | {f['pattern']} | {f['block_mask_s']:.1f} s | "
                f"{f['first_call_s']:.1f} s | {f['backward']} |"
            )
    (DOCS / f"{name}.md").write_text("\n".join(lines) + "\n")
    _plot(rows, DOCS / f"{name}.png")


def _summary(by: dict, rows: list) -> list[str]:
    out = ["## Summary", ""]
    sizes = sorted({r["n"] for r in rows})
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            for pattern in dict.fromkeys(r["pattern"] for r in rows):
                cell = {(n, m): by.get((dtype, n, pattern, mode, m)) for n in sizes for m in METHODS}
                get = cell.get
                parts = []
                if get((16384, "blocksparse")) and get((16384, "sdpa")):
                    eff = get((16384, "blocksparse"))["useful_gflops"] / _dense_gflops(
                        get((16384, "sdpa")), 16384, mode
                    )
                    parts.append(f"eff at 16k {eff:.2f}")
                lo, hi = get((16384, "blocksparse")), get((65536, "blocksparse"))
                if lo and hi:
                    parts.append(f"time(64k)/time(16k) {hi['median_s'] / lo['median_s']:.2f}")
                    if "extra_mib" in lo and "extra_mib" in hi:
                        parts.append(f"memory 16k→64k {lo['extra_mib']:.0f}→{hi['extra_mib']:.0f} MiB")
                ratios = [
                    get((n, "flex"))["median_s"] / get((n, "blocksparse"))["median_s"]
                    for n in sizes
                    if get((n, "flex"))
                ]
                if ratios:
                    parts.append(f"speed vs compiled flex {min(ratios):.2f}–{max(ratios):.2f}x")
                if parts:
                    out.append(f"- {dtype} {mode} {pattern}: " + ", ".join(parts) + ".")
    return out


def _plot(rows: list, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install 'attnkit[viz]')")
        return
    fwd = [r for r in rows if r["dtype"] == "float32" and r["mode"] == "fwd"]
    patterns = list(dict.fromkeys(r["pattern"] for r in fwd))
    if not patterns:
        return
    fig, axes = plt.subplots(1, len(patterns), figsize=(4.2 * len(patterns), 3.8), squeeze=False)
    for ax, pattern in zip(axes[0], patterns, strict=True):
        for method in METHODS:
            pts = sorted(
                (r["n"], r["median_s"]) for r in fwd if r["pattern"] == pattern and r["method"] == method
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(pattern)
        ax.set_xlabel("N")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("forward time (s), float32")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
