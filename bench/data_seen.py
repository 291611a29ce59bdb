"""How much data the trained runs saw: epochs and real tokens at their final step.

    python bench/data_seen.py        # seconds; needs the corpora and the run directories

Replays each run's batch plan (``token_batches`` with the seed and sort in the run's own
``train.json``, epoch by epoch: the trainer's order) up to the step its model was saved at, and
counts batches per epoch and the real source + target tokens. Writes
``bench/results/runs/<run>/data-seen.json``. Runs trained after this script record ``tokens``
in their ``log.jsonl`` directly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS
from attnkit.apps.train import encode_pairs, load_config, token_batches
from attnkit.data import cache_root, load_pairs
from attnkit.models import Tokenizer

# results folder -> (run directory under the cache, step of the saved model)
RUNS = {
    "translate-en-de-55min": ("runs/translate-en-de", 1901),
    "translate-en-de-85min": ("runs/translate-en-de", 3250),
    "summarize-debian": ("runs/summarize-debian", 1391),
}


def main() -> None:
    cache = cache_root(sys.argv[1] if len(sys.argv) > 1 else None)
    for name, (run, steps) in RUNS.items():
        cfg = load_config(cache / run / "train.json")  # the config the run recorded, not today's
        tok = Tokenizer(cache / run / "tokenizer.json")
        train = encode_pairs(tok, load_pairs(cache / cfg.corpus, "train"), cfg, drop_long=True)
        lengths = [(len(s), len(t)) for s, t in train]
        per_epoch = len(token_batches(lengths, cfg.batch_tokens, cfg.seed, 0, cfg.batch_sort))
        done, tokens, epoch = 0, 0, 0
        while done < steps:
            plan = token_batches(lengths, cfg.batch_tokens, cfg.seed, epoch, cfg.batch_sort)
            for batch in plan[: steps - done]:
                tokens += sum(lengths[i][0] + lengths[i][1] for i in batch)
                done += 1
            epoch += 1
        result = {"step": steps, "training_pairs": len(train), "batches_per_epoch": per_epoch,
                  "epochs": round(steps / per_epoch, 2), "real_tokens": tokens}  # fmt: skip
        out = RESULTS / "runs" / name / "data-seen.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(name, result)


if __name__ == "__main__":
    main()
