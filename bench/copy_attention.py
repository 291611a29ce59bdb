"""What copy attention costs per training step, on real summarization batches.

    python bench/copy_attention.py --run RUN [--batches 4] [--threads 2]

``RUN`` is a summarization run directory (its ``train.json`` and ``tokenizer.json`` are used; the
corpus is the one its config names). Four models of the run's shape, from one seed, train in
one process on the same first batches of the run's batch plan, alternately
(``_common.alternate``):

- no copy attention;
- copy attention as attnkit trains it (``Seq2Seq.loss``: the gold token's log-probability
  and label smoothing's sum from the logits' log-normalizer and their values at the gold and
  source ids, with no ``(B, T, V)`` mixture);
- the cross-entropy of the mixture ``Seq2Seq.forward`` returns (the generator's
  log-probabilities corrected at the source ids only), which is how attnkit trained it before;
- the mixture written densely over the whole vocabulary (``log(p_gen * softmax + (1 - p_gen)
  * copy)``), then its cross-entropy.

Each step is forward + backward + AdamW. Prints medians and ratios and writes
``bench/results/copy_attention.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, environment, load_run, run_parser, save, train_steps
from attnkit.models import Seq2Seq


class MixtureLoss(Seq2Seq):
    """The same model, trained on the cross-entropy of :meth:`Seq2Seq.forward`'s mixture."""

    def loss(self, src, tgt, *, label_smoothing=0.0, reduction="mean"):
        return self._cross_entropy(self(src, tgt[:, :-1]), tgt, label_smoothing, reduction)


class DenseCopy(MixtureLoss):
    """The same, with the mixture computed over the whole vocabulary, term by term."""

    def _mix(self, logits, h, x, memory, cross, src):
        attn = cross.float().mean(1)
        context = (attn @ memory.float()).to(h.dtype)
        gate = self.copy_gate(torch.cat([h, context, x.to(h.dtype)], -1)).float()
        copy = logits.new_zeros(logits.shape, dtype=torch.float32)
        copy.scatter_add_(-1, src[:, None, :].expand(-1, attn.shape[1], -1), attn)
        return torch.logaddexp(
            F.logsigmoid(gate) + logits.float().log_softmax(-1),
            F.logsigmoid(-gate) + copy.clamp_min(1e-30).log(),
        )


def main() -> None:
    ap = run_parser(__doc__, run_help="a summarization run directory", batches=4)
    args = ap.parse_args()
    cfg, batches, vocab = load_run(ap, args)
    runners = {}
    for name, cls, copy in (("no copy", Seq2Seq, False), ("copy (attnkit)", Seq2Seq, True),
                            ("copy (mixture, then CE)", MixtureLoss, True),
                            ("copy (dense mixture)", DenseCopy, True)):  # fmt: skip
        torch.manual_seed(0)
        runners[name] = train_steps(cls(cfg.model_config(vocab).replace(copy_attention=copy)), cfg, batches)
    stats = alternate(runners, rounds=3 * len(batches), budget_s=0.0)
    base = stats["no copy"]["median_s"]
    for name, st in stats.items():
        print(f"{name:24s} median {st['median_s']:.3f} s/step  ({st['median_s'] / base:.2f}x no copy)")
    tokens = [b.tokens for b in batches]
    payload = {"env": environment(), "run": str(args.run), "threads": args.threads, "batch_tokens": tokens}
    save("copy_attention", {**payload, "results": stats})


if __name__ == "__main__":
    main()
