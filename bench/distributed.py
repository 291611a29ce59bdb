"""Context parallelism on this machine: bytes sent, memory per rank, time per step.

    python bench/distributed.py            # about 15 minutes on 2 cores
    python bench/distributed.py --memory   # memory per rank only (causal 32k, window 131k)

1. **Traffic.** Every send of one ring ``context_parallel_attention`` call (forward, then
   backward) is counted per rank, for dense, causal (contiguous and zig-zag), a 256-token
   sliding window and packed documents, at P = 2 and 4 ranks and N = 4096 and 16384
   (B=1, H=2, D=32, float32; bytes scale with B * H * D). Each count is set against the bytes an
   independent formula predicts: to every other rank, a rank sends the keys/values of its shard
   that the rank's queries see (the span from the first to the last, per run, worked out here
   from the pattern's definition on position intervals, not from attnkit's block maps), again
   in the backward, and the gradient of what it received back to each owner; plus the 112-byte
   call description to every other rank.
2. **Memory and time.** One training step of the attention (forward + backward), B=1, H=4,
   D=64, float32, one thread per rank, at P = 1 (plain ``attention()``, with 1 and with 2
   threads), 2 and 4: peak resident memory growth per rank (first step, plan building
   included) and the median step time over the ranks' slowest, for a 256-token window at
   N = 8192, 32768 and 131072 and causal attention at N = 4096 and 8192 (zig-zag).
   Configurations run in 3 rounds in a shuffled order; the median of the rounds is reported.
   This machine has 2 cores: P = 4 oversubscribes them, so its times show the overhead, not a
   speed-up.

Writes ``bench/results/distributed.json`` and ``docs/bench/distributed.md``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, AllocatorPeak, MaxRss, env_line, environment, save
from attnkit import attention
from attnkit import patterns as P
from attnkit.distributed import context_parallel_attention, shard_ranges, shard_sequence

WINDOW = 256
#: the int64 call description (and auto's cached choice) every rank sends to every other
DESCRIPTION_BYTES = 14 * 8


def docs_for(n: int) -> tuple[int, ...]:
    """Four packed documents of uneven lengths: 10%, 40%, 15%, 35% of the sequence."""
    a, b, c = n // 10, 4 * n // 10, 15 * n // 100
    return (a, b, c, n - a - b - c)


def pattern_of(name: str, n: int) -> P.Pattern:
    return {
        "dense": P.Full(),
        "causal": P.Causal(),
        "window": P.SlidingWindow(WINDOW),
        "documents": P.Document(docs_for(n)) & P.Causal(),
    }[name]


# ------------------------------------------------------------------ the formula (no attnkit code)
def _seen(name: str, n: int, q: tuple[int, int], k: tuple[int, int]) -> tuple[int, int] | None:
    """The keys ``[lo, hi)`` of ``[k0, k1)`` that some query in ``[q0, q1)`` sees, by the
    pattern's definition (their span; None if none)."""
    (q0, q1), (k0, k1) = q, k
    if name == "dense":
        spans = [(k0, k1)]
    elif name == "causal":  # j <= i
        spans = [(k0, min(k1, q1))]
    elif name == "window":  # i - W <= j <= i
        spans = [(max(k0, q0 - WINDOW), min(k1, q1))]
    else:  # same document and j <= i
        spans, start = [], 0
        for length in docs_for(n):
            d0, d1 = start, start + length
            start = d1
            qa, qb = max(q0, d0), min(q1, d1)
            if qa < qb:
                spans.append((max(k0, d0), min(k1, d1, qb)))
    spans = [(a, b) for a, b in spans if a < b]
    return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None


def _tokens_needed(name: str, n: int, reader_q, owner_k) -> int:
    """Tokens of the owner's shard the reader's queries see: per key run, the span over the
    reader's query runs."""
    total = 0
    for k in owner_k:
        spans = [s for q in reader_q if (s := _seen(name, n, q, k)) is not None]
        if spans:
            total += max(b for _, b in spans) - min(a for a, _ in spans)
    return total


