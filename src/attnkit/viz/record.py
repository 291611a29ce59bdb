"""Recording attention weights per layer and head, from attnkit models and from Hugging Face
models running on the attnkit integration.

The model computes its outputs as usual (on whatever backend it picks); the recorder sees each
call's queries, keys and mask through an attention hook and computes the weights of the heads it
keeps separately, in float64 with the ``reference`` backend. Outputs are therefore unchanged, and
only the layers and heads asked for are ever materialized.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .._files import atomic_write
from .._hooks import AttentionCall, register_attention_hook
from ..functional import attention
from ..patterns import PerHead

__all__ = ["AttentionRecord", "LayerCapture", "record"]


@dataclass
class LayerCapture:
    """What one attention layer saw, for the heads kept (``capture_inputs=True`` only):
    ``x (B, N, C)`` its input, ``q (B, h, N, D)``, ``k``/``v (B, h, S, D)`` per kept head,
    ``out (B, h, N, Dv)`` the heads' outputs before the output projection, and what the
    queries were allowed to see."""

    x: Tensor | None
    q: Tensor
    k: Tensor
    v: Tensor
    out: Tensor
    allowed: Tensor  # (B, N, S) bool: what each query may attend to (pattern and masks)
    bias: Tensor | None  # (B, N, S) float added to the scores, if the mask was additive


@dataclass
class AttentionRecord:
    """Attention weights of one forward pass.

    Attributes:
        layers: Names of the recorded attention modules, in the order they ran.
        heads: Indices of the kept heads (the same for every layer).
        weights: Per layer, ``(B, len(heads), N, S)`` float32; rows sum to 1 (0 for rows that
            may attend to nothing).
        tokens: Query-side tokens (set by the caller); ``key_tokens`` the key side where it
            differs (cross-attention).
        patterns: Per layer, the ``repr`` of the attnkit pattern in use, or None.
        model: A name for the model.
        captures: Per layer, a :class:`LayerCapture` when recorded with ``capture_inputs``.
    """

    layers: list[str] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)
    tokens: list[str] | None = None
    key_tokens: list[str] | None = None
    patterns: list[str | None] = field(default_factory=list)
    num_heads: int = 0
    model: str = ""
    captures: list[LayerCapture] = field(default_factory=list)

    def layer(self, name_or_index: str | int) -> Tensor:
        """Weights of one layer, by name or position in :attr:`layers`."""
        i = self.layers.index(name_or_index) if isinstance(name_or_index, str) else name_or_index
        return self.weights[i]

    def to_dict(self, *, decimals: int = 5) -> dict:
        """A JSON-ready dict (weights as nested lists rounded to ``decimals``)."""
        return {
            "model": self.model, "layers": self.layers, "heads": self.heads, "num_heads": self.num_heads,
            "tokens": self.tokens, "key_tokens": self.key_tokens, "patterns": self.patterns,
            "weights": [w.round(decimals=decimals).tolist() for w in self.weights],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> AttentionRecord:
        known = {"model", "layers", "heads", "num_heads", "tokens", "key_tokens", "patterns", "weights"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"AttentionRecord.from_dict: unknown fields {sorted(unknown)}.")
        data = dict(data)
        data["weights"] = [torch.tensor(w, dtype=torch.float32) for w in data.get("weights", [])]
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the record as JSON, atomically."""
        text = json.dumps(self.to_dict(), ensure_ascii=False)
        atomic_write(Path(path), lambda p: p.write_text(text, encoding="utf-8"))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttentionRecord:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _check_indices(name: str, values: Sequence[int] | None) -> list[int] | None:
    if values is None:
        return None
    values = list(values)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"record: expected {name} as a non-empty list of indices >= 0, but got {values!r}.")
    return values


