"""``DecoderLM``: Llama-family decoder-only language models on attnkit.

Pre-norm blocks with RMSNorm, rotary embeddings in the half layout, grouped-query attention
and SwiGLU feed-forwards (Touvron et al. 2023, https://arxiv.org/abs/2302.13971); Mistral's
sliding window (Jiang et al. 2023, https://arxiv.org/abs/2310.06825) is an attnkit
``SlidingWindow`` pattern, so long inputs run block-sparse. Loads Hugging Face ``llama`` and
``mistral`` checkpoints (``config.json`` + safetensors) and generates with a KV cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..nn import Decoder, DecoderCache, DecoderLayer, RMSNorm, RotaryEmbedding
from ..patterns import Causal, Pattern, SlidingWindow, parse_pattern
from ._io import (
    ModelConfig,
    check_layer_patterns,
    layer_patterns,
    rename,
    with_patterns,
)
from ._lm import CausalLM

__all__ = ["DecoderLM", "DecoderLMConfig"]


@dataclasses.dataclass(frozen=True)
class DecoderLMConfig(ModelConfig):
    """Shape of a :class:`DecoderLM`; field names follow the Llama papers' hyper-parameters.

    ``sliding_window``: Mistral's window ``W`` (each token sees itself and the ``W - 1``
    before it), or None for full causal attention. ``pattern``: any other attnkit pattern
    expression for the self-attention (it replaces the causal/sliding one; keep it causal);
    ``layer_patterns``: one such expression per layer (what :meth:`DecoderLM.set_patterns` writes).
    ``rope_scaling``: ``transformers``' dict for ``linear`` or ``llama3`` scaling.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    intermediate_size: int = 11008
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    pattern: str | None = None
    layer_patterns: tuple[str, ...] | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def validate(self) -> None:
        self._positive("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")
        self._positive("intermediate_size", "max_position_embeddings")
        self._require("num_kv_heads", self.num_heads % self.num_kv_heads == 0,
                      f"to divide num_heads={self.num_heads}")  # fmt: skip
        if self.head_dim is None:
            self._require("hidden_size", self.hidden_size % self.num_heads == 0,
                          f"divisible by num_heads={self.num_heads} (or set head_dim)")  # fmt: skip
        else:
            self._positive("head_dim")
        self._require("resolved head_dim", self.resolved_head_dim % 2 == 0, "even (rotary pairs)")
        if self.sliding_window is not None:
            self._positive("sliding_window")
        if self.pattern is not None:
            parse_pattern(self.pattern)
        check_layer_patterns(self)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, list) else (self.eos_token_id,)

    @classmethod
    def from_hf(cls, hf: dict) -> DecoderLMConfig:
        """From a Hugging Face ``config.json`` of model_type ``llama`` or ``mistral``."""
        kind = hf.get("model_type")
        if kind not in ("llama", "mistral"):
            raise ValueError(f"DecoderLMConfig: expected model_type 'llama' or 'mistral', but got {kind!r}.")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"DecoderLMConfig: expected hidden_act 'silu', but got {hf['hidden_act']!r}.")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        kind_rope = rope.get("rope_type", rope.get("type", "default"))
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=None if kind_rope == "default" else rope,
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            sliding_window=hf.get("sliding_window") if kind == "mistral" else None,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )  # fmt: skip


