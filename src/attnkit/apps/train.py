"""Training a :class:`~attnkit.models.Seq2Seq` translator or summarizer on a built corpus.

A run directory holds everything: ``train.json`` (the config), ``tokenizer.json`` (trained on
the training split), ``checkpoint.pt`` (model, optimizer, data position and random states:
``--resume`` continues exactly), ``model/`` (the best model by validation loss, with its
tokenizer, ready for ``attnkit eval/translate/summarize``) and ``log.jsonl``. Every file is
written atomically; Ctrl-C finishes the current step, saves and exits.

Data-parallel: under ``torchrun --nproc-per-node P`` (``torch.distributed`` initialized), every
rank builds the same global batches and trains on its share of each one's rows through
``DistributedDataParallel``; the loss is the whole batch's token mean, so the steps are those of
one process on the same batches. Rank 0 alone validates, writes files and shows progress;
``--resume`` continues with any number of ranks (the data position counts global batches).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._files import atomic_write
from ..data import SPECIAL_TOKENS, DataError, cache_root, load_pairs, read_meta, train_tokenizer
from ..models import Seq2Seq, Seq2SeqConfig, Tokenizer
from ..models._io import ModelConfig

__all__ = ["Batch", "TrainConfig", "Trainer", "load_config", "lr_factor", "token_batches"]

TASKS = ("translate", "summarize")
PAD, BOS, EOS = 0, 1, 2  # SPECIAL_TOKENS' ids
PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("inverse_sqrt", "linear")
BATCH_SORTS = ("source", "longer")
#: ``precision="auto"`` takes bf16 only when a measured step is at least this much faster (bf16
#: rounds activations to 8 bits of mantissa: a speed-up within noise is not worth it).
BF16_MIN_SPEEDUP = 1.1


@dataclasses.dataclass(frozen=True)
class TrainConfig(ModelConfig):
    """A training run. ``model`` holds :class:`Seq2SeqConfig` fields (the vocabulary size comes
    from the tokenizer). ``max_minutes`` (0 = none) stops early, counting across resumes.
    The learning rate warms up linearly for ``warmup_steps``, then ``lr_schedule`` decays it:
    ``"inverse_sqrt"`` as 1/sqrt(step) (Vaswani et al. 2017), or ``"linear"`` to zero at the end
    of the budget, whichever of ``max_steps`` and ``max_minutes`` ends the run first (budget-aware
    decay, Li et al. 2020, "Budgeted Training"; see :func:`lr_factor`); a resumed run given
    another budget decays to the new end. ``precision``: ``"fp32"``, ``"bf16"`` (bfloat16
    autocast, float32 master weights) or ``"auto"``: measured at start-up
    (:func:`choose_precision`).
    ``average_last`` (0 = off, else >= 2): keep the weights of the last that many validations
    and, when the run ends, write their average to ``model-avg/`` (checkpoint averaging, as
    Vaswani et al. 2017 did over their last checkpoints).
    ``batch_sort``: how :func:`token_batches` orders pairs before cutting them into batches;
    ``"source"`` (source length, then target length) or ``"longer"`` (the longer side first),
    which leaves less padding when the two sides' lengths differ.
    ``sources`` (translation; None = any): the sources the corpus must have been built from
    (``attnkit data translate --sources``); a corpus built from others is an error, not a
    silently different run."""

    task: str = "translate"
    corpus: str = "translate-en-de"
    sources: list | None = None
    vocab_size: int = 8000
    max_src_tokens: int = 128
    max_tgt_tokens: int = 128
    model: dict = dataclasses.field(default_factory=dict)
    batch_tokens: int = 6000
    batch_sort: str = "source"
    lr: float = 7e-4
    warmup_steps: int = 800
    lr_schedule: str = "inverse_sqrt"
    max_steps: int = 20000
    max_minutes: float = 0.0
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 500
    valid_pairs: int = 1000
    precision: str = "auto"
    seed: int = 0
    beam_size: int = 4
    length_penalty: float = 1.0
    average_last: int = 0

    def validate(self) -> None:
        self._require("task", self.task in TASKS, f"one of {TASKS}")
        self._require("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}")
        self._require("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"one of {LR_SCHEDULES}")
        self._require("batch_sort", self.batch_sort in BATCH_SORTS, f"one of {BATCH_SORTS}")
        if self.sources is not None:
            from ..data.libreoffice import SOURCES

            self._require("sources", self.task == "translate", "None (sources are for translation corpora)")
            ok = (
                isinstance(self.sources, list)
                and "help" in self.sources
                and set(self.sources) <= set(SOURCES)
            )
            self._require("sources", ok, f"a list of names from {SOURCES} with 'help'")
        self._positive("vocab_size", "max_src_tokens", "max_tgt_tokens", "batch_tokens", "max_steps",
                       "eval_every", "valid_pairs", "beam_size")  # fmt: skip
        self._require("max_tgt_tokens", self.max_tgt_tokens >= 3, ">= 3 (bos, a token, eos)")
        self._require("lr", self.lr > 0, "> 0")
        self._require("warmup_steps", self.warmup_steps >= 0, ">= 0")
        self._require("max_minutes", self.max_minutes >= 0, ">= 0")
        self._require("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)")
        self._require("clip_norm", self.clip_norm >= 0, ">= 0 (0 = no clipping)")
        self._require("average_last", self.average_last == 0 or self.average_last >= 2, "0 (off) or >= 2")
        self._require("batch_tokens", self.batch_tokens >= self.max_src_tokens + self.max_tgt_tokens,
                      "at least max_src_tokens + max_tgt_tokens")  # fmt: skip
        bad = set(self.model) & {"src_vocab_size", "tgt_vocab_size", "pad_id", "bos_id", "eos_id"}
        self._require("model", not bad, f"without {sorted(bad)} (they come from the tokenizer)")
        self.model_config(100)  # validates the model fields

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        if "bf16" in data:  # configs written before `precision`
            legacy = data.pop("bf16")
            data.setdefault("precision", "bf16" if legacy else "fp32")
        return super().from_dict(data)

    def model_config(self, vocab_size: int) -> Seq2SeqConfig:
        return Seq2SeqConfig.from_dict({
            **self.model, "src_vocab_size": vocab_size, "pad_id": PAD, "bos_id": BOS, "eos_id": EOS,
            "max_len": max(self.model.get("max_len", 0), self.max_src_tokens, self.max_tgt_tokens),
        })  # fmt: skip


def load_config(path: str | Path) -> TrainConfig:
    """A :class:`TrainConfig` from a JSON file (unknown keys are an error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train: expected a config file, but {str(path)!r} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"train: {str(path)!r} is not valid JSON: {e}") from None
    data.pop("//", None)  # a comment field
    return TrainConfig.from_dict(data)


