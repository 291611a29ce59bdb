"""Property-based tests: random shapes, patterns and masks against the float64 oracle."""

from __future__ import annotations

import itertools

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from attnkit import attention
from attnkit import patterns as P
from attnkit.backends.blocksparse import BlockSparseBackend
from attnkit.backends.tiled import TiledBackend

from .reference import assert_block_map_exact, attention_ref, max_err, spec_dense


@st.composite
def leaf_patterns(draw, n: int, s: int):
    kind = draw(
        st.sampled_from(
            [
                "causal",
                "window",
                "dilated",
                "strided",
                "fixed",
                "global",
                "random",
                "document",
                "layout",
                "full",
            ]
        )
    )
    align = draw(st.sampled_from(["bottom_right", "top_left"]))
    small = st.integers(0, 12)
    if kind == "causal":
        return P.Causal(align=align)
    if kind == "window":
        return P.SlidingWindow(draw(small), draw(small), align=align)
    if kind == "dilated":
        return P.Dilated(draw(small), draw(st.integers(1, 4)), draw(small), align=align)
    if kind == "strided":
        return P.Strided(draw(st.integers(1, 9)), align=align)
    if kind == "fixed":
        block = draw(st.integers(1, 9))
        return P.Fixed(block, draw(st.integers(0, block)), align=align)
    if kind == "global":
        limit = s if align == "bottom_right" else max(n, s)
        return P.Global(draw(st.lists(st.integers(0, limit - 1), min_size=1, max_size=3)), align=align)
    if kind == "random":
        return P.Random(
            draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(0, 99)), align=align
        )
    if kind == "document":
        cuts = sorted(draw(st.sets(st.integers(1, s - 1), max_size=3))) if s > 1 else []
        bounds = [0, *cuts, s]
        return P.Document([b - a for a, b in itertools.pairwise(bounds)], align=align)
    if kind == "layout":
        blk = draw(st.integers(1, 8))
        shape = (-(-n // blk), -(-s // blk))
        bits = draw(st.lists(st.booleans(), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
        return P.BlockLayout(torch.tensor(bits).view(shape), blk)
    return P.Full()


@st.composite
def problems(draw):
    n, s = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    hkv = draw(st.sampled_from([1, 2]))
    h = hkv * draw(st.sampled_from([1, 2, 3]))
    b = draw(st.integers(1, 2))
    d = draw(st.sampled_from([8, 16, 24]))
    pattern = draw(st.one_of(st.none(), leaf_patterns(n, s)))
    if pattern is not None and draw(st.booleans()):
        other = draw(leaf_patterns(n, s))
        pattern = pattern & other if draw(st.booleans()) else pattern | other
    mask = None
    mask_kind = draw(st.sampled_from(["none", "bool", "bias"]))
    if mask_kind == "bool":
        mask = torch.rand(b, 1, n, s, generator=torch.Generator().manual_seed(draw(st.integers(0, 9)))) > 0.4
    elif mask_kind == "bias":
        mask = torch.randn(1, h, 1, s, dtype=torch.float64)
    tiles = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    sparse_tiles = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    return (b, h, hkv, n, s, d), pattern, mask, (tiles, sparse_tiles)


@given(problems())
def test_every_backend_matches_the_oracle(problem):
    (B, H, Hkv, N, S, D), pattern, mask, (tiles, sparse_tiles) = problem
    g = torch.Generator().manual_seed(N * 41 + S)
    q = torch.randn(B, H, N, D, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, dtype=torch.float64, generator=g, requires_grad=True)
    dout = torch.randn(B, H, N, D, dtype=torch.float64, generator=g)
    want = attention_ref(q, k, v, pattern=pattern, mask=mask)
    want_g = torch.autograd.grad((want * dout).sum(), (q, k, v))
    # Small, ragged tiles on both tile-based backends, so that rows span several segments
    # (blocksparse merges them through the log-sum-exp) and many rows see nothing at all.
    old = TiledBackend.block, BlockSparseBackend.block, BlockSparseBackend.backward_block
    TiledBackend.block = tiles
    BlockSparseBackend.block, BlockSparseBackend.backward_block = sparse_tiles
    try:
        for backend in ("reference", "sdpa", "tiled", "blocksparse"):
            got = attention(q, k, v, pattern=pattern, mask=mask, backend=backend)
            got_g = torch.autograd.grad((got * dout).sum(), (q, k, v))
            assert max_err(got, want) < 1e-10, backend
            for a, b in zip(got_g, want_g, strict=True):
                assert max_err(a, b) < 1e-10, backend
    finally:
        TiledBackend.block, BlockSparseBackend.block, BlockSparseBackend.backward_block = old


@given(problems())
def test_block_maps_agree_with_dense(problem):
    (_, _, _, N, S, _), pattern, _, (tiles, _) = problem
    assume(pattern is not None)
    assert_block_map_exact(pattern, N, S, tiles)
    assert pattern.num_allowed(N, S) == int(pattern.to_dense(N, S).sum())


@given(problems())
def test_patterns_and_compositions_match_their_definition(problem):
    """Every drawn pattern (single or composed) against its definition evaluated pair by pair
    in plain Python (``spec_dense``), not against the patterns' own code."""
    (_, _, _, N, S, _), pattern, _, _ = problem
    assume(pattern is not None)
    assert torch.equal(pattern.to_dense(N, S), spec_dense(pattern, N, S))
