"""What each head does, read off its weights: a per-head summary with the evidence.

For every (layer, head) the mean weight that queries give to a few structural targets is
measured: the token itself, the previous and the next token, the first token ([CLS], <s>),
the last token ([SEP], </s>) and punctuation. A head whose largest share is at least
``threshold`` is named after it. What is left over is the weight on other words ("content
words"); a head whose leftover is the largest share attends by meaning rather than position,
and its most attended token is reported. Otherwise a head is "broad" when its rows are spread
out (normalized entropy ≥ 0.75) and "mixed" when not. Nothing is hard-coded per model.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

import torch
from torch import Tensor

from .record import AttentionRecord

__all__ = ["HeadSummary", "summarize_heads"]

CATEGORIES = (
    "itself",
    "previous token",
    "next token",
    "first token",
    "last token",
    "punctuation",
    "content words",
)


@dataclass(frozen=True)
class HeadSummary:
    layer: int
    head: int
    label: str  # a category, "broad" or "mixed"
    share: float  # the label's mean weight (for broad/mixed: the largest category's)
    entropy: float  # mean normalized entropy of the rows, in [0, 1]
    shares: dict[str, float]
    focus: str  # the token this head gives the most weight overall (mean over queries)


def _is_punct(token: str) -> bool:
    t = token.lstrip("▁Ġ#")
    return bool(t) and all(unicodedata.category(c).startswith("P") for c in t)


def head_shares(w: Tensor, tokens: list[str] | None = None) -> dict[str, Tensor]:
    """Per head, the mean weight on each category: ``w (H, N, N)`` -> ``{name: (H,)}``."""
    H, N, S = w.shape
    if N != S:
        raise ValueError(f"summarize_heads: expected self-attention weights (N == S), but got N={N}, S={S}.")
    eye = torch.eye(N, dtype=torch.bool)
    rows = torch.arange(N)
    out = {
        "itself": w[:, eye].mean(-1),
        "previous token": w[:, rows[1:], rows[:-1]].mean(-1) if N > 1 else torch.zeros(H),
        "next token": w[:, rows[:-1], rows[1:]].mean(-1) if N > 1 else torch.zeros(H),
        "first token": w[:, :, 0].mean(-1),
        "last token": w[:, :, -1].mean(-1),
    }
    structural = torch.zeros(H, N, S, dtype=torch.bool)
    structural[:, :, 0] = structural[:, :, -1] = True
    structural[:, eye] = True
    structural[:, rows[1:], rows[:-1]] = structural[:, rows[:-1], rows[1:]] = True
    if tokens is not None:
        punct = torch.tensor([_is_punct(t) for t in tokens])
        punct[0] = punct[-1] = False  # the ends are counted above
        out["punctuation"] = w[:, :, punct].sum(-1).mean(-1)
        structural[:, :, punct] = True
    out["content words"] = w.masked_fill(structural, 0).sum(-1).mean(-1)
    return out


def _entropy(w: Tensor) -> Tensor:
    """Mean over rows of entropy / log(number of keys the row may see), ``(H,)``."""
    allowed = (w > 0).sum(-1).clamp_min(2).to(w.dtype)
    ent = -(w * w.clamp_min(1e-12).log()).sum(-1)
    return (ent / allowed.log()).mean(-1)


def summarize_heads(rec: AttentionRecord, *, batch: int = 0, threshold: float = 0.4) -> list[HeadSummary]:
    """A :class:`HeadSummary` per recorded self-attention layer and head."""
    out = []
    for li, w in enumerate(rec.weights):
        w = w[batch].double()
        if w.shape[-1] != w.shape[-2]:
            continue  # cross-attention
        shares = head_shares(w, rec.tokens)
        ent = _entropy(w)
        received = w.mean(1)  # (H, S): mean weight each key token receives
        for hi, head in enumerate(rec.heads):
            s = {k: float(v[hi]) for k, v in shares.items()}
            best = max(s, key=s.get)
            e = float(ent[hi])
            label = best if s[best] >= threshold else ("broad" if e >= 0.75 else "mixed")
            j = int(received[hi].argmax())
            focus = rec.tokens[j] if rec.tokens is not None else str(j)
            out.append(HeadSummary(li, head, label, s[best], e if math.isfinite(e) else 0.0, s, focus))
    return out