# -- data ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Batch:
    src: Tensor  # (B, S) with eos, padded
    tgt: Tensor  # (B, T) bos ... eos, padded
    tokens: int  # real tokens, both sides
    #: Factor of the summed token loss; None: 1 / this batch's predicted tokens (the mean).
    #: A data-parallel rank's share of a batch gets ``ranks / the whole batch's tokens``.
    weight: float | None = None


def encode_pairs(
    tok: Tokenizer, pairs, cfg: TrainConfig, *, drop_long: bool
) -> list[tuple[list[int], list[int]]]:
    """``(src ids + eos, bos + tgt ids + eos)`` per pair; sources are truncated to
    ``max_src_tokens``; over-long targets are truncated, or dropped with ``drop_long``."""
    srcs = tok.encode_many([p.src for p in pairs], add_special_tokens=False)
    tgts = tok.encode_many([p.tgt for p in pairs], add_special_tokens=False)
    out = []
    for s, t in zip(srcs, tgts, strict=True):
        if drop_long and len(t) > cfg.max_tgt_tokens - 2:
            continue
        out.append(([*s[: cfg.max_src_tokens - 1], EOS], [BOS, *t[: cfg.max_tgt_tokens - 2], EOS]))
    return out


def source_batch(tok: Tokenizer, texts: list[str], max_src_tokens: int) -> Tensor:
    """Right-padded source ids ``(B, S)``: each text's ids, truncated, then ``eos``."""
    ids = [[*x[: max_src_tokens - 1], EOS] for x in tok.encode_many(texts, add_special_tokens=False)]
    out = torch.full((len(ids), max(map(len, ids))), PAD, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x)
    return out


