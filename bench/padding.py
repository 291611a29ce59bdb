"""What a padded batch costs on ``blocksparse``: ``KeyPadding(new lengths) & SlidingWindow(256, 256)``.

    python bench/padding.py

Times, alternately in one process, the same block-sparse call with and without padding
(B=8, H=4, D=64, N=S=8192, float32), forward and forward + backward. The padded call gets a
new tuple of key lengths every time (uniform in ``[N/4, N]``, the longest = N, as a batch
padded to its longest sequence), so no plan can come from the cache for those lengths: the
plan is built for the batch-independent ``SlidingWindow`` and the lengths are applied per call.

Then 1,000 forward calls (H=1, D=16), each with a distinct length tuple, record the plan cache
(entries, bytes) and the process's resident memory. Last, what ``Document`` boundaries (which
stay part of the plan) cost: building the forward and backward plans of ``Document(16 random
segments) & Causal()`` at N = 8192 for new packings, against one forward call at B=8, H=4.
Writes ``bench/results/padding.json`` and ``docs/bench/padding.md``.
"""

from __future__ import annotations

import itertools
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, _status_kib, alternate, env_line, environment, save
from attnkit import attention, caches
from attnkit import patterns as P

B, H, D, N = 8, 4, 64, 8192
WINDOW = P.SlidingWindow(256, 256)


def new_lengths(rng: random.Random, low: int = N // 4) -> tuple[int, ...]:
    lengths = [rng.randint(low, N) for _ in range(B - 1)] + [N]
    rng.shuffle(lengths)
    return tuple(lengths)


def _ms(timing: dict) -> str:
    return f"{timing['median_s'] * 1e3:.0f} ms"


def main() -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, N, D)

    def call(low: int | None, backward: bool) -> None:
        pattern = WINDOW if low is None else P.KeyPadding(new_lengths(rng, low)) & WINDOW
        with torch.set_grad_enabled(backward):
            out = attention(q, k, v, pattern=pattern, backend="blocksparse")
            if backward:
                out.backward(dout)
                q.grad = k.grad = v.grad = None

    rows = []
    for backward in (False, True):
        label = "forward+backward" if backward else "forward"
        res = alternate(
            {
                "unpadded": lambda b=backward: call(None, b),
                "padded": lambda b=backward: call(N // 4, b),
                "lightly_padded": lambda b=backward: call(N - 1024, b),
            },
            rounds=7,
            budget_s=60,
        )
        ratio = res["padded"]["median_s"] / res["unpadded"]["median_s"]
        light = res["lightly_padded"]["median_s"] / res["unpadded"]["median_s"]
        rows.append({"pass": label, **res, "ratio": ratio, "light_ratio": light})
        med = {name: r["median_s"] for name, r in res.items()}
        print(f"{label}: unpadded {med['unpadded']:.3f} s, padded {med['padded']:.3f} s ({ratio:.3f}x), "
              f"lightly padded {med['lightly_padded']:.3f} s ({light:.3f}x)")  # fmt: skip

    # plan memory over 1,000 distinct length tuples
    caches.clear()
    small = torch.randn(B, 1, N, 16)
    seen, trace = set(), []
    rss0 = _status_kib("VmRSS")
    with torch.no_grad():
        while len(seen) < 1000:
            lengths = new_lengths(rng)
            if lengths in seen:
                continue
            seen.add(lengths)
            attention(small, small, small, pattern=P.KeyPadding(lengths) & WINDOW, backend="blocksparse")
            if len(seen) in (1, 10, 100, 1000):
                info = caches.info()["plans"]
                trace.append({"calls": len(seen), "plans": info.entries, "plan_bytes": info.bytes,
                              "rss_growth_mib": (_status_kib("VmRSS") - rss0) / 1024})  # fmt: skip
                print(trace[-1])

    # Document boundaries are planned, not applied at call time: the cost of a new packing
    from attnkit.backends.blocksparse import BlockSparseBackend

    def packing() -> P.Pattern:
        cuts = sorted(rng.sample(range(1, N), 15))
        bounds = [0, *cuts, N]
        return P.Document([b - a for a, b in itertools.pairwise(bounds)]) & P.Causal()

    builds = []
    for _ in range(5):
        pattern = packing()
        t0 = time.perf_counter()
        BlockSparseBackend.plan(pattern, N, N, backward=True)
        builds.append(time.perf_counter() - t0)
    plan_bytes = caches.info()["plans"].bytes
    with torch.no_grad():
        doc_call = alternate({"call": lambda: attention(q, k, v, pattern=pattern, backend="blocksparse")},
                             rounds=3, budget_s=5)["call"]["median_s"]  # fmt: skip
    document = {"plan_build_s": statistics.median(builds), "forward_call_s": doc_call,
                "plans_bytes_after_5": plan_bytes}  # fmt: skip
    print(document)

    env = environment()
    save("padding", {"benchmark": "padding", "env": env, "shape": {"B": B, "H": H, "D": D, "N": N},
                     "pattern": f"KeyPadding(new lengths) & {WINDOW!r}", "timings": rows,
                     "plan_memory": trace, "document": document})  # fmt: skip
    lines = [
        "# A padded batch on blocksparse",
        "",
        "Generated by `python bench/padding.py` from `bench/results/padding.json`; do not edit.",
        "",
        f"Machine: {env_line(env)}. B={B}, H={H}, D={D}, N=S={N}, float32, `{WINDOW!r}`; the "
        "padded calls get new key lengths every call, the longest N, the others uniform in "
        "[N/4, N] (padded) or [N - 1024, N] (lightly padded: few rows can be skipped). Medians "
        "of calls alternated in one process.",
        "",
        "| pass | unpadded | padded | padded / unpadded | lightly padded | lightly padded / unpadded |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['pass']} | {_ms(r['unpadded'])} | {_ms(r['padded'])} | {r['ratio']:.2f}× "
            f"| {_ms(r['lightly_padded'])} | {r['light_ratio']:.2f}× |"
            for r in rows
        ),
        "",
        "Plan cache over distinct length tuples (forward, H=1, D=16):",
        "",
        "| distinct length tuples | plans cached | plan bytes | resident memory growth |",
        "|---|---|---|---|",
        *(
            f"| {t['calls']} | {t['plans']} | {t['plan_bytes'] / 2**20:.1f} MiB "
            f"| {t['rss_growth_mib']:.0f} MiB |"
            for t in trace
        ),
        "",
        f"`Document` boundaries stay part of the plan: a new packing of 16 random segments "
        f"(`& Causal()`, N={N}) builds its forward and backward plans in "
        f"{document['plan_build_s']:.2f} s (median of 5), against {document['forward_call_s']:.2f} s for one "
        f"forward call at B={B}, H={H}, D={D}.",
        "",
    ]
    (DOCS / "padding.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
