"""The training loop: a :class:`~attnkit.models.Seq2Seq` translator or summarizer on a built corpus.

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

import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..._files import atomic_write
from ...data import SPECIAL_TOKENS, DataError, cache_root, load_pairs, read_meta, train_tokenizer
from ...distributed import communication_device
from ...models import Seq2Seq, Tokenizer
from .batches import Batch, collate, encode_pairs, token_batches
from .config import BF16_MIN_SPEEDUP, BOS, EOS, PAD, TrainConfig, default_run_dir, load_config
from .steps import LossModule, budget_done, choose_precision, make_optimizer, train_step, valid_loss

__all__ = ["Trainer", "join_process_group", "resolve_corpus", "run"]


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
        self.net: nn.Module = LossModule(self.model)
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
        choice, seconds = choose_precision(self.net, self._batch(first), cfg.label_smoothing)
        if self.world > 1:  # every rank measured; they take the majority's choice together
            choice = "bf16" if self._mean(1.0 if choice == "bf16" else 0.0) >= 0.5 else "fp32"
        st["precision"] = choice
        if seconds:
            bf16, fp32 = seconds["bf16"], seconds["fp32"]
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
        return communication_device(self.device)

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


def join_process_group(device: str) -> tuple[str, bool]:
    """Under ``torchrun`` (``WORLD_SIZE > 1``), join the process group: NCCL on CUDA (each rank
    on GPU ``LOCAL_RANK``), gloo on CPU, with ``ATTNKIT_DIST_TIMEOUT`` seconds (default 300)
    for every collective. Returns this rank's device and whether the group was started here."""
    import datetime
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    text = os.environ.get("ATTNKIT_DIST_TIMEOUT", "300")
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"ATTNKIT_DIST_TIMEOUT: expected seconds, but got {text!r}.") from None
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=seconds))
    return device, True


def run(
    task: str,
    config: str | Path,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    threads: int | None = None,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    precision: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> int:
    """``attnkit train``: load the config, apply the overrides, join the process group under
    ``torchrun``, train, and print where the run stands. Returns the exit code (130 when
    interrupted and saved)."""
    from ..errors import UsageError, argument, positive, reading

    with reading("--config"):
        cfg = load_config(config)
    if cfg.task != task:
        raise UsageError(f"--config: expected a {task!r} config, but {str(config)!r} has task {cfg.task!r}.")
    overrides = {k: v for k, v in (("max_steps", max_steps), ("max_minutes", max_minutes),
                                   ("precision", precision)) if v is not None}  # fmt: skip
    with argument("--max-steps/--max-minutes"):
        cfg = cfg.replace(**overrides) if overrides else cfg
    if threads is not None:
        positive(threads=threads)
        torch.set_num_threads(threads)
    out = Path(out) if out else default_run_dir(task, cache_dir)
    with argument("ATTNKIT_DIST_TIMEOUT"):
        device, started = join_process_group(device)
    try:
        trainer = Trainer(cfg, out, cache=cache_dir, progress=progress, device=device)
        state = trainer.run(resume=resume)
    finally:
        if started:
            dist.destroy_process_group()
    if trainer.main:
        print(f"{out}: step {state['step']}, best valid loss {state['best_valid']:.3f}, "
              f"{state['elapsed'] / 60:.1f} min of training")  # fmt: skip
    return 130 if state.get("interrupted") else 0
