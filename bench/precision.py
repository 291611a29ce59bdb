"""Does bf16 autocast pay for a run's training steps, and does ``precision: auto``'s check say so?

    python bench/precision.py --run RUN [--batches 8] [--threads 2] [--cache-dir DIR]

``RUN`` is a translation or summarization run directory (its ``train.json`` and
``tokenizer.json`` are used; the corpus is the one its config names). On the first
``--batches`` batches of the run's batch plan, in one process:

1. the start-up check as ``attnkit train`` runs it (:func:`attnkit.apps.train.choose_precision`
   on the first batch: forward and backward only, three alternating rounds after a warm one);
2. the same check on each of the other batches, to show how much the ratio depends on the batch
   drawn (batches differ in rows and length: many short pairs or a few long ones);
3. full training steps (forward, backward, gradient clipping, AdamW) of two models from one seed,
   one in float32 and one in bf16 autocast, each walking the batches in turn, alternately
   (``_common.alternate``, a fresh random order every round).

Prints the ratios (fp32 seconds / bf16 seconds; above 1 means bf16 is faster) and writes
``bench/results/precision.json``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, environment, load_run, run_parser, save, train_steps
from attnkit.apps.train import BF16_MIN_SPEEDUP, _Loss, choose_precision
from attnkit.models import Seq2Seq


def main() -> None:
    ap = run_parser(__doc__, run_help="a translation or summarization run directory", batches=8)
    args = ap.parse_args()
    cfg, batches, vocab = load_run(ap, args)

    torch.manual_seed(0)
    probe = _Loss(Seq2Seq(cfg.model_config(vocab)))
    checks = []
    for i, batch in enumerate(batches):
        choice, med = choose_precision(probe, batch, cfg.label_smoothing)
        rows, cols = batch.src.shape[0], batch.src.shape[1] + batch.tgt.shape[1]
        ratio = med["fp32"] / med["bf16"]
        checks.append(
            {
                "batch": i,
                "rows": rows,
                "columns": cols,
                "tokens": batch.tokens,
                "fp32_s": med["fp32"],
                "bf16_s": med["bf16"],
                "ratio": ratio,
                "choice": choice,
            }
        )
        print(
            f"check on batch {i}: {rows:4d} rows x {cols:3d} columns, {batch.tokens:5d} tokens: "
            f"fp32 {med['fp32']:.3f} s, bf16 {med['bf16']:.3f} s, {ratio:.2f}x -> {choice}"
        )

    runners = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        runners[precision] = train_steps(
            Seq2Seq(cfg.model_config(vocab)), cfg.replace(precision=precision), batches
        )
    stats = alternate(runners, rounds=3 * len(batches), budget_s=0.0)
    steps = stats["fp32"]["median_s"] / stats["bf16"]["median_s"]
    ratios = [c["ratio"] for c in checks]
    print(
        f"start-up check (batch 0): {ratios[0]:.2f}x; over {len(batches)} batches: median "
        f"{statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x"
    )
    print(
        f"full training steps: fp32 {stats['fp32']['median_s']:.3f} s, "
        f"bf16 {stats['bf16']['median_s']:.3f} s "
        f"(median of {stats['fp32']['rounds']}), {steps:.2f}x; auto takes bf16 at {BF16_MIN_SPEEDUP}x"
    )
    save(
        "precision",
        {
            "env": environment(),
            "run": str(args.run),
            "threads": args.threads,
            "task": cfg.task,
            "checks": checks,
            "training_steps": stats,
            "training_step_ratio": steps,
        },
    )


if __name__ == "__main__":
    main()