def predicted_bytes(name: str, n: int, world: int, layout: str, rank: int, per_token: int) -> dict:
    """Forward: the call description to every other rank, and to each rank the keys/values of
    this rank's shard that its queries see. Backward: the same again, plus the gradient of
    every key/value this rank received back to its owner."""
    ranges = shard_ranges(n, world, layout)
    others = [r for r in range(world) if r != rank]
    sent = sum(_tokens_needed(name, n, ranges[d], ranges[rank]) for d in others) * per_token
    grads = sum(_tokens_needed(name, n, ranges[rank], ranges[s]) for s in others) * per_token
    return {"forward": (world - 1) * DESCRIPTION_BYTES + sent, "backward": sent + grads}


# ------------------------------------------------------------------ ranks
def _traffic(rank: int, world: int, n: int, layouts: dict) -> dict:
    sent = {"bytes": 0}
    real = dist.batch_isend_irecv

    def counting(ops):  # every transfer of attnkit.distributed goes through one batch call
        for op in ops:
            if op.op is dist.isend:
                sent["bytes"] += op.tensor.numel() * op.tensor.element_size()
        return real(ops)

    dist.batch_isend_irecv = counting
    out = {}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g) for _ in range(3))
    for name, layout in layouts.items():
        local = [shard_sequence(t, layout=layout).clone().requires_grad_() for t in (q, k, v)]
        sent["bytes"] = 0
        o = context_parallel_attention(*local, pattern=pattern_of(name, n), layout=layout, method="ring")
        forward = sent["bytes"]
        sent["bytes"] = 0
        o.sum().backward()
        out[(name, layout)] = {"forward": forward, "backward": sent["bytes"]}
    dist.batch_isend_irecv = real
    return out


def _step(
    rank: int, world: int, name: str, n: int, layout: str, steps: int, with_allocator: bool = False
) -> dict:
    g = torch.Generator().manual_seed(0)
    pattern = pattern_of(name, n)
    full = [torch.randn(1, 4, n, 64, generator=g) for _ in range(4)]
    if world > 1:
        q, k, v, dout = (shard_sequence(t, layout=layout) for t in full)
    else:
        q, k, v, dout = full
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))

    def once() -> None:
        if world > 1:
            out = context_parallel_attention(q, k, v, pattern=pattern, layout=layout, method="ring")
        else:
            out = attention(q, k, v, pattern=pattern)
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    with MaxRss() as first:
        once()
    times, steady = [], []
    for _ in range(steps):
        if world > 1:
            dist.barrier()
        with MaxRss() as mem:
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        steady.append(mem.extra_mib)
    allocated = None
    if with_allocator:
        with AllocatorPeak() as alloc:
            once()
        allocated = alloc.extra_mib
    return {
        "memory_mib": first.extra_mib,
        "steady_mib": max(steady),
        "allocated_mib": allocated,
        "times": times,
    }


def _entry(fn, rank, world, init, results, args, threads):
    torch.set_num_threads(threads)
    os.environ.setdefault("ATTNKIT_TUNE", "off")
    try:
        if world > 1:
            dist.init_process_group(
                "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
            )
        results.put((rank, pickle.dumps(fn(rank, world, *args))))
    except BaseException as e:
        results.put((rank, pickle.dumps(RuntimeError(f"rank {rank}: {type(e).__name__}: {e}"))))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def slowest_median(per_rank: list[list[float]]) -> float:
    """Median over steps of the slowest rank's time: a step ends when its last rank does."""
    return statistics.median(max(step) for step in zip(*per_rank, strict=True))


def run(fn, world: int, *args, threads: int = 1) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world, init, results, args, threads))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        got = dict(results.get(timeout=1800) for _ in range(world))
        for p in procs:
            p.join()
    out = [pickle.loads(got[r]) for r in range(world)]
    for o in out:
        if isinstance(o, Exception):
            raise o
    return out


