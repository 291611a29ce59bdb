"""The self-attention walk-through, with real numbers, for one head of a tiny fixed model.

Every explanation of self-attention goes through the same steps for a sentence such as "The
cat sat on the mat.": project each token's vector into a query, a key and a value; score every
query against every key; divide by the square root of the key width; turn each row of scores
into weights with a softmax; and mix the values with those weights. :func:`walkthrough`
computes each step with a small deterministic model and checks the result against
:func:`attnkit.attention`; :func:`render` prints it.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..functional import attention
from ..patterns import Causal

__all__ = ["Walkthrough", "render", "tokenize", "walkthrough"]

DEFAULT_TEXT = "The cat sat on the mat."


def tokenize(text: str) -> list[str]:
    """Words and punctuation marks: ``"The cat sat."`` -> ``["The", "cat", "sat", "."]``."""
    return re.findall(r"\w+|[^\w\s]", text)


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


def _token_vector(token: str, width: int) -> Tensor:
    """A fixed pseudo-random embedding per lower-cased token (same on every machine)."""
    g = torch.Generator().manual_seed(zlib.crc32(token.lower().encode()))
    return torch.randn(width, generator=g, dtype=torch.float64)


def _positions(n: int, width: int) -> Tensor:
    """Sinusoidal position encoding (Vaswani et al. 2017), ``(n, width)``."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
    pe = torch.zeros(n, width, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : width // 2]
    return pe


def walkthrough(
    text: str = DEFAULT_TEXT, *, d_model: int = 8, d_k: int = 4, seed: int = 0, causal: bool = False
) -> Walkthrough:
    """Run one attention head step by step on ``text``.

    Args:
        text: The sentence; split into words and punctuation.
        d_model: Width ``C`` of the token vectors.
        d_k: Width ``D`` of queries, keys and values.
        seed: Seed of the projection matrices ``W_Q, W_K, W_V`` (``C x D``).
        causal: Hide later tokens from each query (a decoder's self-attention).

    Raises:
        ValueError: ``text`` has no tokens, or a width is not positive.
    """
    tokens = tokenize(text)
    if not tokens:
        raise ValueError(f"demo: expected a text with at least one word, but got {text!r}.")
    if d_model < 2 or d_k < 1:
        raise ValueError(f"demo: expected d_model >= 2 and d_k >= 1, but got {d_model}, {d_k}.")
    n = len(tokens)
    x = torch.stack([_token_vector(t, d_model) for t in tokens]) + _positions(n, d_model)
    g = torch.Generator().manual_seed(seed)
    w_q, w_k, w_v = (
        torch.randn(d_model, d_k, generator=g, dtype=torch.float64) / math.sqrt(d_model) for _ in range(3)
    )
    q, k, v = x @ w_q, x @ w_k, x @ w_v
    scores = q @ k.T  # (N, N): how well query i matches key j
    scaled = scores / math.sqrt(d_k)
    if causal:
        scaled = scaled.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    weights = scaled.softmax(-1)  # each row sums to 1
    out = weights @ v
    check = attention(q[None, None], k[None, None], v[None, None], pattern=Causal() if causal else None)[0, 0]
    return Walkthrough(
        text=text, tokens=tokens, x=x, q=q, k=k, v=v, scores=scores, scaled=scaled, weights=weights,
        out=out, causal=causal, check_error=(out - check).abs().max().item(),
    )  # fmt: skip


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
