"""The configuration of a training run: :class:`TrainConfig` and its JSON file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ...models import Seq2SeqConfig
from ...models._io import ModelConfig

__all__ = [
    "BATCH_SORTS", "BF16_MIN_SPEEDUP", "DEFAULT_RUNS", "LR_SCHEDULES", "PRECISIONS", "TASKS", "TrainConfig",
    "default_run_dir", "load_config",
]  # fmt: skip

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
            from ...data.libreoffice import SOURCES

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


#: The run directory each task's commands use when none is given (under the data cache).
DEFAULT_RUNS = {"translate": "translate-en-de", "summarize": "summarize-debian"}


def default_run_dir(task: str, cache_dir: str | Path | None = None) -> Path:
    """``CACHE/runs/<task corpus>``: where ``attnkit train`` writes and the task commands read
    when no directory is given."""
    from ...data import cache_root

    return cache_root(cache_dir) / "runs" / DEFAULT_RUNS[task]
