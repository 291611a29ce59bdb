"""Which layout balances context-parallel work: contiguous, zig-zag or ``BalancedLayout``.

    python bench/cp_layouts.py            # about 3 minutes on 2 cores

1. **Work per rank** (no timing): the allowed (query, key) pairs each rank's queries have,
   counted exactly from the cropped patterns, for causal attention, a 256-token window,
   packed documents of uneven lengths (one of half the sequence, five of a tenth), and a
   BigBird-like union, at N = 16384 and P = 2, 4, 8. Reported as the busiest rank's work over
   the mean (1.00 is perfect balance; the step takes as long as the busiest rank).
2. **Time**: one attention training step (forward + backward, ring, B=1, H=4, D=64, float32,
   one thread per rank) of the packed documents at N = 16384 on P = 2 ranks, for each layout,
   in 3 rounds in a shuffled order; median of the slowest rank's step.

Writes ``bench/results/cp_layouts.json`` and ``docs/bench/cp-layouts.md``.
"""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, env_line, environment, save
from attnkit import patterns as P
from attnkit.distributed import BalancedLayout, context_parallel_attention, shard_ranges, shard_sequence
from distributed import run, slowest_median

N = 16384


def patterns(n: int) -> dict[str, P.Pattern]:
    tenth = n // 10
    return {
        "causal": P.Causal(),
        "window 256": P.SlidingWindow(256),
        "documents": P.Document((n - 5 * tenth, *([tenth] * 5))) & P.Causal(),
        "bigbird": P.SlidingWindow(192, 192) | P.Global(tuple(range(64))) | P.Random(2, 64, seed=0),
    }


def layout_of(name: str, pattern: P.Pattern):
    return BalancedLayout(pattern) if name == "balanced" else name


def work(pattern: P.Pattern, ranges, n: int) -> list[int]:
    """Allowed pairs of each rank's query rows (exact, from the cropped patterns)."""
    return [
        sum(P.crop(pattern, n, n, (a, b), (0, n)).num_allowed(b - a, n) for a, b in runs) for runs in ranges
    ]


def _step(rank: int, world: int, layout_name: str, steps: int) -> list[float]:
    import time

    import torch.distributed as dist

    pattern = patterns(N)["documents"]
    layout = layout_of(layout_name, pattern)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, 4, N, 64, generator=g) for _ in range(4)]
    q, k, v, dout = (shard_sequence(t, layout=layout).clone() for t in full)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    times = []
    for i in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        out = context_parallel_attention(q, k, v, pattern=pattern, layout=layout, method="ring")
        out.backward(dout)
        q.grad = k.grad = v.grad = None
        if i:  # the first step builds the plans
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    env = environment()
    balance = []
    for name, pattern in patterns(N).items():
        for world in (2, 4, 8):
            for layout_name in ("contiguous", "zigzag", "balanced"):
                ranges = shard_ranges(N, world, layout_of(layout_name, pattern))
                w = work(pattern, ranges, N)
                balance.append({
                    "pattern": name, "P": world, "layout": layout_name, "work": w,
                    "busiest_over_mean": max(w) / (sum(w) / world),
                    "tokens": [sum(b - a for a, b in runs) for runs in ranges],
                })  # fmt: skip
    print("work counted", flush=True)
    env["threads"] = 1  # per rank
    timings: dict[str, list[float]] = {}
    rng = random.Random(0)
    for _ in range(3):
        order = ["contiguous", "zigzag", "balanced"]
        rng.shuffle(order)
        for layout_name in order:
            per_rank = run(_step, 2, layout_name, 3)
            timings.setdefault(layout_name, []).append(slowest_median(per_rank))
    steps = {k: {"median_s": statistics.median(v), "rounds_s": v} for k, v in timings.items()}
    payload = {"environment": env, "N": N, "balance": balance, "steps": steps}
    save("cp_layouts", payload)
    write_page(payload)


def write_page(payload: dict) -> None:
    env = payload["environment"]
    lines = [
        "# Context-parallel layouts: who gets the work",
        "",
        f"`python bench/cp_layouts.py` on {env_line(env)} (one thread per rank, gloo).",
        "",
        f"## Busiest rank's work over the mean, N = {payload['N']}",
        "",
        "Work: allowed (query, key) pairs of a rank's queries, counted exactly. 1.00 = perfect",
        "balance; a ring step lasts as long as its busiest rank. *documents*: one document of",
        "half the sequence then five of a tenth, causal within each.",
        "",
        "| pattern | P | contiguous | zigzag | BalancedLayout | BalancedLayout picked |",
        "|---|---|---|---|---|---|",
    ]
    rows: dict[tuple, dict] = {}
    for b in payload["balance"]:
        rows.setdefault((b["pattern"], b["P"]), {})[b["layout"]] = b
    for (name, world), by in rows.items():
        picked = by["balanced"]["tokens"]
        same = [
            k
            for k in ("contiguous", "zigzag")
            if by[k]["tokens"] == picked and by[k]["work"] == by["balanced"]["work"]
        ]
        what = same[0] if same else f"cut runs of {', '.join(map(str, picked))} tokens"
        lines.append(
            f"| {name} | {world} | {by['contiguous']['busiest_over_mean']:.2f} | "
            f"{by['zigzag']['busiest_over_mean']:.2f} | {by['balanced']['busiest_over_mean']:.2f} | {what} |"
        )
    lines += [
        "",
        "## One step of the packed documents on 2 ranks (ring, forward + backward)",
        "",
        "B=1, H=4, D=64, float32; median over 3 rounds of the slowest rank's step.",
        "",
        "| layout | step | vs contiguous |",
        "|---|---|---|",
    ]
    base = payload["steps"]["contiguous"]["median_s"]
    for name in ("contiguous", "zigzag", "balanced"):
        s = payload["steps"][name]["median_s"]
        lines.append(f"| {name} | {s * 1e3:,.0f} ms | {s / base:.2f}x |")
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "cp-layouts.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
