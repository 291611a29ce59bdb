"""Checkpoint files: configs as frozen dataclasses and safetensors weights (written atomically).

attnkit's own checkpoints are a directory with ``config.json`` (``{"attnkit_model": NAME,
"config": {...}}``) and ``model.safetensors``. Hugging Face directories (``config.json`` with a
``model_type``, ``model.safetensors`` or sharded ``model-0000x-of-0000y.safetensors`` with an
index) are read by the same loader, and each model translates their parameter names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from .._files import atomic_write

__all__ = ["ModelConfig", "load_weights", "read_json", "save_checkpoint"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

C = TypeVar("C", bound="ModelConfig")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of model configs: frozen, validated on construction, JSON round trip."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for values out of range; subclasses extend."""

    def _require(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(
                f"{type(self).__name__}: expected {name} {expected}, but got {name}={getattr(self, name)!r}."
            )

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self._require(name, isinstance(value, int) and not isinstance(value, bool) and value >= 1, ">= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config fields {unknown}; known: {sorted(names)}.")
        return cls(**data)

    def replace(self: C, **changes) -> C:
        return dataclasses.replace(self, **changes)


def check_layer_patterns(config) -> None:
    """Validate a config's ``layer_patterns``: one parseable pattern expression per layer."""
    from ..patterns import parse_pattern

    if config.layer_patterns is None:
        return
    if len(config.layer_patterns) != config.num_layers:
        raise ValueError(
            f"{type(config).__name__}: expected layer_patterns to have one pattern per layer "
            f"(num_layers={config.num_layers}), but got {len(config.layer_patterns)}."
        )
    for text in config.layer_patterns:
        parse_pattern(text)


def layer_patterns(config) -> list | None:
    """A config's per-layer patterns, parsed, or None."""
    from ..patterns import parse_pattern

    return None if config.layer_patterns is None else [parse_pattern(t) for t in config.layer_patterns]


def with_patterns(config: C, patterns) -> C:
    """``config`` with ``patterns`` as its self-attention patterns: a Pattern for every layer
    (``pattern``), a sequence of one per layer (``layer_patterns``), or None (the default)."""
    from ..patterns import Pattern

    if patterns is None:
        changed = config.replace(pattern=None, layer_patterns=None)
    elif isinstance(patterns, Pattern):
        changed = config.replace(pattern=repr(patterns), layer_patterns=None)
    else:
        patterns = list(patterns)
        for i, p in enumerate(patterns):
            if not isinstance(p, Pattern):
                raise TypeError(
                    f"set_patterns: expected patterns[{i}] to be a Pattern, but got {type(p).__name__}."
                )
        changed = config.replace(layer_patterns=tuple(repr(p) for p in patterns))
    return changed  # (replace() validates)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"expected a JSON file at {str(path)!r}, but it does not exist.") from None


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory holding ``config.json``, or a clear error."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"expected a checkpoint directory, but {str(p)!r} is not a directory.")
    if not (p / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"expected {CONFIG_NAME} in the checkpoint directory {str(p)!r}.")
    return p


def load_weights(directory: Path) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` (or of the shards its index lists)."""
    from safetensors.torch import load_file

    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        weights: dict[str, Tensor] = {}
        for shard in shards:
            weights.update(load_file(str(directory / shard)))
        return weights
    raise FileNotFoundError(
        f"expected {WEIGHTS_NAME} or {INDEX_NAME} in {str(directory)!r}; found "
        f"{sorted(p.name for p in directory.iterdir())}."
    )


def save_checkpoint(
    directory: str | os.PathLike, name: str, config: ModelConfig, state: dict[str, Tensor]
) -> Path:
    """Write ``model.safetensors`` then ``config.json`` atomically; returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps({"attnkit_model": name, "config": config.to_dict()}, indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(text + "\n", encoding="utf-8"))
    return directory


def own_config(directory: Path, name: str) -> dict | None:
    """The config dict of an attnkit checkpoint of model ``name``, or None for a foreign one."""
    data = read_json(directory / CONFIG_NAME)
    if "attnkit_model" not in data:
        return None
    if data["attnkit_model"] != name:
        raise ValueError(
            f"expected an attnkit {name} checkpoint in {str(directory)!r}, but it holds "
            f"{data['attnkit_model']}."
        )
    return data["config"]


def rename(
    weights: Mapping[str, Tensor], rules: list[tuple[str, str]], *, drop: str | None = None, strip: str = ""
) -> dict[str, Tensor]:
    """Translate foreign parameter names: ``strip`` a prefix, skip names matching ``drop``, then
    apply the first matching ``(regex, replacement)`` rule (anchored at the start)."""
    compiled = [(re.compile("^" + a), b) for a, b in rules]
    dropped = re.compile(drop) if drop else None
    out = {}
    for name, t in weights.items():
        name = name.removeprefix(strip)
        if dropped is not None and dropped.search(name):
            continue
        for rule, repl in compiled:
            name, hits = rule.subn(repl, name)
            if hits:
                break
        out[name] = t
    return out


def load_state(module: torch.nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what did not match."""
    result = module.load_state_dict(dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{type(module).__name__}: the weights in {source} do not match the model: "
            f"missing {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}."
        )


def from_state(
    cls, config, weights: Mapping[str, Tensor], source: str, *, backend: str, dtype
) -> torch.nn.Module:
    """``cls(config)`` holding ``weights`` (attnkit names), built on the meta device so that no
    parameter is initialized only to be replaced (a 262k-token embedding takes seconds);
    tied output weights are tied again, and tables computed at construction recomputed."""
    from ..nn import RotaryEmbedding

    with torch.device("meta"):
        model = cls(config, backend=backend)
    weights = dict(weights)
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        weights["lm_head.weight"] = weights["embed.weight"]
    model.to_empty(device="cpu")
    load_state(model, weights, source)
    if tied:
        model.lm_head.weight = model.embed.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()
    if dtype is not None:
        model.to(dtype)
    return model.eval()
