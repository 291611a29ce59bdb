"""``Gemma3LM``: Gemma 3's text decoder on attnkit, local sliding-window layers block-sparse.

Gemma 3 (Gemma Team 2025, https://arxiv.org/abs/2503.19786) interleaves five *local* layers,
whose queries see a window of the last ``sliding_window`` tokens, with one *global* layer that
sees every earlier token. Per layer: RMSNorm with a ``1 + weight`` scale before and after both
the attention and the feed-forward, QK-norm, grouped-query attention scaled by
``query_pre_attn_scalar ** -0.5``, rotary embeddings with base 10,000 on local layers and
1,000,000 on global ones, and a GeGLU feed-forward (tanh GELU); the embeddings are scaled by
``sqrt(hidden_size)`` and tied to the output.

The local layers run ``SlidingWindow(sliding_window - 1)``, so attnkit's block-sparse backend
computes only the window's tiles (their cost grows with the window, not with ``N^2``), and
their KV caches keep only the window (:class:`~attnkit.nn.KVCache` with ``window``): a decode's
cache memory for those layers is constant however long the text.

Loads Hugging Face ``gemma3_text`` directories and GGUF files (:func:`attnkit.models.load`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..nn import DecoderCache, FeedForward, KVCache, MultiHeadAttention, RMSNorm, RotaryEmbedding
from ..nn._rows import in_row_blocks
from ..patterns import Causal, Pattern, SlidingWindow
from ._io import (
    ModelConfig,
    rename,
)
from ._lm import CausalLM

__all__ = ["Gemma3Config", "Gemma3LM"]


@dataclasses.dataclass(frozen=True)
class Gemma3Config(ModelConfig):
    """Shape of a :class:`Gemma3LM`; field names follow ``transformers``' ``Gemma3TextConfig``.

    ``layer_types``: per layer ``"sliding_attention"`` (local) or ``"full_attention"``
    (global); default: every ``sliding_window_pattern``-th layer global, the others local.
    ``rope_theta`` is the global layers' rotary base, ``rope_local_base_freq`` the local
    layers'; ``rope_scaling`` (``transformers``' dict, e.g. linear) applies to global layers.
    """

    vocab_size: int = 262144
    hidden_size: int = 640
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    intermediate_size: int = 2048
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict | None = None
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float = 256
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0

    def validate(self) -> None:
        self._positive("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        self._positive(
            "intermediate_size", "max_position_embeddings", "sliding_window", "sliding_window_pattern"
        )
        self._require("num_kv_heads", self.num_heads % self.num_kv_heads == 0,
                      f"to divide num_heads={self.num_heads}")  # fmt: skip
        self._require("head_dim", self.head_dim % 2 == 0, "even (rotary pairs)")
        self._require("query_pre_attn_scalar", self.query_pre_attn_scalar > 0, "> 0")
        if self.layer_types is not None:
            ok = len(self.layer_types) == self.num_layers and set(self.layer_types) <= set(LAYER_TYPES)
            self._require("layer_types", ok, f"one of {LAYER_TYPES} per layer ({self.num_layers})")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, list) else (self.eos_token_id,)

    @property
    def resolved_layer_types(self) -> tuple[str, ...]:
        if self.layer_types is not None:
            return tuple(self.layer_types)
        k = self.sliding_window_pattern
        return tuple(
            "full_attention" if (i + 1) % k == 0 else "sliding_attention" for i in range(self.num_layers)
        )

    @classmethod
    def from_hf(cls, hf: dict) -> Gemma3Config:
        """From a Hugging Face ``config.json`` of model_type ``gemma3_text`` (or ``gemma3``'s
        ``text_config``)."""
        if hf.get("model_type") == "gemma3" and "text_config" in hf:
            hf = hf["text_config"]
        if hf.get("model_type") not in ("gemma3_text", None):
            raise ValueError(
                f"Gemma3Config: expected model_type 'gemma3_text', but got {hf.get('model_type')!r}."
            )
        for key in ("attn_logit_softcapping",):
            if hf.get(key) is not None:
                raise NotImplementedError(f"Gemma3Config: {key}={hf[key]} is not supported.")
        act = hf.get("hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(
                f"Gemma3Config: expected hidden_activation 'gelu_pytorch_tanh', but got {act!r}."
            )
        rope = hf.get("rope_parameters") or {}
        full = rope.get("full_attention", {}) if isinstance(rope.get("full_attention"), dict) else rope
        local = rope.get("sliding_attention", {}) if isinstance(rope.get("sliding_attention"), dict) else {}
        scaling = hf.get("rope_scaling") or ({k: v for k, v in full.items() if k != "rope_theta"} or None)
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads", 1),
            head_dim=hf.get("head_dim", 256), intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(full.get("rope_theta", hf.get("rope_theta", 1_000_000.0))),
            rope_local_base_freq=float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))),
            rope_scaling=scaling, sliding_window=hf.get("sliding_window", 512),
            sliding_window_pattern=hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)),
            layer_types=tuple(hf["layer_types"]) if hf.get("layer_types") else None,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            tie_word_embeddings=hf.get("tie_word_embeddings", True), bos_token_id=hf.get("bos_token_id", 2),
            eos_token_id=hf.get("eos_token_id", 1), pad_token_id=hf.get("pad_token_id", 0),
        )  # fmt: skip


LAYER_TYPES = ("sliding_attention", "full_attention")


class Gemma3Layer(nn.Module):
    """One Gemma 3 block: norms around the attention and the feed-forward, residuals after.

    ``x + post_attn_norm(attn(input_norm(x)))``, then ``x + post_ffn_norm(ffn(pre_ffn_norm(x)))``.
    """

    def __init__(self, c: Gemma3Config, *, local: bool, rotary: RotaryEmbedding, backend: str) -> None:
        super().__init__()
        self.local = local

        def norm(dim: int) -> RMSNorm:
            return RMSNorm(dim, c.rms_norm_eps, unit_offset=True)

        pattern = SlidingWindow(c.sliding_window - 1) if local else Causal()
        self.self_attn = MultiHeadAttention(
            c.hidden_size, c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, bias=False,
            pattern=pattern, rotary=rotary, qk_norm=norm, scale=c.query_pre_attn_scalar**-0.5,
            backend=backend,
        )  # fmt: skip
        self.input_norm, self.post_attn_norm = norm(c.hidden_size), norm(c.hidden_size)
        self.pre_ffn_norm, self.post_ffn_norm = norm(c.hidden_size), norm(c.hidden_size)
        self.ffn = FeedForward(c.hidden_size, c.intermediate_size, "geglu_tanh", bias=False)

    def forward(
        self,
        x: Tensor,
        *,
        key_mask: Tensor | None,
        positions: Tensor,
        cache: KVCache | None,
        last_rows: int | None = None,
    ) -> Tensor:
        """``x (B, N, C)`` -> ``(B, N, C)``; with ``last_rows``, the last ``last_rows``
        positions' output only (every position's keys and values still attended)."""
        h = in_row_blocks(self.input_norm, x, widest=x.shape[-1])
        a = self.self_attn(h, key_mask=key_mask, positions=positions, cache=cache, last_rows=last_rows)
        if last_rows is not None:
            x = x[:, -last_rows:]
        return in_row_blocks(self._after_attention, x, a, widest=self.ffn.up_proj.out_features)

    def _after_attention(self, x: Tensor, a: Tensor) -> Tensor:
        """The attention's residual and the feed-forward, token by token (so long inputs run
        in blocks of rows: ``attnkit.nn._rows``)."""
        x = x + self.post_attn_norm(a)
        return x + self.post_ffn_norm(self.ffn(self.pre_ffn_norm(x)))


class Gemma3LM(CausalLM):
    """Gemma 3's text decoder (see the module docstring).

    Args:
        config: A :class:`Gemma3Config`.
        backend: attnkit backend for every layer (``"auto"``: the local layers' windows run
            block-sparse on CPU).

    Shape:
        ``forward(input_ids (B, T))`` -> logits ``(B, T, V)`` (``(B, logits_to_keep, V)``).

    Example:
        >>> lm = Gemma3LM(Gemma3Config(vocab_size=100, hidden_size=64, num_layers=6, num_heads=2,
        ...                            head_dim=32, intermediate_size=128, sliding_window=8))
        >>> lm.generate(torch.tensor([[2, 5, 7]]), max_new_tokens=4).shape
        torch.Size([1, 7])
    """

    model_name = "Gemma3LM"
    config_class = Gemma3Config

    @staticmethod
    def _from_hf_names(weights: dict[str, Tensor]) -> dict[str, Tensor]:
        return rename(weights, _HF_RULES, drop=r"rotary_emb\.inv_freq$|^vision_tower|^multi_modal")

    def __init__(self, config: Gemma3Config, *, backend: str = "auto") -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        local_rope = RotaryEmbedding(c.head_dim, c.rope_local_base_freq)
        global_rope = RotaryEmbedding(c.head_dim, c.rope_theta, scaling=c.rope_scaling)
        self.layers = nn.ModuleList(
            Gemma3Layer(c, local=kind == "sliding_attention", backend=backend,
                        rotary=local_rope if kind == "sliding_attention" else global_rope)
            for kind in c.resolved_layer_types
        )  # fmt: skip
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, unit_offset=True)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def layer_kinds(self) -> list[str]:
        """``"local"`` or ``"global"`` per layer."""
        return ["local" if layer.local else "global" for layer in self.layers]

    def set_patterns(self, patterns: Pattern | list[Pattern] | None) -> None:
        """Run self-attention with ``patterns``: one for every layer, one per layer, or None for
        the model's own (a window on local layers, causal on global ones). Keep them within the
        model's own: a local layer's cache keeps only its window."""
        own = [
            SlidingWindow(self.config.sliding_window - 1) if layer.local else Causal()
            for layer in self.layers
        ]
        if patterns is None:
            chosen = own
        elif isinstance(patterns, Pattern):
            chosen = [patterns] * len(self.layers)
        else:
            chosen = list(patterns)
            if len(chosen) != len(self.layers):
                raise ValueError(
                    f"Gemma3LM.set_patterns: expected {len(self.layers)} patterns (one per layer), but got "
                    f"{len(chosen)}."
                )
        for layer, p in zip(self.layers, chosen, strict=True):
            layer.self_attn.pattern = p

    def new_cache(self) -> DecoderCache:
        """An empty cache for :meth:`forward`: local layers keep only their window."""
        cache = DecoderCache(len(self.layers))
        for layer, entry in zip(self.layers, cache.layers, strict=True):
            entry.self_attn = KVCache(window=self.config.sliding_window - 1 if layer.local else None)
        return cache

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        cache: DecoderCache | None = None,
        logits_to_keep: int | None = None,
    ) -> Tensor:
        """Logits ``(B, T, V)`` for ``input_ids (B, T)``.

        Args:
            attention_mask: ``(B, L + T)`` 1/True for real tokens over everything the cache
                has seen plus these tokens (left padding); None = all real.
            position_ids: ``(B, T)`` or ``(T,)``; default counts on from the cache length.
            cache: A :meth:`new_cache`.
            logits_to_keep: Project only the last this many positions onto the vocabulary;
                the last layer then computes only those positions (0 or None: every position).
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"Gemma3LM: expected input_ids int64 of shape (B, T), but got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}."
            )
        past = 0 if cache is None else cache.length
        key_mask = None
        if attention_mask is not None:
            want = (input_ids.shape[0], past + input_ids.shape[1])
            if tuple(attention_mask.shape) != want:
                raise ValueError(
                    f"Gemma3LM: expected attention_mask of shape (B, cached + T)={want}, but got "
                    f"{tuple(attention_mask.shape)}."
                )
            key_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids)
        x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)
        last = self._last_rows(logits_to_keep, input_ids.shape[1])
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i].self_attn
            mask = key_mask
            if mask is not None and layer_cache is not None and layer_cache.window is not None:
                mask = mask[:, -min(mask.shape[1], layer_cache.window + input_ids.shape[1]) :]
            x = layer(x, key_mask=mask, positions=position_ids, cache=layer_cache,
                      last_rows=last if i == len(self.layers) - 1 else None)  # fmt: skip
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(x))
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def extra_repr(self) -> str:
        kinds = self.layer_kinds
        return (f"parameters={self.num_parameters() / 1e6:.1f}M, layers={len(kinds)} "
                f"({kinds.count('local')} local, {kinds.count('global')} global)")  # fmt: skip


_HF_RULES = [
    (r"(?:language_model\.)?model\.embed_tokens\.", "embed."),
    (r"(?:language_model\.)?model\.norm\.", "norm."),
    (r"(?:language_model\.)?model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.self_attn.out_proj."),
    (r"(?:language_model\.)?model\.layers\.(\d+)\.self_attn\.", r"layers.\1.self_attn."),
    (r"(?:language_model\.)?model\.layers\.(\d+)\.mlp\.", r"layers.\1.ffn."),
    (r"(?:language_model\.)?model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.input_norm."),
    (r"(?:language_model\.)?model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.post_attn_norm."),
    (r"(?:language_model\.)?model\.layers\.(\d+)\.pre_feedforward_layernorm\.", r"layers.\1.pre_ffn_norm."),
    (r"(?:language_model\.)?model\.layers\.(\d+)\.post_feedforward_layernorm\.", r"layers.\1.post_ffn_norm."),
]
