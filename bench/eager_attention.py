"""Training attention on short sequences: torch's fused CPU kernel against the ``eager`` backend.

    python bench/eager_attention.py [--run RUN] [--batches 6] [--threads 2] [--cache-dir DIR] [--page]

1. Attention alone: one training step (forward and backward) of self-attention over 2,048
   query rows (``2048 // L`` sequences of length ``L``, 4 heads of 64), with a key padding mask
   and with the causal pattern, for float32 and bfloat16, by ``backend="sdpa"`` (torch's
   ``scaled_dot_product_attention``, its fused flash kernel on CPU) and ``backend="eager"``
   (materialized, autograd), alternately (``_common.alternate``). This is what
   :func:`attnkit.backends._tuning.calibrate` measures to set ``eager_keys``, at more lengths
   and with more rounds; the calibration's own answer is printed beside it.
2. With ``--run`` (a translation or summarization run directory): full training steps
   (forward, backward, clipping, AdamW, bf16 autocast) of two models of the run's shape from
   one seed on the run's first batches, one forced onto ``sdpa`` and one on ``auto`` (which
   takes ``eager`` up to the measured length), alternately.

Prints medians and ratios (sdpa seconds / eager seconds: above 1 means eager is faster), writes
``bench/results/eager_attention.json`` and ``docs/bench/eager_attention.md`` (``--page``
rewrites the page from the stored results without measuring).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DOCS,
    alternate,
    calibration,
    env_line,
    environment,
    load_run,
    page_or_args,
    save,
    train_steps,
)
from attnkit import attention
from attnkit import patterns as P
from attnkit.models import Seq2Seq

LENGTHS = (8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def attention_step(backend: str, length: int, dtype: torch.dtype, causal: bool, rows: int = 2048):
    """A callable: forward and backward of one self-attention call on fixed random inputs."""
    g = torch.Generator().manual_seed(length)
    batch = max(1, rows // length)
    q, k, v = (torch.randn(batch, 4, length, 64, generator=g).to(dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(batch, 4, length, 64, generator=g).to(dtype)
    if causal:
        pattern = P.Causal()
    else:
        pattern = P.KeyPadding(torch.randint(length // 2 + 1, length + 1, (batch,), generator=g).tolist())

    def step() -> None:
        attention(q, k, v, pattern=pattern, backend=backend).backward(dout)

    return step


def main() -> None:
    parsed = page_or_args(
        __doc__,
        "eager_attention",
        write_page,
        run_help="also time full training steps of this run's model",
        batches=6,
    )
    if parsed is None:
        return
    ap, args = parsed
    cal = calibration(["float32", "bfloat16"])
    results: dict = {"env": environment(), "calibration": cal, "attention": []}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        print(f"{name}: measured crossover eager_keys = {cal[name]['eager_keys']}")
        for causal in (False, True):
            for length in LENGTHS:
                stats = alternate(
                    {b: attention_step(b, length, dtype, causal) for b in ("sdpa", "eager")},
                    rounds=7,
                    budget_s=2.0,
                )
                ratio = stats["sdpa"]["median_s"] / stats["eager"]["median_s"]
                mask = "causal" if causal else "padding"
                print(
                    f"  {mask:<7} L={length:4d}: sdpa {1e3 * stats['sdpa']['median_s']:7.2f} ms, "
                    f"eager {1e3 * stats['eager']['median_s']:7.2f} ms, {ratio:5.2f}x"
                )
                results["attention"].append(
                    {"dtype": name, "mask": mask, "length": length, "ratio": ratio, **stats}
                )
    if args.run is not None:
        cfg, batches, vocab = load_run(ap, args)
        cfg = cfg.replace(precision="bf16")
        runners = {}
        for backend in ("sdpa", "auto"):
            torch.manual_seed(0)
            runners[backend] = train_steps(Seq2Seq(cfg.model_config(vocab), backend=backend), cfg, batches)
        stats = alternate(runners, rounds=3 * len(batches), budget_s=0.0)
        ratio = stats["sdpa"]["median_s"] / stats["auto"]["median_s"]
        print(
            f"full bf16 training steps of {args.run}: sdpa {stats['sdpa']['median_s']:.3f} s, "
            f"auto (eager) {stats['auto']['median_s']:.3f} s (median of {stats['sdpa']['rounds']}), "
            f"{ratio:.2f}x"
        )
        results.update(run=str(args.run), training_steps=stats, training_step_ratio=ratio)
    save("eager_attention", results)
    write_page(results)


def write_page(results: dict) -> None:
    """``docs/bench/eager_attention.md``: the ratios by length, one column per dtype and mask."""
    cols = [(d, m) for d in ("float32", "bfloat16") for m in ("padding", "causal")]
    ratio = {(r["dtype"], r["mask"], r["length"]): r["ratio"] for r in results["attention"]}
    crossover = ", ".join(f"{d} {results['calibration'][d]['eager_keys']}" for d in ("float32", "bfloat16"))
    lines = [
        "# Training attention on short sequences: fused kernel against eager",
        "",
        "Generated by `python bench/eager_attention.py` from `bench/results/eager_attention.json`; do not "
        "edit by hand.",
        "",
        f"Machine: {env_line(results['env'])}. One forward and backward of self-attention over 2,048 query "
        "rows (2048 / L sequences of length L), 4 heads of 64, with a key padding mask or causal; the "
        'ratio is the median time of `backend="sdpa"` (torch\'s fused CPU kernel) over that of '
        '`backend="eager"` (above 1: eager is faster), timed alternately in one process. The '
        f"calibration's crossover (`eager_keys`) on this machine: {crossover}.",
        "",
        "| L | " + " | ".join(f"{d}, {m}" for d, m in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for length in sorted({r["length"] for r in results["attention"]}):
        cells = " | ".join(f"{ratio[d, m, length]:.2f}x" for d, m in cols)
        lines.append(f"| {length} | {cells} |")
    if "training_steps" in results:
        st = results["training_steps"]
        lines += [
            "",
            f"Full bf16-autocast training steps (forward, backward, clipping, AdamW) of the model of "
            f"`{results['run']}` on its first batches, alternately: `sdpa` {st['sdpa']['median_s']:.3f} s, "
            f"`auto` (eager) {st['auto']['median_s']:.3f} s, median of {st['sdpa']['rounds']}: "
            f"**{results['training_step_ratio']:.2f}x**.",
        ]
    (DOCS / "eager_attention.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
