"""Training a :class:`~attnkit.models.Seq2Seq` translator or summarizer on a built corpus.

* :mod:`~attnkit.apps.train.config` -- :class:`TrainConfig`, the run's JSON config;
* :mod:`~attnkit.apps.train.batches` -- pairs encoded and grouped into token-budget batches;
* :mod:`~attnkit.apps.train.steps` -- one optimizer step, the learning-rate schedule, the
  precision chosen by measuring, the validation loss;
* :mod:`~attnkit.apps.train.trainer` -- the loop: checkpoints, resume, Ctrl-C, data
  parallelism under ``torchrun``, checkpoint averaging; :func:`run` is ``attnkit train``.
"""

from .batches import Batch, collate, encode_pairs, source_batch, token_batches
from .config import (
    BATCH_SORTS,
    BF16_MIN_SPEEDUP,
    DEFAULT_RUNS,
    TrainConfig,
    default_run_dir,
    load_config,
)
from .steps import (
    LossModule,
    budget_done,
    choose_precision,
    lr_factor,
    make_optimizer,
    train_step,
    valid_loss,
)
from .trainer import Trainer, run

__all__ = [
    "BATCH_SORTS",
    "BF16_MIN_SPEEDUP",
    "DEFAULT_RUNS",
    "Batch",
    "LossModule",
    "TrainConfig",
    "Trainer",
    "budget_done",
    "choose_precision",
    "collate",
    "default_run_dir",
    "encode_pairs",
    "load_config",
    "lr_factor",
    "make_optimizer",
    "run",
    "source_batch",
    "token_batches",
    "train_step",
    "valid_loss",
]
