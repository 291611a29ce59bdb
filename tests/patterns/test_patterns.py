"""Patterns: each ``to_dense`` against the formula in its spec, written as plain loops."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit import patterns as P
from attnkit.patterns import parse_pattern

from ..reference import assert_block_map_exact

SIZES = [(1, 1), (5, 5), (7, 13), (13, 7), (17, 17), (1, 70), (70, 1), (61, 97), (100, 37), (129, 129)]
ALIGNS = ["bottom_right", "top_left"]


def brute(rule, n, s, align="bottom_right"):
    """Dense mask from ``rule(p, j, i)`` evaluated pair by pair."""
    off = s - n if align == "bottom_right" else 0
    return torch.tensor([[bool(rule(i + off, j, i)) for j in range(s)] for i in range(n)])


FORMULAS = {  # name -> (pattern factory(align), rule(p, j, i))
    "Full": (lambda a: P.Full(), lambda p, j, i: True),
    "Causal": (lambda a: P.Causal(align=a), lambda p, j, i: j <= p),
    "SlidingWindow(3)": (lambda a: P.SlidingWindow(3, align=a), lambda p, j, i: p - 3 <= j <= p),
    "SlidingWindow(2,4)": (
        lambda a: P.SlidingWindow(2, 4, align=a),
        lambda p, j, i: p - 2 <= j <= p + 4,
    ),
    "Dilated(6,2)": (
        lambda a: P.Dilated(6, 2, align=a),
        lambda p, j, i: p - 6 <= j <= p and (p - j) % 2 == 0,
    ),
    "Dilated(4,3,5)": (
        lambda a: P.Dilated(4, 3, 5, align=a),
        lambda p, j, i: p - 4 <= j <= p + 5 and (p - j) % 3 == 0,
    ),
    "Strided(3)": (
        lambda a: P.Strided(3, align=a),
        lambda p, j, i: abs(p - j) < 3 or (p - j) % 3 == 0,
    ),
    "Fixed(4,1)": (
        lambda a: P.Fixed(4, 1, align=a),
        lambda p, j, i: j // 4 == p // 4 or j % 4 >= 4 - 1,
    ),
    "Fixed(3,0)": (lambda a: P.Fixed(3, 0, align=a), lambda p, j, i: j // 3 == p // 3),
    "Global(0,4)": (
        lambda a: P.Global((0, 4), align=a),
        lambda p, j, i: p in (0, 4) or j in (0, 4),
    ),
}


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize(("n", "s"), SIZES)
@pytest.mark.parametrize("name", list(FORMULAS))
def test_to_dense_matches_formula(name, n, s, align):
    make, rule = FORMULAS[name]
    pattern = make(align)
    if isinstance(pattern, P.Global):  # keep only the indices an (n, s) attention has
        limit = s if align == "bottom_right" else max(n, s)
        pattern = P.Global([i for i in pattern.indices if i < limit], align=align)
        rule = lambda p, j, i, g=pattern.indices: p in g or j in g  # noqa: E731
    assert torch.equal(pattern.to_dense(n, s), brute(rule, n, s, align))


@pytest.mark.parametrize(("n", "s"), SIZES)
def test_document_and_padding_formulas(n, s):
    lengths = [s // 3, s - s // 3] if s >= 3 else [s]
    seg = [k for k, length in enumerate(lengths) for _ in range(length)]
    want = brute(lambda p, j, i: 0 <= p < s and seg[p] == seg[j], n, s)
    assert torch.equal(P.Document(lengths).to_dense(n, s), want)
    pad = P.KeyPadding([s, s // 2, 0])
    dense = pad.to_dense(n, s)
    assert dense.shape == (3, 1, n, s)
    for b, length in enumerate([s, s // 2, 0]):
        assert torch.equal(dense[b, 0], brute(lambda p, j, i, L=length: j < L, n, s))


def test_block_layout_formula():
    grid = torch.rand(3, 4) > 0.5
    want = brute(lambda p, j, i: grid[i // 5, j // 5].item(), 13, 17, "top_left")
    assert torch.equal(P.BlockLayout(grid, 5).to_dense(13, 17), want)


def test_random_is_reproducible_and_has_the_right_count():
    r = P.Random(3, 8, seed=11)
    first, table = r.cells(100, 100)
    assert first == 0
    assert table.sum(1).tolist() == [3] * table.shape[0]
    assert torch.equal(table, P.Random(3, 8, seed=11).cells(100, 100)[1])
    assert not torch.equal(table, P.Random(3, 8, seed=12).cells(100, 100)[1])
    dense = r.to_dense(100, 100)
    for i, j in itertools.product(range(0, 100, 7), range(0, 100, 5)):
        assert dense[i, j] == table[i // 8, j // 8]
    # Machine independence: the choice is fixed by the SplitMix64 hash, pinned here.
    assert table[0].nonzero().flatten().tolist() == _FIRST_ROW_SEED_11


# Computed once (attnkit 0.1.0) and written down: a change to the hash or to the draw changes
# which keys every Random pattern picks, on every machine, and must fail here.
_FIRST_ROW_SEED_11 = [1, 6, 9]


def test_random_with_fewer_key_blocks_than_requested_keeps_all():
    assert P.Random(5, 4).to_dense(8, 8).all()


def test_composition_formulas():
    """Compositions against the formulas of their parts, evaluated pair by pair."""
    n, s = 16, 19
    window = FORMULAS["SlidingWindow(2,4)"][1]
    glob = FORMULAS["Global(0,4)"][1]
    a, b = P.SlidingWindow(2, 4), P.Global((0, 4))
    assert torch.equal((a | b).to_dense(n, s), brute(lambda p, j, i: window(p, j, i) or glob(p, j, i), n, s))
    assert torch.equal((a & b).to_dense(n, s), brute(lambda p, j, i: window(p, j, i) and glob(p, j, i), n, s))
    both = P.KeyPadding([10, 3]) & P.Causal()
    dense = both.to_dense(n, s)
    assert dense.shape == (2, 1, n, s)
    for b_, length in enumerate((10, 3)):
        assert torch.equal(dense[b_, 0], brute(lambda p, j, i, L=length: j <= p and j < L, n, s))
    assert repr(a & (b | P.Causal())) == "SlidingWindow(before=2, after=4) & (Global((0, 4)) | Causal())"


BLOCK_CASES = [
    P.Full(),
    P.Causal(),
    P.Causal(align="top_left"),
    P.SlidingWindow(9, 4),
    P.Dilated(11, 3),
    P.Strided(6) & P.Causal(),
    P.Fixed(8, 2) & P.Causal(),
    P.Fixed(5, 2),
    P.Global((0, 1, 30)),
    P.Random(2, 8, seed=3),
    P.Random(2, 5, seed=3) | P.SlidingWindow(3),
    P.Document((10, 25, 3, 9)) & P.Causal(),
    P.KeyPadding((47, 20, 0)),
    P.KeyPadding((47, 20, 0)) & P.SlidingWindow(4, 4),
    (P.SlidingWindow(6) | P.Global((2,))) & P.Causal(),
    P.BlockLayout(torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]]), 12),
]
BLOCK_N, BLOCK_S = 45, 47  # ragged for every block size below; Document above sums to 47


@pytest.mark.parametrize("block", [(8, 8), (16, 4), (5, 7), (64, 64)], ids=str)
@pytest.mark.parametrize("pattern", BLOCK_CASES, ids=repr)
def test_block_map_is_exact(pattern, block):
    assert_block_map_exact(pattern, BLOCK_N, BLOCK_S, block)


@pytest.mark.parametrize("pattern", BLOCK_CASES, ids=repr)
def test_num_allowed_and_density(pattern):
    n, s = BLOCK_N, BLOCK_S
    dense = pattern.to_dense(n, s)
    assert pattern.num_allowed(n, s) == int(dense.sum())
    assert pattern.density(n, s) == pytest.approx(dense.float().mean().item())
    assert pattern.sparsity(n, s) == pytest.approx(1 - dense.float().mean().item())


def test_structured_block_maps_are_cheap():
    """N = S = 131072 sliding window: built from structure, not from an N x S matrix."""
    bm = P.SlidingWindow(256, 256).block_map(131072, 131072, 64)
    assert bm.states.shape == (2048, 2048)
    assert bm.states.element_size() * bm.states.numel() <= 4 * 2**20
    c = bm.counts
    assert c["full"] + c["partial"] + c["empty"] == 2048 * 2048
    assert P.SlidingWindow(256, 256).block_map(131072, 131072, 64) is bm  # cached


@pytest.mark.parametrize("pattern", BLOCK_CASES, ids=repr)
def test_repr_round_trips_through_the_parser(pattern):
    if isinstance(pattern, P.BlockLayout) or "BlockLayout" in repr(pattern):
        pytest.skip("BlockLayout's repr summarizes its grid")
    assert parse_pattern(repr(pattern)) == pattern


def test_parser_accepts_user_spellings():
    assert parse_pattern("SlidingWindow(64) & Causal()") == P.SlidingWindow(64) & P.Causal()
    assert parse_pattern("Global(range(4)) | Random(3, 64, seed=1)") == P.Global(range(4)) | P.Random(
        3, 64, 1
    )
    bl = parse_pattern("BlockLayout([[1, 0], [1, 1]], 4)")
    assert bl.to_dense(8, 8).sum() == 48


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "non-empty"),
        ("Sliding(3)", "unknown pattern 'Sliding'"),
        ("SlidingWindow(3) + Causal()", "unexpected 'BinOp'"),
        ("SlidingWindow(x)", "unsupported argument 'x'"),
        ("SlidingWindow(3", "could not parse"),
        ("SlidingWindow(window=3)", "bad arguments for SlidingWindow"),
        ("__import__('os')", "unknown pattern '__import__'"),
    ],
)
def test_parser_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_pattern(spec)


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: P.SlidingWindow(-1), ValueError, r"before >= 0, but got before=-1"),
        (lambda: P.SlidingWindow(2, -3), ValueError, r"after >= 0, but got after=-3"),
        (lambda: P.SlidingWindow(2.5), TypeError, r"before to be an int"),
        (lambda: P.Dilated(4, 0), ValueError, r"dilation >= 1, but got dilation=0"),
        (lambda: P.Strided(0), ValueError, r"stride >= 1, but got stride=0"),
        (lambda: P.Fixed(4, 5), ValueError, r"summary <= block, but got summary=5, block=4"),
        (lambda: P.Fixed(0, 0), ValueError, r"block >= 1, but got block=0"),
        (lambda: P.Global(()), ValueError, r"at least one index"),
        (lambda: P.Global((-1,)), ValueError, r"int >= 0, but got -1"),
        (lambda: P.Global(3), TypeError, r"iterable of ints"),
        (lambda: P.Random(0, 8), ValueError, r"blocks >= 1, but got blocks=0"),
        (lambda: P.Random(1, 8, seed=-2), ValueError, r"seed >= 0, but got seed=-2"),
        (lambda: P.Document((3, 0)), ValueError, r"int >= 1, but got 0"),
        (lambda: P.Document(5), TypeError, r"sequence of ints"),
        (lambda: P.KeyPadding((3, -1)), ValueError, r"int >= 0, but got -1"),
        (lambda: P.Causal(align="left"), ValueError, r"align to be one of .* but got align='left'"),
        (lambda: P.BlockLayout(torch.ones(2, 2, 2), 4), ValueError, r"2-D layout"),
        (lambda: P.BlockLayout(torch.full((2, 2), 0.5), 4), ValueError, r"boolean"),
        (lambda: P.And(P.Causal()), ValueError, r"at least 2 patterns"),
        (lambda: P.KeyPadding((1, 2)) & P.KeyPadding((1, 2, 3)), ValueError, r"disagree"),
    ],
)
def test_invalid_parameters(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    ("pattern", "n", "s", "match"),
    [
        (P.Document((3, 4)), 8, 8, r"sum\(lengths\) == S .* got sum\(lengths\)=7 for N=8, S=8"),
        (P.KeyPadding((9,)), 8, 8, r"every length <= S=8, but got max\(lengths\)=9"),
        (P.BlockLayout(torch.ones(2, 2), 4), 9, 8, r"\(3, 2\) .* but got \(2, 2\)"),
        (P.Global((8,)), 8, 8, r"every index < 8 .* got index 8"),
        (P.Causal(), 0, 4, r"N to be a positive int, but got N=0"),
    ],
)
def test_size_errors(pattern, n, s, match):
    with pytest.raises(ValueError, match=match):
        pattern.to_dense(n, s)


def test_to_string_draws_tiles():
    art = (P.SlidingWindow(64) & P.Causal()).to_string(512)
    lines = art.splitlines()
    assert lines[0].startswith("SlidingWindow(before=64) & Causal()   N=512 S=512   tile=8x8")
    assert len(lines) == 1 + 64 and all(len(row) == 64 for row in lines[1:])
    assert lines[1][0] == "░" and lines[-1][-1] == "░" and lines[-1][0] == "·"
    assert lines[20][19] == "░" and lines[20][15] == "█" and lines[20][3] == "·"


@pytest.mark.parametrize("tool", ["pattern_pictures.py", "pattern_gallery.py"])
def test_generated_pictures_are_current(tool):
    """Docstring pictures and docs/patterns.md are drawn by the patterns themselves."""
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, str(root / "tools" / tool), "--check"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


CROPS = [((0, 45), (0, 47)), ((3, 20), (0, 47)), ((20, 45), (11, 30)), ((0, 1), (46, 47)), ((44, 45), (0, 5))]


@pytest.mark.parametrize("rect", CROPS, ids=str)
@pytest.mark.parametrize("pattern", BLOCK_CASES, ids=repr)
def test_crop_is_the_rectangle_of_the_whole_pattern(pattern, rect):
    (r0, r1), (c0, c1) = rect
    part = P.crop(pattern, BLOCK_N, BLOCK_S, (r0, r1), (c0, c1))
    n, s = r1 - r0, c1 - c0
    want = pattern.to_dense(BLOCK_N, BLOCK_S)[..., r0:r1, c0:c1]
    assert torch.equal(part.to_dense(n, s), want)
    assert part.num_allowed(n, s) == int(want.sum())
    for block in [(8, 8), (5, 7)]:
        assert_block_map_exact(part, n, s, block)


def test_crop_keeps_simple_patterns_simple_and_checks_its_rectangle():
    pad = P.KeyPadding((47, 20, 0)) & P.SlidingWindow(4, 4)
    part = P.crop(pad, 45, 47, (10, 20), (15, 40))
    assert isinstance(part, P.And) and P.KeyPadding((25, 5, 0)) in part.parts
    assert P.crop(P.Full(), 45, 47, (1, 2), (3, 4)) == P.Full()
    assert P.crop(P.Causal(), 45, 47, (0, 45), (0, 47)) == P.Causal()
    assert (
        repr(P.crop(P.Causal(), 8, 8, (4, 8), (0, 4))) == "Crop(Causal(), N=8, S=8, rows=(4, 8), cols=(0, 4))"
    )
    with pytest.raises(ValueError, match=r"rows = \(start, stop\).*rows=\(5, 5\)"):
        P.crop(P.Causal(), 8, 8, (5, 5), (0, 8))
    with pytest.raises(ValueError, match=r"0 <= start < stop <= 8.*cols=\(0, 9\)"):
        P.crop(P.Causal(), 8, 8, (0, 8), (0, 9))
    with pytest.raises(ValueError, match=r"\(N, S\) = \(4, 4\)"):
        P.crop(P.Causal(), 8, 8, (4, 8), (0, 4)).to_dense(4, 5)