# ------------------------------------------------------------------ main
def main() -> None:
    env = environment()
    env["threads"] = 1  # per rank
    traffic = []
    layouts = {
        "dense": "contiguous",
        "causal": "contiguous",
        "window": "contiguous",
        "documents": "contiguous",
    }
    for world in (2, 4):
        for n in (4096, 16384):
            measured = run(_traffic, world, n, layouts)
            zig = run(_traffic, world, n, {"causal": "zigzag"})
            for rank in range(world):
                for (name, layout), got in {**measured[rank], **zig[rank]}.items():
                    want = predicted_bytes(name, n, world, layout, rank, per_token=2 * 2 * 32 * 4)
                    traffic.append({"P": world, "N": n, "pattern": name, "layout": layout, "rank": rank,
                                    "measured": got, "formula": want})  # fmt: skip
            print(f"traffic P={world} N={n} done", flush=True)

    configs = [("window", 8192, "contiguous"), ("window", 32768, "contiguous"),
               ("window", 131072, "contiguous"), ("causal", 4096, "zigzag"),
               ("causal", 8192, "zigzag")]  # fmt: skip
    variants = [(1, 1), (1, 2), (2, 1), (4, 1)]  # (ranks, threads per rank)
    runs: dict[tuple, list] = {}
    rng = random.Random(0)
    for round_ in range(3):
        order = [(c, v) for c in configs for v in variants]
        rng.shuffle(order)
        for (name, n, layout), (world, threads) in order:
            res = run(_step, world, name, n, layout, 3, threads=threads)
            runs.setdefault((name, n, layout, world, threads), []).append({
                "memory_mib": [r["memory_mib"] for r in res],
                "step_s": slowest_median([r["times"] for r in res]),
            })  # fmt: skip
        print(f"round {round_ + 1} done", flush=True)
    steps = []
    for (name, n, layout, world, threads), rounds in runs.items():
        steps.append({
            "pattern": name, "N": n, "layout": layout, "P": world, "threads": threads,
            "step_s": statistics.median(r["step_s"] for r in rounds),
            "step_s_rounds": [r["step_s"] for r in rounds],
            "memory_mib_per_rank": statistics.median(max(r["memory_mib"]) for r in rounds),
        })  # fmt: skip
    payload = {"environment": env, "traffic": traffic, "steps": steps}
    save("distributed", payload)
    write_page(payload)