class DecoderLM(CausalLM):
    """A Llama-family causal language model.

    Args:
        config: A :class:`DecoderLMConfig`.
        backend: attnkit backend for every layer.

    Shape:
        ``forward(input_ids (B, T))`` -> logits ``(B, T, V)``.

    Example:
        >>> lm = DecoderLM(DecoderLMConfig(vocab_size=100, hidden_size=64, num_layers=2,
        ...                                num_heads=4, num_kv_heads=2, intermediate_size=128))
        >>> lm.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4).shape
        torch.Size([1, 7])
    """

    model_name = "DecoderLM"
    config_class = DecoderLMConfig

    @staticmethod
    def _from_hf_names(weights: dict[str, Tensor]) -> dict[str, Tensor]:
        return rename(weights, _HF_RULES, drop=r"rotary_emb\.inv_freq$")

    #: Set by :func:`attnkit.distributed.set_context_parallel`: inputs are then this rank's
    #: shard of the tokens, and positions count over the whole sequence.
    context_parallel = None

    def __init__(self, config: DecoderLMConfig, *, backend: str = "auto") -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        rotary = RotaryEmbedding(c.resolved_head_dim, c.rope_theta, scaling=c.rope_scaling)
        layer = DecoderLayer(
            c.hidden_size, c.num_heads, c.intermediate_size, cross_attention=False,
            num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, activation="swiglu", norm="rms",
            norm_eps=c.rms_norm_eps, norm_first=True, dropout=0.0, bias=c.attention_bias, ffn_bias=c.mlp_bias,
            pattern=self._pattern(c), rotary=rotary, backend=backend,
        )  # fmt: skip
        self.decoder = Decoder(layer, c.num_layers, norm=RMSNorm(c.hidden_size, c.rms_norm_eps))
        self._apply_patterns()
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def set_patterns(self, patterns: Pattern | Sequence[Pattern] | None) -> None:
        """Run self-attention with ``patterns``: one pattern for every layer, a sequence of one
        per layer (e.g. :func:`attnkit.fit.fit_patterns`' result; keep them causal), or None for
        the config's causal or sliding default. Kept in the config, so :meth:`save_pretrained`
        saves it."""
        self.config = with_patterns(self.config, patterns)
        self._apply_patterns()

    def _apply_patterns(self) -> None:
        c = self.config
        per_layer = layer_patterns(c) or [self._pattern(c)] * c.num_layers
        for layer, pattern in zip(self.decoder.layers, per_layer, strict=True):
            layer.self_attn.pattern = pattern

    @staticmethod
    def _pattern(c: DecoderLMConfig) -> Pattern:
        if c.pattern is not None:
            return parse_pattern(c.pattern)
        return Causal() if c.sliding_window is None else SlidingWindow(c.sliding_window - 1)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self) -> DecoderCache:
        """An empty KV cache for :meth:`forward`'s ``cache=``."""
        return self.decoder.new_cache()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        cache: DecoderCache | None = None,
        need_weights: bool = False,
        logits_to_keep: int | None = None,
    ) -> Tensor | tuple[Tensor, list]:
        """Logits ``(B, T, V)`` for ``input_ids (B, T)``.

        Args:
            attention_mask: ``(B, L + T)`` 1/True for real tokens over everything the cache
                holds plus these tokens (left padding for batched prompts); None = all real.
            position_ids: ``(B, T)`` or ``(T,)``; default counts on from the cache length.
            cache: A :meth:`new_cache`; these tokens' keys and values are appended to it.
            need_weights: Also return per-layer self-attention weights.
            logits_to_keep: Project only the last this many positions onto the vocabulary
                (``generate`` needs the last one): logits ``(B, logits_to_keep, V)``; the last
                layer then computes only those positions (0 or None: every position).
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"DecoderLM: expected input_ids int64 of shape (B, T), but got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}."
            )
        cp = self.context_parallel
        if cp is not None and (cache is not None or attention_mask is not None):
            raise ValueError(
                "DecoderLM: under context parallelism, pass neither cache (decode on one rank) nor "
                "attention_mask (pad with patterns.KeyPadding in the config's pattern)."
            )
        past = 0 if cache is None else cache.length
        key_mask = None
        if attention_mask is not None:
            want = (input_ids.shape[0], past + input_ids.shape[1])
            if tuple(attention_mask.shape) != want:
                raise ValueError(
                    f"DecoderLM: expected attention_mask of shape (B, cached + T)={want}, but got "
                    f"{tuple(attention_mask.shape)}."
                )
            key_mask = attention_mask.bool()
        if position_ids is None and cp is not None:  # this rank's tokens' places in the whole
            position_ids = cp.positions(input_ids.shape[1], input_ids.device)
        elif position_ids is None:  # one tensor for every layer, so their rotary angles are shared
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        last = self._last_rows(logits_to_keep, input_ids.shape[1], all_rows_needed=need_weights)
        out = self.decoder(
            self.embed(input_ids), key_mask=key_mask, positions=position_ids, cache=cache,
            need_weights=need_weights, last_rows=last,
        )  # fmt: skip
        hidden, weights = out if need_weights else (out, None)
        if logits_to_keep is not None:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        return (logits, [w[0] for w in weights]) if need_weights else logits

    def extra_repr(self) -> str:
        return f"parameters={self.num_parameters() / 1e6:.1f}M, layers={self.config.num_layers}"


_HF_RULES = [
    (r"model\.embed_tokens\.", "embed."),
    (r"model\.norm\.", "decoder.norm."),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.", r"decoder.layers.\1.self_attn.out_proj."),
    (r"model\.layers\.(\d+)\.self_attn\.", r"decoder.layers.\1.self_attn."),
    (r"model\.layers\.(\d+)\.mlp\.", r"decoder.layers.\1.ffn."),
    (r"model\.layers\.(\d+)\.input_layernorm\.", r"decoder.layers.\1.norm1."),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"decoder.layers.\1.norm2."),
]