class _Recorder:
    def __init__(self, model: nn.Module, rec: AttentionRecord, layers, heads, capture_inputs: bool):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.rec, self.capture = rec, capture_inputs
        self.layers, self.heads = layers, heads
        self.order: dict[int, int] = {}  # module id -> call order (layer index)
        self.slot: dict[int, int] = {}  # module id -> position in rec.layers

    def __call__(self, call: AttentionCall) -> None:
        key = id(call.module)
        if key not in self.names:
            return  # another model's attention
        index = self.order.setdefault(key, len(self.order))
        if self.layers is not None and index not in self.layers:
            return
        H, Hkv = call.q.shape[1], call.k.shape[1]
        heads = list(range(H)) if self.heads is None else self.heads
        if max(heads) >= H:
            raise ValueError(
                f"record: expected heads < {H} (the model's heads per layer), but got {max(heads)}."
            )
        kv = [h // (H // Hkv) for h in heads]
        q, k, v = call.q[:, heads], call.k[:, kv], call.v[:, kv]
        pattern = call.pattern
        if pattern is not None and pattern.per_head:  # the kept heads' own patterns
            pattern = PerHead([pattern.heads[h] for h in heads])
        mask = call.mask
        if mask is not None and mask.dim() == 4 and mask.shape[1] == H:
            mask = mask[:, heads]
        with torch.no_grad():
            _, w = attention(
                q.detach(), k.detach(), v.detach(), pattern=pattern, mask=mask, scale=call.scale,
                return_weights=True, backend="reference",
            )  # fmt: skip
        w = w.float().cpu()
        rec = self.rec
        if not rec.heads:
            rec.heads, rec.num_heads = heads, H
        if key not in self.slot:
            self.slot[key] = len(rec.layers)
            rec.layers.append(self.names[key] or type(call.module).__name__)
            rec.patterns.append(None if call.pattern is None else repr(call.pattern))
            rec.weights.append(w)
            if self.capture:
                allowed, bias = _allowed(call, pattern, q.shape[0], q.shape[2], k.shape[2])
                rec.captures.append(LayerCapture(
                    None if call.x is None else call.x.detach().cpu(), q.detach().cpu(), k.detach().cpu(),
                    v.detach().cpu(), call.out[:, heads].detach().cpu(), allowed, bias,
                ))  # fmt: skip
            return
        # the same module again (step-by-step decoding): append the new query rows; keys seen
        # so far are a prefix of the longest, so shorter rows are padded with zero weight
        i = self.slot[key]
        prev = rec.weights[i]
        S = max(prev.shape[-1], w.shape[-1])
        padded = [torch.nn.functional.pad(t, (0, S - t.shape[-1])) for t in (prev, w)]
        rec.weights[i] = torch.cat(padded, dim=2)


def _allowed(call: AttentionCall, pattern, B: int, N: int, S: int) -> tuple[Tensor, Tensor | None]:
    """``(B, N, S)`` bool of allowed pairs (head-independent masks only) and the additive bias."""
    allowed = torch.ones(B, N, S, dtype=torch.bool)
    if pattern is not None and pattern.per_head:  # the kept heads' patterns
        if len(set(pattern.heads)) > 1:
            raise ValueError(
                "record(capture_inputs=True): the kept heads use different patterns "
                f"({pattern!r}); keep heads that share one (heads=...)."
            )
        pattern = pattern.heads[0]
    if pattern is not None:
        allowed &= pattern.to_dense(N, S).cpu()
    bias = None
    if call.mask is not None:
        m = call.mask.detach().cpu()
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)).expand(B, -1, N, S)[:, 0]
        if m.dtype == torch.bool:
            allowed &= m
        else:
            allowed &= torch.isfinite(m)
            bias = m.double()
    return allowed, bias


@contextlib.contextmanager
def record(
    model: nn.Module,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    capture_inputs: bool = False,
) -> Iterator[AttentionRecord]:
    """Record the attention weights of ``model``'s attention layers while the block runs.

    Args:
        model: An attnkit model (anything built on :class:`attnkit.nn.MultiHeadAttention`) or
            a Hugging Face model loaded with ``attn_implementation="attnkit"``.
        layers: Keep only these attention layers, by the order in which they run (0 = first);
            default all.
        heads: Keep only these heads of each layer; default all.
        capture_inputs: Also keep each layer's input, per-head queries/keys/values and head
            outputs (:attr:`AttentionRecord.captures`), for step-by-step explanations.

    Yields:
        The :class:`AttentionRecord`, filled as the model runs.

    Example:
        >>> with record(encoder, layers=[0, 5]) as rec:
        ...     encoder(ids, mask)
        >>> rec.weights[0].shape  # (B, heads, N, N)
    """
    rec = AttentionRecord(model=type(model).__name__)
    recorder = _Recorder(model, rec, _check_indices("layers", layers), _check_indices("heads", heads),
                         capture_inputs)  # fmt: skip
    handle = register_attention_hook(recorder)
    try:
        yield rec
    finally:
        handle.remove()
    if layers is not None and len(recorder.order) and max(layers) >= len(recorder.order):
        raise ValueError(
            f"record: expected layers < {len(recorder.order)} (the attention layers that ran), but got "
            f"{max(layers)}."
        )
