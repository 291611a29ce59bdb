"""The translation model's training loss: torch's cross-entropy against ``attnkit.nn.cross_entropy``.

    python bench/fused_loss.py [--run RUN [--padding-only]] [--batches 6] [--threads 2]
                               [--cache-dir DIR] [--page]

1. The loss alone: forward and backward of the token cross-entropy (label smoothing 0.1) of
   ``(N, V)`` scores, ``N = 2,000`` target positions of which 29% are padding (the share in
   the translation run's batches) over a vocabulary of ``V = 8,000``, in float32 and bfloat16:
   ``before``, what ``Seq2Seq.loss`` did until 2026-12-04 (``F.cross_entropy`` of the float32
   copy of all rows, ``ignore_index`` for the padding), against ``after``, what it does now
   (the rows of real tokens selected, then :func:`attnkit.nn.cross_entropy`). The output
   projection is not in this part.
2. With ``--run`` (a translation or summarization run directory without copy attention):
   full training steps (forward, backward, clipping, AdamW), in fp32 and in bf16 autocast, of
   models of the run's shape from one seed on the run's first batches, computing the loss the
   old way (the output projection on every position, then ``F.cross_entropy``) or the new
   way, all four alternately; and the share of padding among the target positions of the
   run's first 200 batches (what the 29% of part 1 stands for).

Prints medians and ratios (before / after: above 1 means the new loss is faster), writes
``bench/results/fused_loss.json`` and ``docs/bench/fused_loss.md`` (``--page`` rewrites the
page from the stored results without measuring).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DOCS,
    RESULTS,
    alternate,
    env_line,
    environment,
    load_run,
    page_or_args,
    run_batches,
    save,
    train_steps,
)
from attnkit.models import Seq2Seq
from attnkit.nn import cross_entropy

PAD = 0
ROWS, VOCAB, PAD_SHARE, SMOOTHING = 2000, 8000, 0.29, 0.1
PADDING_BATCHES = 200  # with --run: the share of padding among the target positions of this many batches


class BeforeSeq2Seq(Seq2Seq):
    """``Seq2Seq`` with the loss of the code before ``attnkit.nn.cross_entropy``: scores for
    every position, then ``F.cross_entropy`` of their float32 copy with ``ignore_index``."""

    def _cross_entropy(self, src, tgt, label_smoothing, reduction):
        return F.cross_entropy(
            self(src, tgt[:, :-1]).flatten(0, 1).float(), tgt[:, 1:].flatten(), ignore_index=PAD,
            label_smoothing=label_smoothing, reduction=reduction,
        )  # fmt: skip


def loss_step(way: str, dtype: torch.dtype):
    """A callable: forward and backward of the loss alone on fixed random scores."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(ROWS, VOCAB, generator=g).to(dtype).requires_grad_()
    target = torch.randint(3, VOCAB, (ROWS,), generator=g)
    target[torch.rand(ROWS, generator=g) < PAD_SHARE] = PAD
    keep = target != PAD
    kept = scores.detach()[keep].requires_grad_()  # the model projects only these rows

    def before() -> None:
        F.cross_entropy(
            scores.float(), target, ignore_index=PAD, label_smoothing=SMOOTHING, reduction="sum"
        ).backward()

    def after() -> None:
        cross_entropy(kept, target[keep], label_smoothing=SMOOTHING, reduction="sum").backward()

    return before if way == "before" else after


def target_padding(run: str, cache_dir: str | None) -> dict:
    """The share of padding among the target positions of ``run``'s first batches."""
    plan = run_batches(run, PADDING_BATCHES, cache_dir)[1]
    gold = [b.tgt[:, 1:] for b in plan]
    padding = sum(int((t == PAD).sum()) for t in gold) / sum(t.numel() for t in gold)
    print(f"target positions that are padding in the run's first {len(plan)} batches: {padding:.1%}")
    return {"target_padding": padding, "target_padding_batches": len(plan)}


