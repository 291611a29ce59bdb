"""Dense and causal attention: attnkit ``auto`` and ``tiled`` against torch SDPA and naive eager.

    python bench/dense.py                 # full run (about half an hour on 2 cores)
    python bench/dense.py --n 512 1024 --dtypes float32 --rounds 3   # a quick look

FLOP model (written into the results): forward ``4 * B * H * D * P`` with ``P`` the allowed
(query, key) pairs -- ``N * S`` dense, ``N * (N + 1) / 2`` causal; forward + backward is 3.5x
the forward (the backward does about 2.5x the forward's matmul work). GFLOP/s = FLOPs / median
time. Peak memory: how far resident memory rose during one call in a fresh subprocess
(inputs excluded; see ``_common.MaxRss``). Writes ``bench/results/dense.json`` and ``docs/bench/dense.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, RESULTS, MaxRss, alternate, env_line, environment, fmt_time, peak_memory, save
from attnkit import attention
from attnkit import patterns as P

B, H, D = 1, 8, 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = ("auto", "sdpa", "tiled", "naive")
NAIVE_LIMIT_BYTES = 10 * 2**30  # skip naive eager where its N x N tensors would exceed this


def attend(method: str, q, k, v, causal: bool):
    """One attention call by ``method``: attnkit auto/tiled, torch SDPA, or naive eager."""
    if method == "auto":
        return attention(q, k, v, pattern=P.Causal() if causal else None)
    if method == "tiled":
        return attention(q, k, v, pattern=P.Causal() if causal else None, backend="tiled")
    if method == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # naive eager, (B, H, N, S)
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


def naive_bytes(n: int, dtype: torch.dtype, mode: str) -> int:
    per = B * H * n * n * torch.finfo(dtype).bits // 8
    return per * (3 if mode == "fwd" else 6)


def make_inputs(n: int, dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(3))
    return q, k, v, torch.randn(B, H, n, D, generator=g).to(dtype)


def step(method: str, mode: str, q, k, v, dout, causal: bool):
    def run():
        if mode == "fwd":
            with torch.no_grad():
                attend(method, q, k, v, causal)
        else:
            out = attend(method, q, k, v, causal)
            out.backward(dout)
            q.grad = k.grad = v.grad = None

    return run


def flops(n: int, causal: bool, mode: str) -> float:
    pairs = n * (n + 1) // 2 if causal else n * n
    return 4 * B * H * D * pairs * (3.5 if mode == "fwdbwd" else 1.0)


def probe(spec: dict) -> None:
    """Subprocess entry: one call, print its peak-memory growth."""
    torch.set_num_threads(spec["threads"])
    q, k, v, dout = make_inputs(spec["n"], DTYPES[spec["dtype"]], spec["mode"] == "fwdbwd")
    run = step(spec["method"], spec["mode"], q, k, v, dout, spec["mask"] == "causal")
    with MaxRss() as m:
        run()
    print(json.dumps({"extra_mib": m.extra_mib}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--masks", nargs="+", default=["none", "causal"], choices=["none", "causal"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--name", default="dense", help="results file name (bench/results/NAME.json)")
    ap.add_argument("--render", action="store_true", help="only rewrite docs/bench/NAME.md from the JSON")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(json.loads(args.probe))
        return
    if args.render:
        payload = json.loads((RESULTS / f"{args.name}.json").read_text())
        write_markdown(payload, DOCS / f"{args.name}.md")
        return
    torch.set_num_threads(torch.get_num_threads())
    env = environment()
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for mode in args.modes:
            for mask in args.masks:
                for n in args.n:
                    q, k, v, dout = make_inputs(n, dtype, mode == "fwdbwd")
                    methods = [
                        m for m in METHODS if m != "naive" or naive_bytes(n, dtype, mode) <= NAIVE_LIMIT_BYTES
                    ]
                    fns = {m: step(m, mode, q, k, v, dout, mask == "causal") for m in methods}
                    timing = alternate(fns, rounds=args.rounds)
                    for m in METHODS:
                        row = {"n": n, "dtype": dtype_name, "mode": mode, "mask": mask, "method": m}
                        if m not in timing:
                            need = naive_bytes(n, dtype, mode) / 2**30
                            row["status"] = f"skipped: naive eager would need {need:.1f} GiB"
                        else:
                            row |= timing[m]
                            row["gflops"] = flops(n, mask == "causal", mode) / timing[m]["median_s"] / 1e9
                            row["status"] = "ok"
                            if not args.no_memory:
                                spec = {
                                    "n": n,
                                    "dtype": dtype_name,
                                    "mode": mode,
                                    "mask": mask,
                                    "method": m,
                                    "threads": env["threads"],
                                }
                                row |= peak_memory(Path(__file__), spec)
                        rows.append(row)
                    sdpa = timing["sdpa"]["median_s"]
                    print(
                        f"{dtype_name:8} {mode:6} {mask:6} N={n:6} "
                        + "  ".join(
                            f"{m}={fmt_time(timing[m]['median_s'])} ({sdpa / timing[m]['median_s']:.2f}x)"
                            for m in timing
                        ),
                        flush=True,
                    )
    payload = {
        "benchmark": "dense",
        "env": env,
        "shape": {"B": B, "H": H, "D": D},
        "flop_model": "fwd: 4*B*H*D*pairs (pairs = N*N dense, N*(N+1)/2 causal); fwd+bwd: 3.5x fwd",
        "memory_model": (
            "peak resident memory above the level before one call, in a fresh subprocess "
            "(inputs excluded), MiB"
        ),
        "results": rows,
    }
    path = save(args.name, payload)
    write_markdown(payload, DOCS / f"{args.name}.md")
    print(f"wrote {path}")


def speed_ratio(by: dict, method: str) -> str:
    """time(sdpa) / time(method) at one N, as text."""
    if by[method]["status"] != "ok":
        return "—"
    return f"{by['sdpa']['median_s'] / by[method]['median_s']:.3f}"


def summary(rows: list[dict]) -> list[str]:
    """The headline numbers, computed from the rows."""
    by = {(r["dtype"], r["mode"], r["mask"], r["n"], r["method"]): r for r in rows}
    auto = sorted(
        (by[(*key[:4], "sdpa")]["median_s"] / r["median_s"], key)
        for key, r in by.items()
        if key[4] == "auto" and r["status"] == "ok"
    )
    lines = [
        "## Summary",
        "",
        f"- `auto` / torch SDPA speed over {len(auto)} configurations: worst {auto[0][0]:.3f} "
        f"({' '.join(map(str, auto[0][1][:4]))}), median {auto[len(auto) // 2][0]:.3f}.",
    ]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            ratios = [
                by[(dtype, mode, mask, n, "sdpa")]["median_s"] / r["median_s"]
                for (d, mo, mask, n, m), r in by.items()
                if (d, mo, m) == (dtype, mode, "tiled") and r["status"] == "ok"
            ]
            if ratios:
                lines.append(
                    f"- `tiled` / torch SDPA speed, {dtype} {mode}: {min(ratios):.2f}–{max(ratios):.2f}."
                )
    n_max = max(r["n"] for r in rows)
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            t, s = by.get((dtype, mode, "none", n_max, "tiled")), by.get((dtype, mode, "none", n_max, "sdpa"))
            if t and s and "extra_mib" in t and "extra_mib" in s:
                lines.append(
                    f"- Peak memory at N={n_max}, {dtype} {mode}, no mask: `tiled` {t['extra_mib']:.0f} MiB, "
                    f"torch SDPA {s['extra_mib']:.0f} MiB."
                )
    return lines


def write_markdown(payload: dict, path: Path) -> None:
    rows = payload["results"]
    out = [
        "# Dense attention benchmark",
        "",
        f"Generated by `python bench/dense.py` from `bench/results/{path.stem}.json`; do not edit by hand.",
        "",
        f"Machine: {env_line(payload['env'])}. Shape: B={B}, H={H}, D={D}, N = S.",
        f"FLOP model: {payload['flop_model']}. Memory: {payload['memory_model']}.",
        "Ratios are speeds relative to torch SDPA in the same run (time_sdpa / time); above 1 is faster.",
        "",
        *summary(rows),
        "",
    ]
    key = lambda r: (r["dtype"], r["mode"], r["mask"])  # noqa: E731
    for group in dict.fromkeys(key(r) for r in rows):
        dtype, mode, mask = group
        what = "forward" if mode == "fwd" else "forward + backward"
        out += [
            f"## {dtype}, {what}, {'causal' if mask == 'causal' else 'no mask'}",
            "",
            "| N | "
            + " | ".join(f"{m} time (GFLOP/s)" for m in METHODS)
            + " | auto / sdpa | tiled / sdpa | "
            + " | ".join(f"{m} peak MiB" for m in METHODS)
            + " |",
            "|" + "---|" * (1 + 2 * len(METHODS) + 2),
        ]
        for n in sorted({r["n"] for r in rows if key(r) == group}):
            by = {r["method"]: r for r in rows if key(r) == group and r["n"] == n}
            cells, mem = [], []
            for m in METHODS:
                r = by[m]
                cells.append(
                    f"{fmt_time(r['median_s'])} ({r['gflops']:.0f})" if r["status"] == "ok" else "skipped"
                )
                mem.append(f"{r['extra_mib']:.0f}" if "extra_mib" in r else "—")
            ratios = [speed_ratio(by, m) for m in ("auto", "tiled")]
            out.append(f"| {n} | " + " | ".join([*cells, *ratios, *mem]) + " |")
        out.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


if __name__ == "__main__":
    main()
