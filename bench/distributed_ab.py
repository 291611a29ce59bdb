"""The ring's step time and memory, this checkout against another attnkit source tree, in turns.

    git worktree add /tmp/old f488d62
    python bench/distributed_ab.py /tmp/old/src     # about 15 minutes on 2 cores

For each configuration (causal N = 32,768 zig-zag and a 256-token window at N = 131,072, at
P = 2 and 4), the two trees run alternately (fresh processes, ``PYTHONPATH`` picking the tree),
3 rounds; one result is the slowest rank's second step (:func:`distributed._step`) and the
largest steady-state memory of a rank. Writes ``bench/results/distributed-ab.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save

HERE = Path(__file__).resolve().parent
CONFIGS = [("causal", 32768, "zigzag", 2), ("causal", 32768, "zigzag", 4),
           ("window", 131072, "contiguous", 2), ("window", 131072, "contiguous", 4)]  # fmt: skip
ONE = (
    "import json, sys; sys.path.insert(0, {bench!r}); import distributed as D\n"
    "res = D.run(D._step, {world}, {name!r}, {n}, {layout!r}, 1)\n"
    "print(json.dumps([max(r['times'][0] for r in res), max(r['steady_mib'] for r in res)]))"
)


def once(src: str, name: str, n: int, layout: str, world: int) -> tuple[float, float]:
    code = ONE.format(bench=str(HERE), world=world, name=name, n=n, layout=layout)
    env = {**os.environ, "PYTHONPATH": src, "ATTNKIT_TUNE": "off"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    other, mine = sys.argv[1], str(HERE.parent / "src")
    rounds = []
    for r in range(3):
        for name, n, layout, world in CONFIGS:
            for label, src in (("other", other), ("this", mine)):
                step, mib = once(src, name, n, layout, world)
                rounds.append({"round": r, "pattern": name, "N": n, "P": world, "tree": label,
                               "step_s": step, "memory_mib": mib})  # fmt: skip
                print(rounds[-1], flush=True)
    summary = []
    for name, n, _, world in CONFIGS:
        pick = {
            t: [x for x in rounds if (x["pattern"], x["P"], x["tree"]) == (name, world, t)]
            for t in ("other", "this")
        }
        med = {t: statistics.median(x["step_s"] for x in v) for t, v in pick.items()}
        summary.append({"pattern": name, "N": n, "P": world, "other_s": med["other"], "this_s": med["this"],
                        "ratio": med["this"] / med["other"]})  # fmt: skip
    save(
        "distributed-ab", {"environment": environment(), "other": other, "rounds": rounds, "summary": summary}
    )


if __name__ == "__main__":
    main()