def main() -> None:
    parsed = page_or_args(
        __doc__,
        "fused_loss",
        write_page,
        run_help="also time full training steps of this run's model",
        batches=6,
        parser=lambda ap: ap.add_argument(
            "--padding-only",
            action="store_true",
            help="with --run: add only the padding share to the results",
        ),
    )
    if parsed is None:
        return
    ap, args = parsed
    if args.padding_only:  # add the padding share to the stored results, timing nothing
        if args.run is None:
            ap.error("--padding-only needs --run")
        results = json.loads((RESULTS / "fused_loss.json").read_text())
        results.update(target_padding(args.run, args.cache_dir))
        save("fused_loss", results)
        write_page(results)
        return
    results: dict = {"env": environment(), "loss": []}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        stats = alternate({w: loss_step(w, dtype) for w in ("before", "after")}, rounds=15, budget_s=0.0)
        ratio = stats["before"]["median_s"] / stats["after"]["median_s"]
        print(
            f"loss alone, {name} scores ({ROWS} x {VOCAB}, {PAD_SHARE:.0%} padding): "
            f"before {1e3 * stats['before']['median_s']:.1f} ms, "
            f"after {1e3 * stats['after']['median_s']:.1f} ms, {ratio:.2f}x"
        )
        results["loss"].append({"dtype": name, "ratio": ratio, **stats})
    if args.run is not None:
        cfg, batches, vocab = load_run(ap, args)
        results.update(target_padding(args.run, args.cache_dir))
        runners = {}
        for precision in ("fp32", "bf16"):
            for way, cls in (("before", BeforeSeq2Seq), ("after", Seq2Seq)):
                torch.manual_seed(0)
                model = cls(cfg.model_config(vocab))
                if model.copy_gate is not None:
                    ap.error("--run: the run's model has copy attention, whose loss this does not change")
                runners[f"{precision} {way}"] = train_steps(model, cfg.replace(precision=precision), batches)
        stats = alternate(runners, rounds=3 * len(batches), budget_s=0.0)
        results.update(run=str(args.run), training_steps={})
        for precision in ("fp32", "bf16"):
            before, after = (stats[f"{precision} {w}"]["median_s"] for w in ("before", "after"))
            results["training_steps"][precision] = {
                "before": stats[f"{precision} before"], "after": stats[f"{precision} after"],
                "ratio": before / after,
            }  # fmt: skip
            print(
                f"full {precision} training steps of {args.run}: before {before:.3f} s, after {after:.3f} s "
                f"(median of {stats[f'{precision} before']['rounds']}), {before / after:.2f}x"
            )
    save("fused_loss", results)
    write_page(results)


def write_page(results: dict) -> None:
    """``docs/bench/fused_loss.md``: the loss alone per dtype, and the full training steps."""
    lines = [
        "# The training loss: torch's cross-entropy against attnkit.nn.cross_entropy",
        "",
        "Generated by `python bench/fused_loss.py` from `bench/results/fused_loss.json`; do not edit by "
        "hand.",
        "",
        f"Machine: {env_line(results['env'])}. Forward and backward of the token cross-entropy (label "
        f"smoothing {SMOOTHING}) of {ROWS:,} x {VOCAB:,} scores, {PAD_SHARE:.0%} of the rows padding: "
        "*before*, `F.cross_entropy` of the float32 copy of all rows with `ignore_index`; *after*, "
        "`attnkit.nn.cross_entropy` of the real rows only (the model projects only those). Medians, "
        "timed alternately in one process; the ratio is before / after (above 1: the new loss is faster).",
        "",
        "| scores | before | after | ratio |",
        "|---|---|---|---|",
    ]
    for r in results["loss"]:
        before, after = (1e3 * r[w]["median_s"] for w in ("before", "after"))
        lines.append(f"| {r['dtype']} | {before:.1f} ms | {after:.1f} ms | {r['ratio']:.2f}x |")
    if "training_steps" in results:
        lines += [
            "",
            f"Full training steps (forward, backward, clipping, AdamW) of the model of `{results['run']}` on "
            "its first batches, alternately, all four in one process: *before*, the output projection on "
            "every position, then `F.cross_entropy`; *after*, projection and loss on the real positions "
            "only (what `Seq2Seq.loss` does now). Of the target positions of the run's first "
            f"{results['target_padding_batches']} batches, {results['target_padding']:.1%} are padding.",
            "",
            "| precision | before | after | ratio |",
            "|---|---|---|---|",
        ]
        for precision, st in results["training_steps"].items():
            lines.append(
                f"| {precision} | {st['before']['median_s']:.3f} s | {st['after']['median_s']:.3f} s "
                f"| **{st['ratio']:.2f}x** |"
            )
    (DOCS / "fused_loss.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
