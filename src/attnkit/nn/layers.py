"""Transformer blocks on attnkit attention: norms, feed-forwards, encoder and decoder layers.

One block is ``x + Attention(x)`` followed by ``x + FeedForward(x)``, each with a norm either
before the sub-layer (pre-norm: GPT-2, Llama, most models trained today) or after the residual
sum (post-norm: the original Transformer, BERT). A decoder block adds cross-attention to an
encoder's output between the two. Every option checkpoints in the wild use is a constructor
argument, so one class covers BERT, Llama, Mistral and the translation Transformer:

=============  ===========  ========  =============  ==========
model          norm_first   norm      activation     positions
=============  ===========  ========  =============  ==========
BERT           False        layer     gelu           learned
Llama          True         rms       swiglu         rotary
Transformer    False/True   layer     relu           sinusoidal
=============  ===========  ========  =============  ==========
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..patterns import Causal, Pattern
from ._rows import in_row_blocks
from .attention import MultiHeadAttention, reject_unknown_keywords
from .dropout import Dropout
from .kv_cache import KVCache
from .positional import RotaryEmbedding

__all__ = [
    "Decoder",
    "DecoderCache",
    "DecoderLayer",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "LayerCache",
    "RMSNorm",
    "make_norm",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / sqrt(mean(x^2) + eps) * weight`` (Zhang & Sennrich 2019).

    Computed in float32 and cast back before the weight, as Llama checkpoints expect. With
    ``unit_offset`` the scale is ``1 + weight``, multiplied in float32 before the cast (Gemma's
    norms, whose checkpoints store the offset from 1).
    """

    def __init__(
        self, dim: int, eps: float = 1e-6, *, unit_offset: bool = False, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # three passes over x: torch's rms_norm on CPU is pow, mean and two multiplies (five,
            # and a temporary); equal to rounding (tests/nn/test_layers.py)
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            inv = torch.rsqrt(norm.square() / x.shape[-1] + self.eps)
            scale = 1.0 + self.weight if self.unit_offset else self.weight
            if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
                return x * inv * scale
            return (x * inv).mul_(scale)  # in place: no graph keeps the product
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", unit_offset=True" if self.unit_offset else "")


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """``"layer"`` -> :class:`torch.nn.LayerNorm`, ``"rms"`` -> :class:`RMSNorm`."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"make_norm: expected norm 'layer' or 'rms', but got {kind!r}.")


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
_GATED = {
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # Gemma's
    "reglu": F.relu,
}
ACTIVATIONS = tuple(_ACTIVATIONS) + tuple(_GATED)


class FeedForward(nn.Module):
    """Position-wise feed-forward: ``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))``.

    Args:
        dim: Model width ``C``.
        hidden_dim: Inner width.
        activation: ``relu``, ``gelu`` (exact erf), ``gelu_tanh``, ``silu``, or the gated
            ``swiglu`` (Llama), ``geglu``, ``geglu_tanh`` (Gemma), ``reglu`` (Shazeer 2020,
            https://arxiv.org/abs/2002.05202).
        bias: Biases on the projections.
        dropout: Dropout after the activation.

    Shape: ``(..., C) -> (..., C)``.
    """

    def __init__(
        self, dim: int, hidden_dim: int, activation: str = "gelu", *, bias: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"FeedForward: expected activation in {ACTIVATIONS}, but got {activation!r}.")
        self.activation = activation
        self.gated = activation in _GATED
        self.act = _GATED[activation] if self.gated else _ACTIVATIONS[activation]
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias) if self.gated else None
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # without autograd, long inputs run in blocks of rows (see ``_rows``): at 32k tokens
        # that is ~12% faster on 2 cores than one block
        return in_row_blocks(self._compute, x, widest=self.up_proj.out_features)

    def _compute(self, x: Tensor) -> Tensor:
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(self.dropout(h) if self.training else h)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


@dataclass
class LayerCache:
    """One decoder layer's caches: its self-attention keys/values and its cross-attention ones."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)


class DecoderCache:
    """Per-layer :class:`LayerCache` of a decoder, for incremental decoding and beam search."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(num_layers)]

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        """Positions already in the self-attention caches."""
        return self.layers[0].self_attn.length if self.layers else 0

    def reserve(self, positions: int) -> None:
        """Size every self-attention cache for ``positions`` in all (see :meth:`KVCache.reserve`)."""
        for layer in self.layers:
            layer.self_attn.reserve(positions)

    @property
    def nbytes(self) -> int:
        """Bytes the self- and cross-attention caches hold (buffer capacity included)."""
        return sum(c.nbytes for layer in self.layers for c in (layer.self_attn, layer.cross_attn))

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` in every cache (beam search)."""
        for layer in self.layers:
            for cache in (layer.self_attn, layer.cross_attn):
                if not cache.is_empty:
                    cache.reorder(index)

    def reset(self) -> None:
        for layer in self.layers:
            layer.self_attn.reset()
            layer.cross_attn.reset()


def _identity(x: Tensor) -> Tensor:
    return x


class _Block(nn.Module):
    """Shared residual wiring of encoder and decoder layers."""

    norm_first: bool

    def _sublayer(
        self, x: Tensor, norm: nn.Module, fn: Callable[[Tensor], Tensor], last_rows: int | None = None
    ) -> Tensor:
        """``fn``'s residual sub-layer; with ``last_rows``, ``fn`` returns only the last rows
        (self-attention's ``last_rows``) and so does the sub-layer."""
        drop = self.dropout if self.training else _identity
        residual = x if last_rows is None else x[:, -last_rows:]
        if self.norm_first:
            return residual + drop(fn(norm(x)))
        return norm(residual + drop(fn(x)))

    def _ffn_sublayer(self, x: Tensor) -> Tensor:
        """The feed-forward with its norm and residual, token by token: long inputs without
        autograd run in blocks of rows (``_rows``)."""
        return in_row_blocks(
            lambda rows: self._sublayer(rows, self.norm2, self.ffn), x, widest=self.ffn.up_proj.out_features
        )

    def _init_common(
        self, dim, num_heads, ffn_dim, *, num_kv_heads, head_dim, activation, norm, norm_eps, norm_first,
        dropout, attention_dropout, bias, ffn_bias, pattern, rotary, backend,
    ) -> dict:  # fmt: skip
        self.norm_first = norm_first
        self.dropout = Dropout(dropout)
        attn_kwargs = dict(
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            bias=bias,
            dropout=dropout if attention_dropout is None else attention_dropout,
            backend=backend,
        )
        self.self_attn = MultiHeadAttention(dim, num_heads, pattern=pattern, rotary=rotary, **attn_kwargs)
        self.norm1 = make_norm(norm, dim, norm_eps)
        self.ffn = FeedForward(
            dim, ffn_dim, activation, bias=bias if ffn_bias is None else ffn_bias, dropout=dropout
        )
        return attn_kwargs


class EncoderLayer(_Block):
    """Self-attention + feed-forward, pre- or post-norm.

    Args:
        dim: Model width ``C``.
        num_heads: Query heads.
        ffn_dim: Feed-forward inner width.
        num_kv_heads: Key/value heads (GQA/MQA); default ``num_heads``.
        head_dim: Per-head width; default ``dim // num_heads``.
        activation: Feed-forward activation (see :class:`FeedForward`); default ``"relu"``.
        norm: ``"layer"`` or ``"rms"``.
        norm_eps: The norm's epsilon.
        norm_first: Pre-norm if True, post-norm (BERT, the 2017 Transformer) if False, the
            default.
        dropout: Dropout on each sub-layer's output and inside the feed-forward; 0.1 by default.
        attention_dropout: Dropout on the attention weights; None (the default): ``dropout``.
        bias: Biases on the attention projections.
        ffn_bias: Biases on the feed-forward projections; default ``bias``.
        pattern: Attention pattern of the self-attention (e.g. ``SlidingWindow(128, 128)``).
        rotary: Rotary embedding for the self-attention.
        backend: attnkit backend name.

    The keywords it shares with ``torch.nn.TransformerEncoderLayer`` (``activation``,
    ``norm_first``, ``dropout``, ``bias``) mean what torch's mean, with torch's defaults: a
    post-norm ReLU layer with dropout 0.1 on the sub-layers and the attention weights. Models
    choose theirs explicitly (Llama: pre-norm RMSNorm SwiGLU; BERT: post-norm GELU).

    Shape:
        ``x (B, N, C)`` -> ``(B, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        activation: str = "relu",
        norm: str = "layer",
        norm_eps: float = 1e-5,
        norm_first: bool = False,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        bias: bool = True,
        ffn_bias: bool | None = None,
        pattern: Pattern | None = None,
        rotary: RotaryEmbedding | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self._init_common(
            dim, num_heads, ffn_dim, num_kv_heads=num_kv_heads, head_dim=head_dim, activation=activation,
            norm=norm, norm_eps=norm_eps, norm_first=norm_first, dropout=dropout,
            attention_dropout=attention_dropout, bias=bias, ffn_bias=ffn_bias, pattern=pattern,
            rotary=rotary, backend=backend,
        )  # fmt: skip
        self.norm2 = make_norm(norm, dim, norm_eps)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        pattern: Pattern | None = None,
        positions: Tensor | None = None,
        need_weights: bool = False,
        **unknown: object,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``mask``/``key_mask``/``pattern`` as in :class:`MultiHeadAttention`;
        ``need_weights`` also returns this layer's attention weights ``(B, H, N, N)``."""
        reject_unknown_keywords(type(self).__name__, unknown)
        weights = None

        def attend(h: Tensor) -> Tensor:
            nonlocal weights
            out = self.self_attn(
                h, mask=mask, key_mask=key_mask, pattern=pattern,
                positions=positions, return_weights=need_weights,
            )  # fmt: skip
            if need_weights:
                out, weights = out
            return out

        x = self._sublayer(x, self.norm1, attend)
        x = self._ffn_sublayer(x)
        return (x, weights) if need_weights else x


class DecoderLayer(_Block):
    """Causal self-attention, cross-attention to an encoder's output, feed-forward.

    Takes the arguments of :class:`EncoderLayer` (the self-attention pattern defaults to
    ``Causal()``), plus ``cross_attention`` (False gives a decoder-only block, as in GPT and
    Llama) and ``memory_dim`` (the encoder's width, default ``dim``).

    Shape:
        ``x (B, N, C)``, ``memory (B, S, memory_dim)`` -> ``(B, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        cross_attention: bool = True,
        memory_dim: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        activation: str = "relu",
        norm: str = "layer",
        norm_eps: float = 1e-5,
        norm_first: bool = False,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        bias: bool = True,
        ffn_bias: bool | None = None,
        pattern: Pattern | None = None,
        rotary: RotaryEmbedding | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        attn_kwargs = self._init_common(
            dim, num_heads, ffn_dim, num_kv_heads=num_kv_heads, head_dim=head_dim, activation=activation,
            norm=norm, norm_eps=norm_eps, norm_first=norm_first, dropout=dropout,
            attention_dropout=attention_dropout, bias=bias, ffn_bias=ffn_bias,
            pattern=Causal() if pattern is None else pattern, rotary=rotary, backend=backend,
        )  # fmt: skip
        if cross_attention:
            self.cross_attn = MultiHeadAttention(dim, num_heads, context_dim=memory_dim, **attn_kwargs)
            self.norm_cross = make_norm(norm, dim, norm_eps)
        else:
            self.cross_attn = self.norm_cross = None
        self.norm2 = make_norm(norm, dim, norm_eps)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        memory_key_mask: Tensor | None = None,
        pattern: Pattern | None = None,
        positions: Tensor | None = None,
        cache: LayerCache | None = None,
        need_weights: bool | str = False,
        last_rows: int | None = None,
        **unknown: object,
    ) -> Tensor | tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
        """Decode ``x`` against ``memory``.

        ``key_mask (B, S_self)`` covers every self-attention key, the cached ones
        included; ``memory_key_mask (B, S)`` the encoder's. With ``cache``, ``x``
        holds only the new positions. ``need_weights`` also returns
        ``(self_weights, cross_weights)``: ``True`` computes both, ``"self"`` or ``"cross"``
        only that one (the other is None, and its attention keeps the fused kernels).
        ``last_rows``: the output of the last ``last_rows`` positions only ``(B, last_rows,
        C)``; every position's keys and values still feed the self-attention (and the cache).
        """
        reject_unknown_keywords(type(self).__name__, unknown)
        _check_need_weights(type(self).__name__, need_weights)
        if self.cross_attn is None and memory is not None:
            raise ValueError(
                "DecoderLayer: expected memory=None (built with cross_attention=False), but got a tensor."
            )
        if self.cross_attn is not None and memory is None and (cache is None or cache.cross_attn.is_empty):
            raise ValueError(
                "DecoderLayer: expected memory (the encoder output), but got None and no filled cache."
            )
        weights: list[Tensor | None] = [None, None]
        want_self, want_cross = need_weights in (True, "self"), need_weights in (True, "cross")

        def self_attend(h: Tensor) -> Tensor:
            out = self.self_attn(
                h, mask=mask, key_mask=key_mask, pattern=pattern, positions=positions,
                cache=None if cache is None else cache.self_attn, return_weights=want_self,
                last_rows=last_rows,
            )  # fmt: skip
            if want_self:
                out, weights[0] = out
            return out

        def cross_attend(h: Tensor) -> Tensor:
            out = self.cross_attn(
                h, memory, key_mask=memory_key_mask,
                cache=None if cache is None else cache.cross_attn, return_weights=want_cross,
            )  # fmt: skip
            if want_cross:
                out, weights[1] = out
            return out

        x = self._sublayer(x, self.norm1, self_attend, last_rows)
        if self.cross_attn is not None:
            x = self._sublayer(x, self.norm_cross, cross_attend)
        x = self._ffn_sublayer(x)
        return (x, tuple(weights)) if need_weights else x


class _Stack(nn.Module):
    def _build(self, layer: nn.Module, num_layers: int, final_norm: nn.Module | None) -> None:
        if num_layers < 1:
            raise ValueError(f"{type(self).__name__}: expected num_layers >= 1, but got {num_layers}.")
        # rotary embeddings hold no weights: the copies share the template's, and its angle cache
        shared = {id(m): m for m in layer.modules() if isinstance(m, RotaryEmbedding)}
        copies = [copy.deepcopy(layer, memo=dict(shared)) for _ in range(num_layers - 1)]
        self.layers = nn.ModuleList([layer, *copies])
        for copied in self.layers[1:]:  # fresh initial weights per layer, not num_layers clones
            _reinit(copied)
        self.norm = final_norm

    def _per_layer(self, pattern) -> list:
        """``pattern`` for each layer: one pattern (or None) for all, or a sequence of one per layer."""
        if pattern is None or isinstance(pattern, Pattern):
            return [pattern] * len(self.layers)
        patterns = list(pattern)
        if len(patterns) != len(self.layers):
            raise ValueError(
                f"{type(self).__name__}: expected a pattern or one pattern per layer "
                f"({len(self.layers)}), but got {len(patterns)} patterns."
            )
        return patterns


def _check_need_weights(owner: str, need_weights: object) -> None:
    if not (
        isinstance(need_weights, bool)
        or (isinstance(need_weights, str) and need_weights in ("self", "cross"))
    ):
        raise ValueError(
            f"{owner}: expected need_weights to be True, False, 'self' or 'cross', but got {need_weights!r}."
        )


def _reinit(module: nn.Module) -> None:
    """``reset_parameters`` of the outermost modules that have one."""
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    for child in module.children():
        _reinit(child)


class Encoder(_Stack):
    """``num_layers`` encoder layers (each freshly initialised) and an optional final norm.

    Args:
        layer: An :class:`EncoderLayer`, the template.
        num_layers: How many.
        norm: Norm after the last layer (pre-norm models need one), or None.

    Shape: ``x (B, N, C) -> (B, N, C)``; with ``need_weights``, also a list of per-layer
    weights ``(B, H, N, N)``. ``pattern`` in ``forward`` is one pattern for every layer or a
    sequence of one per layer.
    """

    def __init__(self, layer: EncoderLayer, num_layers: int, norm: nn.Module | None = None) -> None:
        super().__init__()
        self._build(layer, num_layers, norm)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        pattern: Pattern | None = None,
        positions: Tensor | None = None,
        need_weights: bool = False,
        **unknown: object,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        reject_unknown_keywords(type(self).__name__, unknown)
        all_weights = []
        for layer, layer_pattern in zip(self.layers, self._per_layer(pattern), strict=True):
            x = layer(
                x, mask=mask, key_mask=key_mask, pattern=layer_pattern, positions=positions,
                need_weights=need_weights,
            )  # fmt: skip
            if need_weights:
                x, w = x
                all_weights.append(w)
        if self.norm is not None:
            x = self.norm(x)
        return (x, all_weights) if need_weights else x


class Decoder(_Stack):
    """``num_layers`` decoder layers and an optional final norm; see :class:`DecoderLayer`.

    Shape: ``x (B, N, C)``, ``memory (B, S, C_mem)`` -> ``(B, N, C)``; with ``need_weights``,
    also a list of per-layer ``(self_weights, cross_weights)``: ``need_weights`` is ``True``,
    ``"self"`` or ``"cross"`` as in :class:`DecoderLayer`, and ``weights_layers`` (indices,
    negative ones from the end; default all) names the layers that compute them. The others
    give ``(None, None)`` and keep the fused kernels. ``pattern`` in ``forward`` is one
    self-attention pattern for every layer or a sequence of one per layer. ``last_rows``
    returns the last ``last_rows`` positions only ``(B, last_rows, C)``: every layer but the
    last runs on all positions (their outputs are the next layer's keys and values), the last
    one on those rows alone (:meth:`DecoderLayer.forward`), as a language model's prefill
    needs for its last logits.
    """

    def __init__(self, layer: DecoderLayer, num_layers: int, norm: nn.Module | None = None) -> None:
        super().__init__()
        self._build(layer, num_layers, norm)

    def new_cache(self) -> DecoderCache:
        """An empty cache with one :class:`LayerCache` per layer."""
        return DecoderCache(len(self.layers))

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        memory_key_mask: Tensor | None = None,
        pattern: Pattern | None = None,
        positions: Tensor | None = None,
        cache: DecoderCache | None = None,
        need_weights: bool | str = False,
        weights_layers: Sequence[int] | None = None,
        last_rows: int | None = None,
        **unknown: object,
    ) -> Tensor | tuple[Tensor, list]:
        reject_unknown_keywords(type(self).__name__, unknown)
        _check_need_weights(type(self).__name__, need_weights)
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(
                f"Decoder: expected a cache with {len(self.layers)} layers, but got {len(cache)}."
            )
        n = len(self.layers)
        asked = range(n) if weights_layers is None else list(weights_layers)
        bad = [i for i in asked if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n]
        if bad:
            raise ValueError(
                f"Decoder: expected weights_layers to hold layer indices in [-{n}, {n}), but got {bad}."
            )
        asked = {i % n for i in asked} if need_weights else set()
        all_weights = []
        for i, (layer, layer_pattern) in enumerate(zip(self.layers, self._per_layer(pattern), strict=True)):
            x = layer(
                x, memory, mask=mask, key_mask=key_mask,
                memory_key_mask=memory_key_mask, pattern=layer_pattern, positions=positions,
                cache=None if cache is None else cache[i], need_weights=need_weights if i in asked else False,
                last_rows=last_rows if i == n - 1 else None,
            )  # fmt: skip
            if i in asked:
                x, w = x
                all_weights.append(w)
            elif need_weights:
                all_weights.append((None, None))
        if self.norm is not None:
            x = self.norm(x)
        return (x, all_weights) if need_weights else x
