"""Shapes and masks shared by the backend tests: awkward on purpose."""

from __future__ import annotations

import torch

from attnkit import patterns as P

SHAPES = [  # (B, H, Hkv, N, S, D, Dv)
    (1, 1, 1, 1, 1, 16, 16),  # smallest case
    (2, 4, 4, 17, 17, 64, 64),  # not a multiple of any tile size
    (2, 8, 2, 67, 133, 64, 64),  # GQA and N != S
    (1, 4, 1, 1, 130, 128, 128),  # single-token decode, MQA
    (3, 2, 2, 57, 29, 80, 80),  # N > S, head dim 80 (bottom-right causal hides early rows)
    (1, 6, 3, 45, 45, 16, 32),  # Dv != D
]


def shape_id(s):
    return "B{}-H{}-Hkv{}-N{}-S{}-D{}-Dv{}".format(*s)


def _bool_mask(B, H, N, S):
    g = torch.Generator().manual_seed(7)
    m = torch.rand(B, 1, N, S, generator=g) > 0.3
    m[:, :, 0] = False  # one fully masked row per batch item
    return m


def _bias(B, H, N, S):
    g = torch.Generator().manual_seed(8)
    return torch.randn(1, H, N, S, generator=g, dtype=torch.float64)


def _alibi_like(B, H, N, S):
    slopes = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float64)
    dist = (torch.arange(N)[:, None] + (S - N) - torch.arange(S)[None, :]).abs()
    return -slopes.view(1, H, 1, 1) * dist


def _doc(B, H, N, S):
    cut = [max(1, S // 3), max(1, S // 2)]
    lengths = [c for c in cut if c < S]
    lengths = [*lengths, S - sum(lengths)] if sum(lengths) < S else [S]
    return P.Document(lengths)


def _layout(B, H, N, S):
    g = torch.Generator().manual_seed(3)
    return P.BlockLayout(torch.rand(-(-N // 8), -(-S // 8), generator=g) > 0.5, 8)


def _padding(B, H, N, S):
    return P.KeyPadding([max(0, S - 5 * b) for b in range(B)])


# name -> (B, H, N, S) -> (pattern, mask)
MASKS = {
    "none": lambda B, H, N, S: (None, None),
    "causal": lambda B, H, N, S: (P.Causal(), None),
    "causal-topleft": lambda B, H, N, S: (P.Causal(align="top_left"), None),
    "window": lambda B, H, N, S: (P.SlidingWindow(7, 3), None),
    "dilated": lambda B, H, N, S: (P.Dilated(9, 2), None),
    "strided-causal": lambda B, H, N, S: (P.Strided(5) & P.Causal(), None),
    "fixed-causal": lambda B, H, N, S: (P.Fixed(8, 2) & P.Causal(), None),
    "bigbird": lambda B, H, N, S: (
        P.SlidingWindow(4, 4) | P.Global((0,)) | P.Random(2, 8, seed=1),
        None,
    ),
    "layout": lambda B, H, N, S: (_layout(B, H, N, S), None),
    "document-causal": lambda B, H, N, S: (_doc(B, H, N, S) & P.Causal(), None),
    "padding": lambda B, H, N, S: (_padding(B, H, N, S), None),
    "bool-mask": lambda B, H, N, S: (None, _bool_mask(B, H, N, S)),
    "bias": lambda B, H, N, S: (None, _bias(B, H, N, S)),
    "alibi-window": lambda B, H, N, S: (P.SlidingWindow(11), _alibi_like(B, H, N, S)),
}


def make_inputs(shape, dtype, mask_case):
    """``(pattern, mask, q, k, v)`` for one case; values drawn in float64, then rounded to ``dtype``."""
    B, H, Hkv, N, S, D, Dv = shape
    pattern, mask = MASKS[mask_case](B, H, N, S)
    q = torch.randn(B, H, N, D, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, S, D, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, S, Dv, dtype=torch.float64).to(dtype)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    return pattern, mask, q, k, v
