"""A self-contained HTML report of an :class:`~attnkit.viz.AttentionRecord`.

One file, no network: the data, styles and script are inline, and a Content-Security-Policy
forbids every fetch, so the page works offline and cannot leak. Weights are stored as one byte
per weight (0-255, i.e. steps of 1/255), base64-encoded, which keeps a 12-layer × 12-head report
on 128 tokens to a few megabytes.

The page has three views: a head view (hover or click a token to see its lines to the tokens it
attends to, for the layer and head chosen above, or the mean of the heads; when a sparsity
pattern was in use, the head's pattern beside the weights), a model view (a grid of layers ×
heads, click one to open it) and a flow view (attention rollout through all layers and, when
given, what each head loses to its pattern).
"""

from __future__ import annotations

import base64
import html
import json
import os
from importlib import resources
from pathlib import Path

import torch

from .._files import atomic_write
from ..patterns import Pattern, parse_pattern
from .flow import rollout
from .record import AttentionRecord

__all__ = ["render_html", "write_html"]


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode("ascii")


def _quantize(w: torch.Tensor) -> torch.Tensor:
    return (w.float().clamp(0, 1) * 255).round().to(torch.uint8)


def render_html(
    rec: AttentionRecord,
    *,
    title: str | None = None,
    text: str = "",
    batch: int = 0,
    layer: int | None = None,
    head: int | None = None,
    lost: torch.Tensor | None = None,
) -> str:
    """The report as a string (see the module docstring). ``layer``/``head`` (indices into
    the record's lists) are selected when the page opens; default the last layer, head 0.
    ``lost (L, h)``: what each head loses to its pattern (:func:`attnkit.viz.lost_mass`),
    shown in the flow view beside the attention rollout."""
    if not rec.weights:
        raise ValueError("render_html: the record holds no attention weights.")
    N, S = rec.weights[0].shape[-2:]
    tokens = rec.tokens or [str(i) for i in range(N)]
    key_tokens = rec.key_tokens or (tokens if S == N else [str(j) for j in range(S)])
    layers, weights, patterns = [], [], {}

    def dense(p: Pattern) -> str:  # (N, S) bytes of the batch item shown
        return _b64(p.to_dense(N, S).reshape(-1, N, S)[min(batch, (p.batch_size or 1) - 1)].to(torch.uint8))

    for name, w, pat in zip(rec.layers, rec.weights, rec.patterns or [None] * len(rec.layers), strict=True):
        if w.shape[-2:] != (N, S):
            continue  # layers of another shape (cross-attention beside self-attention): not shown
        entry = {"name": name, "pattern": pat}
        parsed = None if pat is None else parse_pattern(pat)
        per_head = (
            [parsed.heads[h] for h in rec.heads] if parsed is not None and parsed.per_head else [parsed]
        )
        if parsed is not None and parsed.per_head:
            entry["headPatterns"] = [repr(p) for p in per_head]
        for p in per_head:
            if p is not None and repr(p) not in patterns:
                patterns[repr(p)] = dense(p)
        layers.append(entry)
        weights.append(_b64(_quantize(w[batch])))
    flow = None
    if N == S and rec.heads and len(rec.heads) == rec.num_heads and len(layers) == len(rec.weights):
        flow = _b64(_quantize(rollout(rec)[batch]))
    data = {
        "model": rec.model, "text": text, "tokens": tokens, "keyTokens": key_tokens, "n": N, "s": S,
        "heads": rec.heads, "layers": layers, "weights": weights, "patterns": patterns,
        "initial": [len(layers) - 1 if layer is None else layer, 0 if head is None else head],
        "rollout": flow,
        "lost": None if lost is None else [[round(float(x), 4) for x in row] for row in lost],
    }  # fmt: skip
    for name, value, n in (
        ("layer", data["initial"][0], len(layers)),
        ("head", data["initial"][1], len(rec.heads)),
    ):
        if not 0 <= value < n:
            raise ValueError(f"render_html: expected {name} in [0, {n}), but got {value}.")
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    template = resources.files("attnkit.viz").joinpath("assets/report.html").read_text(encoding="utf-8")
    page_title = title or f"attnkit: attention of {rec.model}"
    return (
        template.replace("{{TITLE}}", html.escape(page_title))
        .replace("{{SUBTITLE}}", html.escape(text))
        .replace("{{DATA}}", payload)
    )


def write_html(rec: AttentionRecord, path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`render_html`'s page to ``path`` atomically; returns the path."""
    page = render_html(rec, **kwargs)
    atomic_write(Path(path), lambda p: p.write_text(page, encoding="utf-8"))
    return Path(path)