def write_page(payload: dict) -> None:
    env = payload["environment"]
    lines = [
        "# Context parallelism on one machine",
        "",
        f"`python bench/distributed.py` on {env_line(env)} (one thread per rank, gloo).",
        "",
        "## Bytes sent per rank per attention call (ring, B=1, H=2, D=32, float32)",
        "",
        "Measured by counting every send; *formula*: to every other rank, the keys/values of",
        "the shard that its queries see (the span from the first to the last such key per run,",
        "from the pattern's definition), again in the backward, the gradient of what was received",
        "back to its owner, and the 112-byte call description to every other rank.",
        "",
        "| pattern | layout | P | N | forward KiB (busiest rank) | backward KiB | formula | equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for t in payload["traffic"]:
        groups.setdefault((t["pattern"], t["layout"], t["P"], t["N"]), []).append(t)
    for (name, layout, world, n), rows in sorted(groups.items()):
        fwd = max(r["measured"]["forward"] for r in rows) / 1024
        bwd = max(r["measured"]["backward"] for r in rows) / 1024
        ffwd = max(r["formula"]["forward"] for r in rows) / 1024
        fbwd = max(r["formula"]["backward"] for r in rows) / 1024
        equal = all(r["measured"] == r["formula"] for r in rows)
        lines.append(f"| {name} | {layout} | {world} | {n} | {fwd:,.1f} | {bwd:,.1f} | "
                     f"{ffwd:,.1f} / {fbwd:,.1f} | {'yes' if equal else '**no**'} |")  # fmt: skip
    lines += [
        "",
        "## One attention training step (forward + backward), B=1, H=4, D=64, float32",
        "",
        "Median over 3 rounds of the slowest rank's step; memory: median over the rounds of the",
        "largest peak resident growth of a rank's first step (plan building included). P = 1 is",
        "plain `attention()` on the whole sequence in one process, with one thread or with both",
        "cores. **This machine has 2 cores**: P = 2 uses both, P = 4 runs two ranks per core.",
        "",
        "| pattern | N | layout | P | step | vs P = 1 | memory per rank (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {(s["pattern"], s["N"]): s["step_s"] for s in payload["steps"] if (s["P"], s["threads"]) == (1, 1)}
    for s in sorted(payload["steps"], key=lambda s: (s["pattern"], s["N"], s["P"], s["threads"])):
        ratio = s["step_s"] / base[(s["pattern"], s["N"])]
        layout = s["layout"] if s["P"] > 1 else "—"
        who = f"{s['P']}" if s["threads"] == 1 else f"{s['P']} ({s['threads']} threads)"
        lines.append(f"| {s['pattern']} | {s['N']} | {layout} | {who} | {s['step_s'] * 1e3:,.0f} ms | "
                     f"{ratio:.2f}x | {s['memory_mib_per_rank']:,.0f} |")  # fmt: skip
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "distributed.md").write_text("\n".join(lines) + "\n")


def memory_main() -> None:
    """``--memory``: peak memory per rank of one forward + backward at P = 1, 2, 4 (each rank
    making its own shard) for causal attention at N = 32,768 (zig-zag) and a 256-token window
    at N = 131,072: the first step's and the next step's, with the next step's time;
    ``bench/results/distributed-memory.json``."""
    env = environment()
    env["threads"] = 1  # per rank
    rows = []
    for name, n, layout in (("causal", 32768, "zigzag"), ("window", 131072, "contiguous")):
        for world in (1, 2, 4):
            res = run(_step, world, name, n, layout, 1, True)
            rows.append({"pattern": name, "N": n, "layout": layout, "P": world,
                         "steady_mib_per_rank": max(r["steady_mib"] for r in res),
                         "allocated_mib_per_rank": max(r["allocated_mib"] for r in res),
                         "first_mib_per_rank": max(r["memory_mib"] for r in res),
                         "step_s": max(r["times"][0] for r in res)})  # fmt: skip
            print(rows[-1], flush=True)
    save("distributed-memory", {"environment": env, "rows": rows})
    lines = [
        "# Context-parallel memory per rank",
        "",
        f"`python bench/distributed.py --memory` on {env_line(env)} (one thread per rank, gloo), "
        "B=1, H=4, D=64, float32, each rank making its own shard. *Step*: peak resident memory "
        "that a forward + backward adds on the busiest rank, measured on the second step; *first "
        "step*: the same on the first, which also pays one-time costs that do not grow with N "
        "(about 150 MiB of library code paged in by the first attention call of a process, and "
        "the plans). Time: the second step's, slowest rank (P = 4 oversubscribes the 2 cores).",
        "",
        "*Allocated*: the peak of live tensor bytes in torch's allocator during a third step "
        "(profiler allocation events; what `torch.cuda.max_memory_allocated` reports on a GPU), "
        "which leaves out the C allocator's fragmentation.",
        "",
        "| pattern | N | P | step memory | of P = 1 | allocated | of P = 1 | first step | step time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(b for b in rows if b["pattern"] == r["pattern"] and b["P"] == 1)
        rss, alloc = r["steady_mib_per_rank"], r["allocated_mib_per_rank"]
        lines.append(f"| {r['pattern']} | {r['N']:,} | {r['P']} | {rss:.0f} MiB | "
                     f"{rss / base['steady_mib_per_rank']:.2f} | {alloc:.0f} MiB | "
                     f"{alloc / base['allocated_mib_per_rank']:.2f} | {r['first_mib_per_rank']:.0f} MiB | "
                     f"{r['step_s']:.2f} s |")  # fmt: skip
    (DOCS / "distributed-memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    memory_main() if "--memory" in sys.argv[1:] else main()
