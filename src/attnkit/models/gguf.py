"""GGUF checkpoints, the files llama.cpp and Ollama run: metadata to config, tensors dequantized,
the tokenizer rebuilt from the vocabulary the file carries.

Read with the ``gguf`` package (llama.cpp's own reader and dequantizer; ``pip install gguf``).
Architectures: ``llama`` (Llama, SmolLM, Mistral-style files) as a
:class:`~attnkit.models.DecoderLM`, and ``gemma3`` as a :class:`~attnkit.models.Gemma3LM`.

What llama.cpp's converter changed is undone here, as facts of the format:

* ``llama`` files store the query and key projections with each head's rows permuted for
  llama.cpp's interleaved rotary layout; attnkit (like the original checkpoints) rotates halves,
  so the permutation is inverted;
* ``gemma3`` files store each RMSNorm weight as ``1 + w``; attnkit's Gemma norms hold ``w``;
* Gemma 3 values the file does not state are those of the published architecture: local
  layers' rotary base 10,000 and every 6th layer global, as in ``transformers``' defaults.

Tokenizers: ``gpt2`` (byte-level BPE with the file's merges; the pre-tokenizer split named by
``tokenizer.ggml.pre``, individual digits for ``smollm`` as llama.cpp does) and ``llama``
(SentencePiece BPE with byte fallback; for Gemma, whose file lists no merges, the merges are
recovered from the vocabulary, ranked by each token's place in the file). The result is written
once as a ``tokenizer.json`` under attnkit's cache (keyed by the file's size, modification time
and path) and read by :class:`~attnkit.models.Tokenizer`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._files import atomic_write, user_cache_dir

__all__ = ["ARCHITECTURES", "GGUFFile", "read_gguf"]

#: Architectures (``general.architecture``) :func:`attnkit.models.load` builds a model for.
ARCHITECTURES = ("llama", "gemma3")
#: Dequantized by the ``gguf`` package; anything else is refused by name.
TOKENIZER_MODELS = ("gpt2", "llama")
_MAGIC = b"GGUF"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == _MAGIC


@dataclass
class GGUFFile:
    """An opened GGUF file.

    Attributes:
        path: The file.
        architecture: ``general.architecture`` (``"llama"``, ``"gemma3"``, ...).
        metadata: Every key-value field (arrays of the tokenizer included).
    """

    path: Path
    architecture: str
    metadata: dict[str, Any]
    reader: Any

    def get(self, key: str, default: Any = None) -> Any:
        """``metadata[f"{architecture}.{key}"]`` (``default`` when absent)."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def tensors(self, dtype: torch.dtype = torch.float32, *, progress: bool = False) -> dict[str, Tensor]:
        """Every tensor, dequantized, as ``dtype``, named as in the file (``blk.0.attn_q.weight``)
        and shaped as PyTorch lays out the weight (``(out, in)`` for a projection).

        Raises:
            NotImplementedError: A tensor type the ``gguf`` package cannot dequantize.
        """
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        items = self.reader.tensors
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(items, desc=f"dequantizing {self.path.name}", unit="tensor", leave=False)
        out = {}
        for t in items:
            kind = GGMLQuantizationType(t.tensor_type)
            try:
                array = dequantize(t.data, kind)
            except NotImplementedError as e:
                raise NotImplementedError(
                    f"{self.path.name}: tensor {t.name!r} has type {kind.name}, which the installed gguf "
                    f"package cannot dequantize ({e}); upgrade gguf or convert the file to a supported type."
                ) from None
            shape = tuple(int(d) for d in reversed(t.shape))
            array = np.array(array, dtype=np.float32, copy=True).reshape(shape)  # writable, owned
            out[t.name] = torch.from_numpy(array).to(dtype)
        return out

    def tokenizer_file(self) -> Path:
        """A ``tokenizer.json`` equivalent to the file's tokenizer, built once and cached."""
        st = self.path.stat()
        key = hashlib.sha256(f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|1".encode()).hexdigest()[
            :16
        ]
        target = user_cache_dir() / "gguf-tokenizers" / f"{self.path.stem}-{key}.json"
        if not target.is_file():
            text = build_tokenizer(self).to_str()
            atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))
        return target


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file and read its metadata (tensors are read on demand).

    Raises:
        ImportError: The ``gguf`` package is not installed.
        ValueError: Not a GGUF file.
    """
    p = Path(path).expanduser()
    if not is_gguf(p):
        raise ValueError(f"expected a GGUF file (magic bytes 'GGUF'), but {str(p)!r} is not one.")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from None
    reader = GGUFReader(str(p))
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = field.contents()
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{p.name}: the file has no general.architecture.")
    return GGUFFile(p, arch, metadata, reader)


# --------------------------------------------------------------------------- tokenizers
def build_tokenizer(f: GGUFFile):
    """A ``tokenizers.Tokenizer`` from the file's ``tokenizer.ggml.*`` fields."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    md = f.metadata
    kind = md.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise NotImplementedError(
            f"{f.path.name}: tokenizer model {kind!r} is not supported (supported: {TOKENIZER_MODELS})."
        )
    tokens = list(md["tokenizer.ggml.tokens"])
    types = list(md.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    names = tokens  # as the vocabulary spells them
    if kind == "gpt2":
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=False))
        split = _PRE_SPLITS.get(md.get("tokenizer.ggml.pre"), _GPT2_SPLIT)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in split]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
    else:
        # SentencePiece BPE: spaces are "▁"; files spell a run of spaces as spaces (Gemma)
        names = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
        vocab = {t: i for i, t in enumerate(names)}
        merges = _merges_from_vocabulary(names, types)
        unk = md.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=None if unk is None else names[unk],
                                   fuse_unk=True, byte_fallback=True))  # fmt: skip
        prefix = [normalizers.Prepend("▁")] if md.get("tokenizer.ggml.add_space_prefix", True) else []
        tok.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
        strip = [decoders.Strip("▁", 1, 0)] if prefix else []
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
        )
    # control tokens (3) stay whole and are special; user-defined ones (4) stay whole
    special = [
        AddedToken(t, special=True, normalized=False) for t, k in zip(names, types, strict=True) if k == 3
    ]
    user = [
        AddedToken(t, special=False, normalized=False) for t, k in zip(names, types, strict=True) if k == 4
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    bos = md.get("tokenizer.ggml.bos_token_id")
    if md.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)],
        )
    return tok