def token_batches(
    lengths: list[tuple[int, int]], batch_tokens: int, seed: int, epoch: int, sort: str = "source"
) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size (rows x longest, both
    sides) stays within ``batch_tokens``; the order depends only on ``(seed, epoch)``.

    The indices are shuffled, then sorted within chunks of a few thousand, so that a batch holds
    pairs of similar length and the batches still differ from epoch to epoch. ``sort="source"``
    sorts by source length, then target length; ``"longer"`` by the longer of the two, then
    source, then target: where target lengths vary among pairs of equal source length (as in
    translation), that leaves less padding, so a batch of the same padded size holds more real
    tokens."""
    if sort not in BATCH_SORTS:
        raise ValueError(f"token_batches: expected sort in {BATCH_SORTS}, got {sort!r}.")
    key = (lambda i: lengths[i]) if sort == "source" else (lambda i: (max(lengths[i]), *lengths[i]))
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    chunk = 64 * max(1, batch_tokens // 32)  # sort within chunks: similar lengths, still shuffled
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=key)
        cur: list[int] = []
        longest_s = longest_t = 0
        for i in part:
            s, t = lengths[i]
            ls, lt = max(longest_s, s), max(longest_t, t)
            if cur and (len(cur) + 1) * (ls + lt) > batch_tokens:
                batches.append(cur)
                cur, ls, lt = [], s, t
            cur.append(i)
            longest_s, longest_t = ls, lt
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(examples: list[tuple[list[int], list[int]]]) -> Batch:
    S = max(len(s) for s, _ in examples)
    T = max(len(t) for _, t in examples)
    src = torch.full((len(examples), S), PAD, dtype=torch.long)
    tgt = torch.full((len(examples), T), PAD, dtype=torch.long)
    for i, (s, t) in enumerate(examples):
        src[i, : len(s)] = torch.tensor(s)
        tgt[i, : len(t)] = torch.tensor(t)
    return Batch(src, tgt, sum(len(s) + len(t) for s, t in examples))


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


class _Loss(nn.Module):
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
    net = model if isinstance(model, (_Loss, nn.parallel.DistributedDataParallel)) else _Loss(model)
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


def step_seconds(net: nn.Module, batch: Batch, bf16: bool, label_smoothing: float) -> float:
    """Seconds of one forward + backward of ``batch`` (no optimizer step; gradients dropped)."""
    device = next(net.parameters()).device
    src, tgt = batch.src.to(device), batch.tgt.to(device)
    weight = batch.weight if batch.weight is not None else 1.0 / max(1, int((batch.tgt[:, 1:] != PAD).sum()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = net(src, tgt, label_smoothing, weight)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    net.zero_grad(set_to_none=True)
    return seconds


def choose_precision(
    net: nn.Module, batch: Batch, label_smoothing: float, *, rounds: int = 3
) -> tuple[str, dict[str, float]]:
    """``("bf16" or "fp32", median seconds per step of each)``: one warm-up step each, then
    ``rounds`` alternating steps of float32 and of bfloat16 autocast on ``batch``. bf16 wins only
    at :data:`BF16_MIN_SPEEDUP` x or more. The random state (dropout) is restored afterwards."""
    device = next(net.parameters()).device
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32", {}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    net.train()
    try:
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for r in range(rounds + 1):
            for name in ("fp32", "bf16"):
                t = step_seconds(net, batch, name == "bf16", label_smoothing)
                if r:  # the first round warms up (allocations, kernels' first use)
                    times[name].append(t)
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return ("bf16" if medians["fp32"] >= BF16_MIN_SPEEDUP * medians["bf16"] else "fp32"), medians


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


def resolve_corpus(corpus: str, cache: Path) -> Path:
    """A corpus directory: ``corpus`` itself if it is one, else ``cache/corpus``."""
    for cand in (Path(corpus).expanduser(), cache / corpus):
        if (cand / "meta.json").is_file():
            return cand
    raise DataError(
        f"corpus {corpus!r} not found (looked in {str(Path(corpus))!r} and {str(cache / corpus)!r}); "
        f"build it first with `attnkit data {'translate' if 'translate' in corpus else 'summarize'}`."
    )


# -- the loop -----------------------------------------------------------------------------------
class Trainer:
    """Runs :class:`TrainConfig` in ``out_dir``; see the module docstring for the files.

    Args:
        cfg: The run's configuration.
        out_dir: Run directory (created).
        cache: Data cache root (default :func:`attnkit.data.cache_root`).
        progress: Show a tqdm bar (loss, tokens/s, learning rate, ETA).
        log: Where one-line messages go (default ``print``).
        device: Where the model trains (``"cpu"``, ``"cuda"``, ...).
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, *, cache: str | Path | None = None,
                 progress: bool = True, log: Callable[[str], None] = print,
                 device: str | torch.device = "cpu") -> None:  # fmt: skip
        self.cfg, self.out = cfg, Path(out_dir)
        self.device = torch.device(device)
        self.cache = cache_root(cache)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.main = self.rank == 0
        self.progress = progress and self.main
        self.log = log if self.main else (lambda message: None)
        self._stop = False

    # files
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def prepare(self) -> None:
        """Load the corpus, train (or reuse) the tokenizer, encode the splits, build the model."""
        cfg = self.cfg
        self.corpus = resolve_corpus(cfg.corpus, self.cache)
        meta = read_meta(self.corpus)
        if meta.get("task") != cfg.task:
            raise ValueError(f"train: config task {cfg.task!r} but corpus {str(self.corpus)!r} is for "
                             f"{meta.get('task')!r}.")  # fmt: skip
        built = meta.get("sources", ["help"] if cfg.task == "translate" else None)
        if cfg.sources is not None and sorted(built) != sorted(cfg.sources):
            raise DataError(
                f"train: the config expects a corpus built from sources {cfg.sources}, but "
                f"{str(self.corpus)!r} was built from {built}; rebuild it with "
                f"`attnkit data translate --sources {','.join(cfg.sources)}`."
            )
        self.sources = built
        train = load_pairs(self.corpus, "train")
        tok_path = self.out / "tokenizer.json"
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(cfg.to_dict(), indent=2) + "\n"
            atomic_write(self.out / "train.json", lambda p: p.write_text(text, encoding="utf-8"))
            if not tok_path.is_file():
                self.log(f"training a {cfg.vocab_size}-token BPE vocabulary on {len(train):,} training pairs")
                train_tokenizer(
                    (x for p in train for x in (p.src, p.tgt)), tok_path, vocab_size=cfg.vocab_size
                )
        if self.world > 1:
            dist.barrier()  # the others read rank 0's tokenizer
        self.tokenizer = Tokenizer(tok_path)
        assert [self.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD, BOS, EOS, 3]
        self.train = encode_pairs(self.tokenizer, train, cfg, drop_long=True)
        self.valid = encode_pairs(self.tokenizer, load_pairs(self.corpus, "valid")[: cfg.valid_pairs], cfg,
                                  drop_long=False)  # fmt: skip
        self.lengths = [(len(s), len(t)) for s, t in self.train]
        torch.manual_seed(cfg.seed)
        self.model = Seq2Seq(cfg.model_config(self.tokenizer.vocab_size)).to(self.device)
        self.net: nn.Module = _Loss(self.model)
        if self.world > 1:  # broadcasts rank 0's parameters; averages gradients in backward
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.opt = make_optimizer(self.model, cfg)
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "elapsed": 0.0, "tokens": 0,
                                      "best_valid": math.inf}  # fmt: skip

    def save(self) -> None:
        """Write ``checkpoint.pt`` atomically (everything needed to continue exactly)."""
        blob = {
            "state": self.state, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "torch_rng": torch.get_rng_state(), "config": self.cfg.to_dict(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }  # fmt: skip
        atomic_write(self.checkpoint_path, lambda p: torch.save(blob, p))

    def load(self) -> None:
        if not self.checkpoint_path.is_file():
            raise FileNotFoundError(f"train --resume: no checkpoint at {str(self.checkpoint_path)!r}.")
        blob = torch.load(self.checkpoint_path, weights_only=False, map_location=self.device)
        budget = ("max_steps", "max_minutes")  # a resumed run may be given more (or less) time
        stored = TrainConfig.from_dict(blob["config"]).to_dict()  # fields added since: their defaults
        if {k: v for k, v in stored.items() if k not in budget} != {
            k: v for k, v in self.cfg.to_dict().items() if k not in budget
        }:
            raise ValueError(f"train --resume: the config differs from the one {str(self.checkpoint_path)!r} "
                             "was trained with; use the run's own train.json.")  # fmt: skip
        self.model.load_state_dict(blob["model"])
        self.opt.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"].cpu())
        if blob.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([t.cpu() for t in blob["cuda_rng"]])
        self.state = blob["state"]

    def save_model(self, model: Seq2Seq | None = None, name: str = "model", **extra: Any) -> Path:
        """``model`` (default the one training) + tokenizer + task into ``out/name`` (for eval
        and inference); ``extra`` goes into its ``task.json``."""
        d = (self.model if model is None else model).save_pretrained(self.out / name)
        tok = self.tokenizer.path.read_text(encoding="utf-8")
        atomic_write(d / "tokenizer.json", lambda p: p.write_text(tok, encoding="utf-8"))
        task = {
            "task": self.cfg.task, "corpus": str(self.corpus), "step": self.state["step"],
            "max_src_tokens": self.cfg.max_src_tokens, "max_tgt_tokens": self.cfg.max_tgt_tokens,
            "beam_size": self.cfg.beam_size, "length_penalty": self.cfg.length_penalty,
            "valid_loss": self.state["best_valid"], **extra,
        }  # fmt: skip
        text = json.dumps(task, indent=2) + "\n"
        atomic_write(d / "task.json", lambda p: p.write_text(text, encoding="utf-8"))
        return d

    # checkpoint averaging
    @property
    def snapshot_dir(self) -> Path:
        return self.out / "snapshots"

    def _snapshots(self) -> list[Path]:
        return sorted(self.snapshot_dir.glob("step-*.pt"))

    def _snapshot(self) -> None:
        """Keep this step's weights for averaging; only the last ``average_last`` stay."""
        self.snapshot_dir.mkdir(exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        atomic_write(self.snapshot_dir / f"step-{self.state['step']:08d}.pt", lambda p: torch.save(state, p))
        for old in self._snapshots()[: -self.cfg.average_last]:
            old.unlink()

    def average(self) -> Path | None:
        """Write the mean of the kept snapshots' weights to ``model-avg/`` (with its validation
        loss and the steps it averages in ``task.json``); None with fewer than two snapshots."""
        paths = self._snapshots()[-self.cfg.average_last :]
        if len(paths) < 2:
            return None
        total: dict[str, Tensor] = {}
        for path in paths:
            for k, v in torch.load(path, map_location="cpu", weights_only=True).items():
                total[k] = total[k] + v.double() if k in total else v.double()
        model = Seq2Seq(self.model.config).to(self.device)
        dtypes = {k: v.dtype for k, v in self.model.state_dict().items()}
        model.load_state_dict({k: (v / len(paths)).to(dtypes[k]) for k, v in total.items()})
        loss = valid_loss(model, self.valid, self.run_cfg)
        steps = [int(p.stem.split("-")[1]) for p in paths]
        d = self.save_model(model, "model-avg", valid_loss=loss, averaged_steps=steps)
        self.log(f"averaged the weights of steps {steps}: valid loss {loss:.3f} (best single model "
                 f"{self.state['best_valid']:.3f}), saved {str(d)!r}")  # fmt: skip
        return d

    def _log_line(self, entry: dict) -> None:
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def _on_sigint(self, signum, frame) -> None:
        if self._stop:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self._stop = True

    def run(self, *, resume: bool = False) -> dict:
        """Train until ``max_steps`` or ``max_minutes``; returns the final state."""
        if not resume and self.checkpoint_path.exists():  # before prepare() writes into the run
            raise FileExistsError(
                f"train: {str(self.out)!r} already holds a run; pass --resume to continue it or choose "
                "another --out."
            )
        self.prepare()
        if resume:
            self.load()
            self.log(f"resumed at step {self.state['step']} (epoch {self.state['epoch']})")
        self.run_cfg = cfg = self._resolve_precision()
        st = self.state
        n_params = sum(p.numel() for p in self.model.parameters())
        ranks = f", {self.world} data-parallel ranks" if self.world > 1 else ""
        pairs = f"{len(self.train):,} training pairs" + (
            f" ({', '.join(self.sources)})" if self.sources else ""
        )
        self.log(f"{cfg.task}: {pairs}, vocabulary {self.tokenizer.vocab_size}, "
                 f"{n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads{ranks}")  # fmt: skip
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.max_steps, initial=st["step"], desc=cfg.task, unit="step", dynamic_ncols=True
            )
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        window_tokens, window_time = 0, 0.0
        epoch_batches: tuple[int, list[list[int]]] = (-1, [])
        try:
            while st["step"] < cfg.max_steps:
                elapsed = st["elapsed"]
                if self.world > 1:  # every rank stops at the same step and sets the same lr
                    self._stop, elapsed = self._agree(self._stop, elapsed)
                over_budget = bool(cfg.max_minutes) and elapsed >= cfg.max_minutes * 60
                if self._stop:
                    break
                if over_budget:
                    self.log(f"time budget of {cfg.max_minutes} min reached at step {st['step']}")
                    break
                if epoch_batches[0] != st["epoch"]:  # the order depends only on (seed, epoch)
                    epoch_batches = (
                        st["epoch"],
                        token_batches(self.lengths, cfg.batch_tokens, cfg.seed, st["epoch"], cfg.batch_sort),
                    )
                batches = epoch_batches[1]
                if st["position"] >= len(batches):
                    st["epoch"], st["position"] = st["epoch"] + 1, 0
                    continue
                batch = self._batch(batches[st["position"]])
                t0 = time.perf_counter()
                if self.world > 1:  # dropout masks depend on (seed, step, rank): resumable anywhere
                    torch.manual_seed(hash((cfg.seed, st["step"], self.rank)) & (2**63 - 1))
                done = budget_done(cfg, st["step"], elapsed)
                loss = train_step(self.net, self.opt, batch, cfg, st["step"] + 1, done)
                if self.world > 1:
                    loss = self._mean(loss)
                dt = time.perf_counter() - t0
                st["step"] += 1
                st["position"] += 1
                st["elapsed"] += dt
                st["tokens"] += batch.tokens
                window_tokens, window_time = window_tokens + batch.tokens, window_time + dt
                if bar is not None:
                    if cfg.max_minutes:  # the time budget ends the run first: estimate its steps
                        left = max(cfg.max_minutes * 60 - st["elapsed"], 0.0)
                        bar.total = min(cfg.max_steps, st["step"] + round(left * st["step"] / st["elapsed"]))
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{window_tokens / window_time:,.0f}",
                                    lr=f"{self.opt.param_groups[0]['lr']:.1e}", refresh=False)  # fmt: skip
                if st["step"] % cfg.eval_every == 0 or st["step"] == cfg.max_steps:
                    self._validate(loss, window_tokens / window_time)
                    window_tokens, window_time = 0, 0.0
        finally:
            signal.signal(signal.SIGINT, previous)
            if bar is not None:
                bar.close()
        if self._stop:
            if self.main:
                self.save()
            self.log(f"interrupted: saved step {st['step']} to {str(self.checkpoint_path)!r}; "
                     "continue with --resume")  # fmt: skip
            return {**st, "interrupted": True}
        if window_time:
            self._validate(None, window_tokens / window_time)
        if self.main and self.cfg.average_last:
            self.average()
        return st

    def _resolve_precision(self) -> TrainConfig:
        """The config this run trains with: ``precision="auto"`` decided by measuring
        (:func:`choose_precision`) when the run starts, kept in the checkpoint for resumes."""
        cfg, st = self.cfg, self.state
        if cfg.precision != "auto":
            self.log(f"precision: {cfg.precision} (as configured)")
            return cfg
        if "precision" in st:
            self.log(f"precision: {st['precision']} (measured when the run started)")
            return cfg.replace(precision=st["precision"])
        first = token_batches(self.lengths, cfg.batch_tokens, cfg.seed, 0, cfg.batch_sort)[0]
        choice, medians = choose_precision(self.net, self._batch(first), cfg.label_smoothing)
        if self.world > 1:  # every rank measured; they take the majority's choice together
            choice = "bf16" if self._mean(1.0 if choice == "bf16" else 0.0) >= 0.5 else "fp32"
        st["precision"] = choice
        if medians:
            bf16, fp32 = medians["bf16"], medians["fp32"]
            why = (f"a training step took {bf16:.3f} s in bf16 autocast and {fp32:.3f} s in fp32 on this "
                   f"machine; bf16 is taken at {BF16_MIN_SPEEDUP}x or faster")  # fmt: skip
        else:
            why = "this GPU does not support bf16"
        self.log(f"precision: {choice} ({why})")
        return cfg.replace(precision=choice)

    # data parallelism
    def _batch(self, idx: list[int]) -> Batch:
        """This rank's rows of the global batch ``idx``, weighted so that the ranks' summed
        gradients are the whole batch's mean (a rank left without rows trains on a row at
        weight 0, so that every rank joins the gradient all-reduce)."""
        examples = [self.train[i] for i in idx]
        if self.world == 1:
            return collate(examples)
        predicted = sum(len(t) - 1 for _, t in examples)
        mine, weight = examples[self.rank :: self.world], self.world / predicted
        if not mine:
            mine, weight = examples[:1], 0.0
        part = collate(mine)
        return Batch(part.src, part.tgt, sum(len(s) + len(t) for s, t in examples), weight)

    def _agree(self, stop: bool, elapsed: float) -> tuple[bool, float]:
        """Whether any rank stops, and the longest training time of any rank (one collective)."""
        flags = torch.tensor([float(stop), elapsed], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), float(flags[1])

    def _mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t) / self.world

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _validate(self, loss: float | None, tokens_per_s: float) -> None:
        if not self.main:  # rank 0 validates and writes; the others go on to the next step
            return
        st = self.state
        v = valid_loss(self.model, self.valid, self.run_cfg)
        improved = v < st["best_valid"]
        if improved:
            st["best_valid"] = v
            self.save_model()
        if self.cfg.average_last:
            self._snapshot()
        self.save()
        entry = {"step": st["step"], "epoch": st["epoch"], "tokens": st["tokens"], "train_loss": loss,
                 "valid_loss": v, "tokens_per_s": tokens_per_s, "elapsed_s": st["elapsed"],
                 "lr": self.opt.param_groups[0]["lr"]}  # fmt: skip
        self._log_line(entry)
        self.log(f"step {st['step']}: valid loss {v:.3f}{' (best, saved model/)' if improved else ''}, "
                 f"{tokens_per_s:,.0f} tok/s, {st['elapsed'] / 60:.1f} min")  # fmt: skip
