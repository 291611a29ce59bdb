"""One training step, its learning rate and optimizer, the precision chosen by measuring a
step, and the validation loss."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..._timing import time_in_turns
from .batches import Batch, collate, token_batches
from .config import BF16_MIN_SPEEDUP, LR_SCHEDULES, PAD, TrainConfig

__all__ = [
    "LossModule", "budget_done", "choose_precision", "forward_backward", "lr_factor", "make_optimizer",
    "train_step", "valid_loss",
]  # fmt: skip


def lr_factor(step: int, warmup: int, schedule: str = "inverse_sqrt", done: float = 0.0) -> float:
    """Multiplier of the peak rate at ``step`` (1-based): linear warm-up over ``warmup`` steps,
    then ``schedule``'s decay. ``"inverse_sqrt"``: ``sqrt(warmup / step)``. ``"linear"``: from 1
    right after the warm-up to 0 when ``done``, the fraction of the budget spent before this
    step, reaches 1. ``done`` may count time, so the fraction spent by the warm-up is estimated
    as ``done * warmup / (step - 1)``: exact for a step budget, and for a time budget at a steady
    step time. The factor is ``(1 - done) / (1 - done * warmup / (step - 1))``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_factor: expected schedule in {LR_SCHEDULES}, got {schedule!r}.")
    step = max(step, 1)
    if step <= warmup:
        return step / warmup
    if schedule == "inverse_sqrt":
        return math.sqrt(warmup / step) if warmup else 1.0
    if done >= 1.0:
        return 0.0
    by_warmup = done * warmup / (step - 1) if warmup else 0.0
    return (1.0 - done) / (1.0 - by_warmup)


def budget_done(cfg: TrainConfig, steps: int, elapsed: float) -> float:
    """The fraction of ``cfg``'s budget spent by ``steps`` finished steps and ``elapsed`` seconds
    of training: the larger of the step fraction and, with ``max_minutes``, the time fraction."""
    done = steps / cfg.max_steps
    if cfg.max_minutes:
        done = max(done, elapsed / (cfg.max_minutes * 60))
    return done


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)


class LossModule(nn.Module):
    """A model's weighted, summed token loss as a ``forward`` (what DistributedDataParallel
    wraps: its gradient hooks start in ``forward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, tgt: Tensor, label_smoothing: float, weight: float) -> Tensor:
        return self.model.loss(src, tgt, label_smoothing=label_smoothing, reduction="sum") * weight


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Batch,
    cfg: TrainConfig,
    step: int,
    done: float | None = None,
) -> float:
    """One optimizer step on ``batch`` (``step`` is the 1-based number of this step); returns
    the loss. ``model`` is a :class:`Seq2Seq` or its (data-parallel) loss wrapper. ``done``: the
    fraction of the budget spent before this step, for ``lr_schedule="linear"`` (default: the
    step fraction, ``(step - 1) / max_steps``)."""
    net = model if isinstance(model, (LossModule, nn.parallel.DistributedDataParallel)) else LossModule(model)
    net.train()
    if done is None:
        done = (step - 1) / cfg.max_steps
    for g in opt.param_groups:
        g["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.lr_schedule, done)
    device = next(net.parameters()).device
    src, tgt = batch.src.to(device, non_blocking=True), batch.tgt.to(device, non_blocking=True)
    weight = batch.weight
    if weight is None:
        weight = 1.0 / max(1, int((batch.tgt[:, 1:] != PAD).sum()))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss = net(src, tgt, cfg.label_smoothing, weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_norm > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
    opt.step()
    return loss.detach().item()


def forward_backward(net: nn.Module, batch: Batch, bf16: bool, label_smoothing: float) -> None:
    """One forward + backward of ``batch`` (no optimizer step; the gradients are dropped): what
    :func:`choose_precision` times."""
    device = next(net.parameters()).device
    src, tgt = batch.src.to(device), batch.tgt.to(device)
    weight = batch.weight if batch.weight is not None else 1.0 / max(1, int((batch.tgt[:, 1:] != PAD).sum()))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = net(src, tgt, label_smoothing, weight)
    loss.backward()
    net.zero_grad(set_to_none=True)


def choose_precision(
    net: nn.Module, batch: Batch, label_smoothing: float, *, rounds: int = 3
) -> tuple[str, dict[str, float]]:
    """``("bf16" or "fp32", seconds per step of each)``: forward and backward of ``batch`` in
    float32 and in bfloat16 autocast, timed by attnkit's one policy
    (:func:`attnkit._timing.time_in_turns`: a warm-up step each, then ``rounds`` in turns, the
    fastest of each). bf16 wins only at :data:`BF16_MIN_SPEEDUP` x or more. The random state
    (dropout) is restored afterwards."""
    device = next(net.parameters()).device
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32", {}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    net.train()
    steps = {name: (lambda bf16=name == "bf16": forward_backward(net, batch, bf16, label_smoothing))
             for name in ("fp32", "bf16")}  # fmt: skip
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    try:
        timed = time_in_turns(steps, repeats=rounds, sync=sync)
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    best = {name: t.best for name, t in timed.items()}
    return ("bf16" if best["fp32"] >= BF16_MIN_SPEEDUP * best["bf16"] else "fp32"), best


@torch.no_grad()
def valid_loss(model: nn.Module, examples, cfg: TrainConfig) -> float:
    """Token-level cross-entropy (no label smoothing) over ``examples``."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    lengths = [(len(s), len(t)) for s, t in examples]
    for idx in token_batches(lengths, cfg.batch_tokens, 0, 0, cfg.batch_sort):
        b = collate([examples[i] for i in idx])
        n = int((b.tgt[:, 1:] != PAD).sum())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            total += float(model.loss(b.src.to(device), b.tgt.to(device))) * n
        count += n
    return total / max(count, 1)