def _merges_from_vocabulary(pieces: list[str], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a normal token into two
    tokens of the vocabulary, ranked by the token's place in the file (earlier merges first),
    then longer left parts first."""
    vocab = {t: i for i, t in enumerate(pieces)}
    merges = []
    for piece, kind in zip(pieces, types, strict=True):
        if kind not in (1, 4) or len(piece) < 2:  # normal and user-defined tokens only
            continue
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


# llama.cpp's pre-tokenizer splits (llama-vocab.cpp), by tokenizer.ggml.pre
_GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",)
_PRE_SPLITS = {
    "default": _GPT2_SPLIT,
    "gpt-2": _GPT2_SPLIT,
    "smollm": (r"\p{N}", *_GPT2_SPLIT),
    "llama3": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}


# --------------------------------------------------------------------------- models
def llama_config(f: GGUFFile):
    """A :class:`~attnkit.models.DecoderLMConfig` from a ``llama`` file's metadata."""
    from .llama import DecoderLMConfig

    heads = int(f.get("attention.head_count"))
    hidden = int(f.get("embedding_length"))
    scaling = None
    kind = f.get("rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise NotImplementedError(f"{f.path.name}: rope scaling {kind!r} is not supported (linear is).")
        scaling = {"rope_type": "linear", "factor": float(f.get("rope.scaling.factor"))}
    if "rope_freqs.weight" in f.tensor_names:
        raise NotImplementedError(
            f"{f.path.name}: per-frequency rope factors (Llama 3.1 files) are not supported."
        )
    head_dim = int(f.get("attention.key_length", f.get("rope.dimension_count", hidden // heads)))
    return DecoderLMConfig(
        vocab_size=int(f.get("vocab_size", len(f.metadata["tokenizer.ggml.tokens"]))), hidden_size=hidden,
        num_layers=int(f.get("block_count")), num_heads=heads,
        num_kv_heads=int(f.get("attention.head_count_kv", heads)), head_dim=head_dim,
        intermediate_size=int(f.get("feed_forward_length")),
        max_position_embeddings=int(f.get("context_length", 4096)),
        rms_norm_eps=float(f.get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(f.get("rope.freq_base", 10000.0)), rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in f.tensor_names,
        sliding_window=None, **_special_ids(f),
    )  # fmt: skip


def gemma3_config(f: GGUFFile):
    """A :class:`~attnkit.models.Gemma3Config` from a ``gemma3`` file's metadata."""
    from .gemma3 import Gemma3Config

    heads, hidden = int(f.get("attention.head_count")), int(f.get("embedding_length"))
    layers = int(f.get("block_count"))
    head_dim = int(f.get("attention.key_length", 256))
    scaling = None
    if f.get("rope.scaling.type") not in (None, "none"):
        scaling = {"rope_type": f.get("rope.scaling.type"), "factor": float(f.get("rope.scaling.factor"))}
    return Gemma3Config(
        vocab_size=len(f.metadata["tokenizer.ggml.tokens"]), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=int(f.get("attention.head_count_kv", heads)), head_dim=head_dim,
        intermediate_size=int(f.get("feed_forward_length")),
        max_position_embeddings=int(f.get("context_length", 32768)),
        rms_norm_eps=float(f.get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(f.get("rope.freq_base", 1_000_000.0)), rope_scaling=scaling,
        sliding_window=int(f.get("attention.sliding_window", 512)),
        # the 27B model scales queries by hidden / heads, the others by the head dim (the
        # published configurations; llama.cpp's gemma3 loader keys on the same)
        query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
        tie_word_embeddings="output.weight" not in f.tensor_names, **_special_ids(f),
    )  # fmt: skip


def _special_ids(f: GGUFFile) -> dict:
    md = f.metadata
    return {
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
    }


_LAYER_NAMES = {
    "llama": {
        "attn_norm": "norm1", "ffn_norm": "norm2", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.out_proj", "ffn_gate": "ffn.gate_proj",
        "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj",
    },
    "gemma3": {
        "attn_norm": "input_norm", "post_attention_norm": "post_attn_norm", "ffn_norm": "pre_ffn_norm",
        "post_ffw_norm": "post_ffn_norm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.out_proj", "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm", "ffn_gate": "ffn.gate_proj", "ffn_up": "ffn.up_proj",
        "ffn_down": "ffn.down_proj",
    },
}  # fmt: skip
_TOP_NAMES = {
    "llama": {"token_embd": "embed", "output_norm": "decoder.norm", "output": "lm_head"},
    "gemma3": {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"},
}
_LAYER_PREFIX = {"llama": "decoder.layers", "gemma3": "layers"}


def attnkit_weights(f: GGUFFile, tensors: dict[str, Tensor], config) -> dict[str, Tensor]:
    """The file's tensors under attnkit's parameter names, with llama.cpp's changes undone (see
    the module docstring)."""
    arch = f.architecture
    out = {}
    for name, t in tensors.items():
        base, _, suffix = name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk":
            layer, what = int(parts[1]), ".".join(parts[2:])
            if what not in _LAYER_NAMES[arch]:
                raise ValueError(f"{f.path.name}: unexpected tensor {name!r} for architecture {arch!r}.")
            if arch == "llama" and what in ("attn_q", "attn_k"):
                heads = config.num_heads if what == "attn_q" else config.num_kv_heads
                t = _unpermute(t, heads)
            if arch == "gemma3" and what.endswith("norm"):
                t = t - 1.0
            out[f"{_LAYER_PREFIX[arch]}.{layer}.{_LAYER_NAMES[arch][what]}.{suffix}"] = t
        elif base in _TOP_NAMES[arch]:
            if arch == "gemma3" and base == "output_norm":
                t = t - 1.0
            out[f"{_TOP_NAMES[arch][base]}.{suffix}"] = t
        elif base == "rope_freqs":
            continue
        else:
            raise ValueError(f"{f.path.name}: unexpected tensor {name!r} for architecture {arch!r}.")
    return out


def _unpermute(w: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's reordering of each head's rows of a query or key projection (it moves row
    ``2i`` of a head to ``i`` and ``2i + 1`` to ``i + D/2``; here they go back)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_model(
    f: GGUFFile, *, dtype: torch.dtype | None = None, backend: str = "auto", progress: bool = False
):
    """The attnkit model of a GGUF file: a DecoderLM (``llama``) or a Gemma3LM (``gemma3``).

    Raises:
        NotImplementedError: Another architecture, or a feature of it attnkit does not run.
    """
    if f.architecture not in ARCHITECTURES:
        raise NotImplementedError(
            f"{f.path.name}: GGUF architecture {f.architecture!r} is not supported "
            f"(supported: {ARCHITECTURES})."
        )
    config = llama_config(f) if f.architecture == "llama" else gemma3_config(f)
    weights = attnkit_weights(f, f.tensors(progress=progress), config)
    if f.architecture == "llama":
        from .llama import DecoderLM

        return DecoderLM.from_state(config, weights, str(f.path), backend=backend, dtype=dtype)
    from .gemma3 import Gemma3LM

    return Gemma3LM.from_state(config, weights, str(f.path), backend=backend, dtype=dtype)
