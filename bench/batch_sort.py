"""How much of a training batch is padding, with pairs sorted by source length or by the longer side.

    python bench/batch_sort.py --run RUN [--run RUN2 ...] [--cache-dir DIR]

For each training run directory, encodes its training split with the run's tokenizer from the
corpus its ``train.json`` names, cuts epoch 0 into batches with ``token_batches`` both ways
(``batch_sort`` ``"source"`` and ``"longer"``, the run's seed and ``batch_tokens``), and counts
the padded and the real positions on each side. Counting only: nothing is timed, so it may run
beside other work. Adds the runs to ``bench/results/batch_sort.json`` (runs on corpora in other
caches: call it once per ``--cache-dir``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, run_lengths, save
from attnkit.apps.train import BATCH_SORTS, token_batches


def padding(lengths: list[tuple[int, int]], batches: list[list[int]]) -> dict:
    """Batches, padding shares per side and in all, and real tokens per batch."""
    padded = [sum(len(b) * max(lengths[i][side] for i in b) for b in batches) for side in (0, 1)]
    real = [sum(lengths[i][side] for b in batches for i in b) for side in (0, 1)]
    return {
        "batches": len(batches),
        "source_padding": 1 - real[0] / padded[0],
        "target_padding": 1 - real[1] / padded[1],
        "padding": 1 - sum(real) / sum(padded),
        "real_tokens_per_batch": sum(real) / len(batches),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="a training run's directory (repeatable)")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    stored = RESULTS / "batch_sort.json"
    results = json.loads(stored.read_text()) if stored.is_file() else {"runs": {}}
    results["environment"] = environment()
    for run in args.run:
        cfg, trainer = run_lengths(run, args.cache_dir)
        entry = {"corpus": str(trainer.corpus), "sources": trainer.sources, "pairs": len(trainer.lengths),
                 "batch_tokens": cfg.batch_tokens}  # fmt: skip
        for sort in BATCH_SORTS:
            plan = token_batches(trainer.lengths, cfg.batch_tokens, cfg.seed, 0, sort)
            e = entry[sort] = padding(trainer.lengths, plan)
            print(
                f"{run} ({len(trainer.lengths):,} pairs), sort by {sort}: {e['batches']} batches, "
                f"padding {e['source_padding']:.1%} of source, {e['target_padding']:.1%} of target, "
                f"{e['padding']:.1%} in all; {e['real_tokens_per_batch']:,.0f} real tokens a batch"
            )
        results["runs"][Path(run).name] = entry
    print(f"wrote {save('batch_sort', results)}")


if __name__ == "__main__":
    main()
