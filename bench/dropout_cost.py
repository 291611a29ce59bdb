"""What dropout costs per training step, on a run's real batches.

    python bench/dropout_cost.py --run RUN [--dropouts 0,0.1] [--batches 4] [--threads 2] [--profile]

``RUN`` is a translation or summarization run directory (its ``train.json`` and
``tokenizer.json`` are used; the corpus is the one its config names). One model of the run's
shape per dropout rate, and for each rate above zero a second one with ``torch.nn.Dropout``
in place of attnkit's (``attnkit.nn.Dropout``: the mask from 16-bit lanes of random words),
all from one seed, train in one process on the same first batches of the run's batch plan,
alternately (``_common.alternate``); each step is forward + backward + AdamW. Drawing
dropout's random masks and multiplying by them is element-wise work that a CPU pays for on
every sub-layer's output, forward and backward, so at these small widths it is a visible share
of a step. Prints medians and ratios and writes
``bench/results/dropout_cost.json``; ``--profile`` first prints ``torch.profiler``'s top
operators of one forward and backward of the first batch at each rate, and records their
shares there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, environment, load_run, run_parser, save, train_steps
from attnkit.models import Seq2Seq
from attnkit.nn import Dropout


def profile_step(model: Seq2Seq, batch, label_smoothing: float, title: str) -> dict[str, float]:
    """Print the operators that took most of one forward and backward (after a warm one), and
    return their shares of its self CPU time, in percent."""
    from torch.profiler import profile

    model.train()
    model.loss(batch.src, batch.tgt, label_smoothing=label_smoothing).backward()  # warm
    with profile() as prof:
        model.loss(batch.src, batch.tgt, label_smoothing=label_smoothing).backward()
    model.zero_grad(set_to_none=True)
    ops = prof.key_averages()
    print(f"{title}:\n" + ops.table(sort_by="self_cpu_time_total", row_limit=8))
    total = sum(op.self_cpu_time_total for op in ops)
    top = sorted(ops, key=lambda op: op.self_cpu_time_total, reverse=True)[:8]
    return {op.key: round(100 * op.self_cpu_time_total / total, 2) for op in top}


def with_torch_dropout(model: nn.Module) -> nn.Module:
    """``model`` with each ``attnkit.nn.Dropout`` replaced by ``torch.nn.Dropout`` of the same rate."""
    for name, child in model.named_children():
        if isinstance(child, Dropout):
            setattr(model, name, nn.Dropout(child.p))
        else:
            with_torch_dropout(child)
    return model


def main() -> None:
    ap = run_parser(__doc__, run_help="a translation or summarization run directory", batches=4)
    ap.add_argument("--dropouts", default="0,0.1", help="comma-separated rates; the first is the base")
    ap.add_argument("--profile", action="store_true", help="print each rate's top operators first")
    args = ap.parse_args()
    try:
        rates = [float(r) for r in args.dropouts.split(",")]
    except ValueError:
        rates = []
    if not rates or any(not 0 <= r < 1 for r in rates):
        ap.error(f"--dropouts: expected comma-separated rates in [0, 1), got {args.dropouts!r}")
    cfg, batches, vocab = load_run(ap, args)
    runners, profiles = {}, {}
    for rate in rates:
        for kind in ("attnkit", "torch") if rate > 0 else ("",):
            name = f"dropout {rate:g}" + (f" ({kind})" if kind else "")
            torch.manual_seed(0)
            model = Seq2Seq(cfg.model_config(vocab).replace(dropout=rate))
            if kind == "torch":
                with_torch_dropout(model)
            if args.profile:
                profiles[name] = profile_step(model, batches[0], cfg.label_smoothing, name)
            runners[name] = train_steps(model, cfg, batches)
    stats = alternate(runners, rounds=3 * len(batches), budget_s=0.0)
    base_name = next(iter(stats))
    base = stats[base_name]["median_s"]
    for name, st in stats.items():
        print(f"{name:22s} median {st['median_s']:.3f} s/step  ({st['median_s'] / base:.2f}x {base_name})")
    payload = {"env": environment(), "run": str(args.run), "threads": args.threads, "task": cfg.task,
               "batch_tokens": [b.tokens for b in batches]}  # fmt: skip
    save("dropout_cost", {**payload, "results": stats, "profile_self_cpu_percent": profiles or None})


if __name__ == "__main__":
    main()
