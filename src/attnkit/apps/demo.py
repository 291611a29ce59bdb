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

import torch
from torch import Tensor

from ..functional import attention
from ..patterns import Causal
from ..viz.walkthrough import Walkthrough, render

__all__ = ["Walkthrough", "render", "run", "tokenize", "walkthrough"]

DEFAULT_TEXT = "The cat sat on the mat."


def tokenize(text: str) -> list[str]:
    """Words and punctuation marks: ``"The cat sat."`` -> ``["The", "cat", "sat", "."]``."""
    return re.findall(r"\w+|[^\w\s]", text)


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


def run(
    text: str = DEFAULT_TEXT, *, d_model: int = 8, d_k: int = 4, seed: int = 0, causal: bool = False
) -> int:
    """``attnkit demo``: print the walk-through of ``text``."""
    from .errors import argument

    with argument("TEXT/--d-model/--d-k"):
        w = walkthrough(text, d_model=d_model, d_k=d_k, seed=seed, causal=causal)
    print(render(w))
    return 0
