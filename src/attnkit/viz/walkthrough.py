"""The self-attention walk-through as data and as text: ``Walkthrough`` and ``render``.

Filled by ``attnkit demo`` (a tiny fixed model) and by ``attnkit explain --steps`` (one head of a
real model, :mod:`attnkit.viz.steps`); rendered as one table per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Walkthrough", "render"]


@dataclass(frozen=True)
class Walkthrough:
    """Every intermediate of one attention head on one sentence (float64).

    Shapes: ``x (N, C)``; ``q, k (N, D)``; ``v (N, D)``; ``scores, scaled, weights (N, N)``;
    ``out (N, D)``.
    """

    text: str
    tokens: list[str]
    x: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    scores: Tensor
    scaled: Tensor
    weights: Tensor
    out: Tensor
    causal: bool
    check_error: float  # max |out - the reference computation|
    title: str = "Self-attention, step by step"
    x_note: str = "a fixed embedding + its position"
    check_label: str = "attnkit.attention(Q, K, V) gives the same output"


def _table(
    title: str, rows: list[str], cols: list[str], data: Tensor, note: str = "", digits: int = 3
) -> str:
    width = max(6 + digits, *(len(c) for c in cols)) + 1
    head = max(len(r) for r in rows) + 2
    lines = [title + (f"  ({note})" if note else "")]
    lines.append(" " * head + "".join(c.rjust(width) for c in cols))
    for r, row in zip(rows, data.tolist(), strict=True):
        cells = ("-inf".rjust(width) if math.isinf(val) else f"{val:{width}.{digits}f}" for val in row)
        lines.append(r.ljust(head) + "".join(cells))
    return "\n".join(lines)


def render(w: Walkthrough, *, max_dims: int | None = None) -> str:
    """The walk-through as text: one table per step, then the check. ``max_dims`` limits the
    columns shown of Q, K, V and the output (all of them enter the computation)."""
    n, d_k = len(w.tokens), w.q.shape[1]
    shown = d_k if max_dims is None else min(max_dims, d_k)
    rows = [f"{i}:{t}" for i, t in enumerate(w.tokens)]
    dims = [f"d{j}" for j in range(shown)]
    note = "" if shown == d_k else f"first {shown} of {d_k} dimensions"
    parts = [
        f"{w.title}, on {w.text!r}",
        f"{n} tokens, model width C={w.x.shape[1]}, one head of width d_k={d_k}"
        + (", causal (each token sees only itself and earlier tokens)" if w.causal else ""),
        "",
        f"1. Each token's vector x ({w.x_note}) is projected three ways:",
        "   Q = x W_Q (what it looks for), K = x W_K (what it offers), V = x W_V (what it passes on).",
        "",
        _table("Q", rows, dims, w.q[:, :shown], note),
        "",
        _table("K", rows, dims, w.k[:, :shown], note),
        "",
        _table("V", rows, dims, w.v[:, :shown], note),
        "",
        "2. Scores: every query against every key, Q K^T (row = query, column = key).",
        _table("Q K^T", rows, w.tokens, w.scores),
        "",
        f"3. Divide by sqrt(d_k) = {math.sqrt(d_k):.3f} so the softmax does not saturate as d_k grows.",
        _table("Q K^T / sqrt(d_k)", rows, w.tokens, w.scaled),
        "",
        "4. Softmax along each row: the weights each token gives the others (rows sum to 1).",
        _table(
            "softmax",
            rows,
            [*w.tokens, "sum"],
            torch.cat([w.weights, w.weights.sum(-1, keepdim=True)], 1),
        ),
        "",
        "5. Output: each token's new vector is the weighted sum of the values, weights @ V.",
        _table("output", rows, dims, w.out[:, :shown], note),
        "",
        "Who attends to whom (largest weight per row):",
    ]
    for i, t in enumerate(w.tokens):
        j = int(w.weights[i].argmax())
        parts.append(f"  {t!r:>8} -> {w.tokens[j]!r:<8} {w.weights[i, j].item():.3f}")
    parts += [
        "",
        f"Check: {w.check_label} (max |difference| = {w.check_error:.1e}).",
    ]
    return "\n".join(parts)
