"""What attnkit's decoder-only language models share: generation, checkpoints, parameter count.

A model subclasses :class:`CausalLM` and sets ``model_name`` (the name in attnkit checkpoints),
``config_class`` (a :class:`~attnkit.models._io.ModelConfig` with ``from_hf``) and
``_from_hf_names`` (Hugging Face parameter names to its own).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .._hooks import hooks_active
from ._io import checkpoint_dir, from_state, load_weights, own_config, read_json, save_checkpoint
from .generation import generate

__all__ = ["CausalLM"]


class CausalLM(nn.Module):
    """Base of :class:`~attnkit.models.DecoderLM` and :class:`~attnkit.models.Gemma3LM`."""

    model_name: str
    config_class: type

    @staticmethod
    def _from_hf_names(weights: dict[str, Tensor]) -> dict[str, Tensor]:
        return weights

    def _last_rows(
        self, logits_to_keep: int | None, tokens: int, *, all_rows_needed: bool = False
    ) -> int | None:
        """The rows the last layer computes: ``logits_to_keep`` when it keeps fewer than all
        ``tokens`` positions' logits, so the last layer runs those rows' queries, attention and
        feed-forward alone (every layer before it must run on all positions: their outputs are
        the next layer's keys and values). None where every row is needed: all logits kept,
        per-layer weights asked (``all_rows_needed``), attention hooks recording every call
        (``attnkit.fit``, ``attnkit.viz``), or context parallelism (each rank holds a shard).
        Also checks ``logits_to_keep`` (None or an int >= 0; 0 keeps all, as in transformers)."""
        if logits_to_keep is None:
            return None
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(
                f"{type(self).__name__}: expected logits_to_keep to be None or an int >= 0, but got "
                f"{logits_to_keep!r}."
            )
        if not 0 < logits_to_keep < tokens or all_rows_needed or hooks_active():
            return None
        if getattr(self, "context_parallel", None) is not None:
            return None
        return logits_to_keep

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, **options) -> Tensor:
        """The prompt followed by up to ``max_new_tokens`` new tokens: ``(B, T + new)``; see
        :func:`attnkit.models.generation.generate` for the options (sampling, padding, eos,
        cache, streamer)."""
        return generate(self, input_ids, max_new_tokens, **options)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, backend: str = "auto", dtype: torch.dtype | None = None
    ):
        """Load an attnkit checkpoint of this model, or a Hugging Face directory of its family."""
        directory = checkpoint_dir(path)
        own = own_config(directory, cls.model_name)
        config = (
            cls.config_class.from_dict(own) if own is not None
            else cls.config_class.from_hf(read_json(directory / "config.json"))
        )  # fmt: skip
        weights = load_weights(directory)
        if own is None:
            weights = cls._from_hf_names(weights)
        return cls.from_state(config, weights, str(directory), backend=backend, dtype=dtype)

    @classmethod
    def from_state(cls, config, weights: dict[str, Tensor], source: str, *, backend: str = "auto",
                   dtype: torch.dtype | None = None):  # fmt: skip
        """A model of ``config`` holding attnkit-named ``weights`` (from any checkpoint format),
        built without initializing the parameters the weights replace."""
        return from_state(cls, config, weights, source, backend=backend, dtype=dtype)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write an attnkit checkpoint (``config.json`` + ``model.safetensors``), atomically."""
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        return save_checkpoint(path, self.model_name, self.config, state)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
