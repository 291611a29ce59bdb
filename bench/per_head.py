"""What a ``PerHead`` layer costs: against its heads' groups run alone, and against one window
for every head with as many allowed pairs.

    python bench/per_head.py [--tokens 8192] [--layers 1 5 10 15 20]

The layers are the effect-based fit at the smallest budget recorded in
``bench/results/fit-llm.json`` (SmolLM2-135M: 9 query heads, 3 key/value heads, head size 64;
windows of 64-2048 keys plus 4 sinks, causal). For each, at ``--tokens`` tokens, float32, one
forward call each, in turns (medians of 5 after a warm-up):

- ``per_head``: ``attention(q, k, v, pattern=PerHead(...))`` as a model runs it;
- ``groups_alone``: the sum of each distinct pattern's call on just its heads (what the
  ``PerHead`` call does, minus its head selection and reassembly);
- ``uniform``: one window + 4 sinks for all 9 heads, the window chosen so that it allows as
  many pairs at this length as the ``PerHead`` layer;
- ``copies``: the ``PerHead`` call as attnkit ran it before its GQA parts (commit 3c29351): a
  pattern that splits a key/value group gave each of its query heads its own key/value copy.

``per_head / groups_alone`` is the overhead of running the heads together (the groups alone
run one query head per key/value head, so they skip the GQA layout); ``per_head / uniform`` is
what mixing window sizes costs over one window at equal work; ``per_head / copies`` what the
GQA parts changed.

Writes ``bench/results/per-head.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, alternate, environment, save
from attnkit import attention, functional
from attnkit import patterns as P

H, HKV, D, SINKS = 9, 3, 64, 4


@contextlib.contextmanager
def per_query_head_copies():
    """``attention()`` with PerHead run as before its GQA parts: one call per distinct pattern,
    and where a pattern's heads split a key/value group, a key/value copy per query head."""

    def heads_of(inp, pattern, heads, part):
        G = inp.G
        kv = sorted({h // G for h in heads})
        kv = kv if len(kv) * G == len(heads) else [h // G for h in heads]
        take = lambda t, i: t.index_select(1, torch.tensor(i)) if t.shape[1] > 1 else t  # noqa: E731
        return dataclasses.replace(inp, q=take(inp.q, list(heads)), k=take(inp.k, kv), v=take(inp.v, kv),
                                   pattern=pattern)  # fmt: skip

    saved = functional._gqa_parts, functional._heads_of
    functional._gqa_parts, functional._heads_of = (lambda heads, G: [heads]), heads_of
    try:
        yield
    finally:
        functional._gqa_parts, functional._heads_of = saved


def uniform(w: int) -> P.Pattern:
    return (P.SlidingWindow(w, 0) | P.Global(tuple(range(SINKS)))) & P.Causal()


def matching_window(pairs: int, n: int) -> int:
    lo, hi = 1, n
    while lo < hi:  # the smallest window allowing at least as many pairs per head
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if uniform(mid).num_allowed(n, n) * H < pairs else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 5, 10, 15, 20])
    args = ap.parse_args()
    fitted = json.loads((RESULTS / "fit-llm.json").read_text())
    budget = min(r["budget"] for r in fitted["rows"] if r["name"].startswith("effect "))
    layers = next(r["patterns"] for r in fitted["rows"] if r["name"] == f"effect {budget}")
    torch.manual_seed(0)
    n = args.tokens
    q, k, v = torch.randn(1, H, n, D), torch.randn(1, HKV, n, D), torch.randn(1, HKV, n, D)
    rows = []
    for i in args.layers:
        pattern = P.parse_pattern(layers[i])
        pairs = pattern.num_allowed(n, n)
        w = matching_window(pairs, n)
        groups = [(p, torch.randn(1, len(hs), n, D)) for p, hs in pattern.groups()]
        def copies(p=pattern):
            with per_query_head_copies():
                return attention(q, k, v, pattern=p)

        calls = {
            "per_head": lambda p=pattern: attention(q, k, v, pattern=p),
            "uniform": lambda w=w: attention(q, k, v, pattern=uniform(w)),
            "copies": copies,
        }
        for j, (p, x) in enumerate(groups):
            calls[f"group {j}"] = lambda p=p, x=x: attention(x, x, x, pattern=p)
        with torch.no_grad():
            timing = alternate(calls, rounds=5, budget_s=0, max_rounds=5)
        alone = sum(timing[f"group {j}"]["median_s"] for j in range(len(groups)))
        row = {"layer": i, "pattern": layers[i], "distinct_patterns": len(groups),
               "density": pairs / (H * n * n), "uniform_window": w,
               "per_head_s": timing["per_head"]["median_s"], "groups_alone_s": alone,
               "uniform_s": timing["uniform"]["median_s"], "timing": timing}  # fmt: skip
        row["per_head_over_groups"] = row["per_head_s"] / alone
        row["per_head_over_uniform"] = row["per_head_s"] / row["uniform_s"]
        row["per_head_over_copies"] = row["per_head_s"] / timing["copies"]["median_s"]
        rows.append(row)
        print({key: val for key, val in row.items() if key not in ("pattern", "timing")}, flush=True)
    save("per-head", {"environment": environment(), "tokens": n, "budget": budget, "rows": rows})
    print("wrote bench/results/per-head.json")


if __name__ == "__main__":
    main()
