"""The block-sparse backend: its plans, both engines, dispatch, and numerics at real tile sizes."""

from __future__ import annotations

import pytest
import torch

from attnkit import attention, backends
from attnkit import patterns as P
from attnkit.backends import _engines
from attnkit.backends._residue import residue_split
from attnkit.backends._sparse_plan import choose_block, sparse_plan
from attnkit.backends.blocksparse import BlockSparseBackend, visited_fraction
from attnkit.functional import build_inputs

from ..reference import attention_ref, grads, max_err

BIGBIRD = P.SlidingWindow(48, 48) | P.Global(range(16)) | P.Random(2, 16, seed=0)


def test_window_plan_is_a_copy_free_band_with_gathered_ends():
    plan = sparse_plan(P.SlidingWindow(256, 256), 4096, 4096, 64)
    kinds = [(s.band, s.rows.tolist()) for s in plan.segments]
    # rows 4..59 read a strided view of K; the 4 rows at each end stick out and gather
    assert kinds == [(False, [0, 1, 2, 3]), (True, list(range(4, 60))), (False, [60, 61, 62, 63])]
    assert all(s.length == 9 for s in plan.segments)
    assert plan.visited_tiles == 64 * 9  # the ends' out-of-range tiles included
    assert bool(plan.segments[1].same.all())  # interior rows share one mask


def test_bigbird_plan_gathers_global_and_random_tiles():
    plan = sparse_plan(BIGBIRD, 1024, 1024, 16)
    kinds = [(s.band, s.rows.numel()) for s in plan.segments]
    assert kinds[:3] == [(False, 3), (True, 58), (False, 3)]  # band: ends gathered
    assert all(not band for band, _ in kinds[3:])
    # the global query row gathers every tile outside its band (clipped to 4 tiles at the edge)
    assert any(s.rows.tolist() == [0] and s.length == 64 - 4 for s in plan.segments[1:])


@pytest.mark.parametrize(
    "pattern",
    [P.SlidingWindow(40, 7), BIGBIRD, P.Strided(24) & P.Causal(), P.Document((100, 300, 112)) & P.Causal()],
    ids=repr,
)
def test_plans_cover_each_nonempty_tile_exactly_once(pattern):
    """The band may also compute empty tiles (masked): that is its trade-off; gathers never do."""
    n = s = 512
    plan = sparse_plan(pattern, n, s, 16)
    bm = pattern.block_map(n, s, 16)
    hits = torch.zeros(bm.states.shape, dtype=torch.int64)
    for seg in plan.segments:
        cols = seg.cols
        inside = (cols >= 0) & (cols < bm.num_k_blocks)
        rows = seg.rows[:, None].expand_as(cols)
        hits.index_put_(
            (rows[inside], cols[inside]), torch.ones(int(inside.sum()), dtype=torch.int64), accumulate=True
        )
    nonempty = bm.states != P.EMPTY
    assert bool((hits[nonempty] == 1).all()) and int(hits.max()) == 1


def test_fused_kernel_is_available_on_this_torch():
    assert _engines.fused_cpu_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", [P.SlidingWindow(100, 30), BIGBIRD, P.Strided(32) & P.Causal()], ids=repr)
def test_default_tiles_match_the_oracle(pattern, dtype):
    """At the real tile sizes (64 forward, 128 backward), with GQA and ragged N != S."""
    B, H, Hkv, N, S, D = 1, 4, 2, 555, 600, 32
    q = torch.randn(B, H, N, D, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, S, D, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, S, D, dtype=torch.float64).to(dtype)
    dout = torch.randn(B, H, N, D, dtype=torch.float64)

    def run(fn, cast=None):
        ts = [t.detach().to(cast or t.dtype).requires_grad_() for t in (q, k, v)]
        return grads(lambda: fn(*ts), ts, dout)

    want = run(lambda *t: attention_ref(*t, pattern=pattern), torch.float64)
    eager = run(lambda *t: attention_ref(*t, pattern=pattern, dtype=dtype))
    got = run(lambda *t: attention(*t, pattern=pattern, backend="blocksparse"))
    atol = {torch.float32: 2e-6, torch.bfloat16: 8e-3}[dtype]
    for g, e, w in zip([got[0], *got[1]], [eager[0], *eager[1]], [want[0], *want[1]], strict=True):
        assert max_err(g, w) <= 2 * max_err(e, w) + atol


def test_eager_engine_equals_the_fused_engine(monkeypatch):
    q, k, v = (torch.randn(1, 2, 300, 32, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pattern = P.SlidingWindow(50) | P.Global((0, 1))
    fused = grads(
        lambda: attention(q, k, v, pattern=pattern, backend="blocksparse"),
        [q, k, v],
        torch.ones(1, 2, 300, 32),
    )
    monkeypatch.setattr(_engines, "fused_cpu_available", lambda: False)
    monkeypatch.setattr("attnkit.backends.blocksparse.fused_cpu_available", lambda: False)
    eager = grads(
        lambda: attention(q, k, v, pattern=pattern, backend="blocksparse"),
        [q, k, v],
        torch.ones(1, 2, 300, 32),
    )
    for a, b in zip([fused[0], *fused[1]], [eager[0], *eager[1]], strict=True):
        assert max_err(a, b) < 1e-12


def test_dropout_equals_reference_exactly(small_tiles):
    q, k, v = (torch.randn(2, 4, 70, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pattern = P.SlidingWindow(20) & P.Causal()
    runs = []
    for backend in ("reference", "blocksparse"):
        torch.manual_seed(9)
        runs.append(
            grads(
                lambda b=backend: attention(q, k, v, pattern=pattern, dropout_p=0.2, backend=b),
                [q, k, v],
                torch.ones(2, 4, 70, 16),
            )
        )
    for a, b in zip([runs[0][0], *runs[0][1]], [runs[1][0], *runs[1][1]], strict=True):
        assert max_err(a, b) < 1e-12


def test_lse_is_the_log_sum_exp_of_the_allowed_scores(small_tiles):
    """Rows covered by several segments (window and global column) merge their lse exactly;
    checked against ``logsumexp`` of the masked scores, computed here."""
    q, k, v = (torch.randn(1, 2, 50, 16, dtype=torch.float64) for _ in range(3))
    pattern = P.SlidingWindow(6) | P.Global((3,))
    _, lse = attention(q, k, v, pattern=pattern, return_lse=True, backend="blocksparse")
    scores = (q @ k.mT) * 16**-0.5
    want = scores.masked_fill(~pattern.to_dense(50, 50), float("-inf")).logsumexp(-1)
    assert max_err(lse, want) < 1e-12


def test_auto_picks_blocksparse_for_sparse_patterns_only():
    q = torch.randn(1, 2, 2048, 32)

    def chosen(pattern):
        return backends.select(build_inputs(q, q, q, pattern=pattern)).name

    assert chosen(P.SlidingWindow(128, 128)) == "blocksparse"
    assert chosen(P.SlidingWindow(64) | P.Global((0,)) | P.Random(2, 64)) == "blocksparse"
    assert chosen(None) == "sdpa"
    assert chosen(P.Causal()) == "sdpa"
    assert chosen(P.SlidingWindow(1500, 1500)) == "sdpa"  # dense: most tiles visited
    wide = P.SlidingWindow(1500, 1500)
    assert visited_fraction(wide, 2048, 2048, choose_block(wide, 2048, 2048)) > 0.7


def test_forced_blocksparse_runs_dense_attention():
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64) for _ in range(3))
    assert max_err(attention(q, k, v, backend="blocksparse"), attention_ref(q, k, v)) < 1e-12


def test_auto_reasons_say_why_blocksparse_was_passed_over():
    q = torch.randn(1, 2, 2048, 32)
    dense = BlockSparseBackend.auto_reasons(build_inputs(q, q, q, pattern=P.Causal()))
    assert dense == ["pattern Causal() runs natively on sdpa"]
    wide = BlockSparseBackend.auto_reasons(build_inputs(q, q, q, pattern=P.SlidingWindow(1500, 1500)))
    assert "is too dense: predicted" in wide[0]
    assert BlockSparseBackend.auto_reasons(build_inputs(q, q, q, pattern=P.SlidingWindow(64))) == []


@pytest.mark.parametrize(
    ("pattern", "stride"),
    [(P.Strided(16) & P.Causal(), 16), (P.Strided(16), 16), (P.Dilated(60, 4), 4), (P.Dilated(30, 3, 12), 3)],
    ids=repr,
)
def test_periodic_patterns_split_into_rest_and_regrouped_classes(pattern, stride):
    n = 192
    rest, regrouped, s = residue_split(pattern, n, n)
    assert s == stride
    # the two pieces partition the pattern: regrouping the second back gives the periodic part
    perm = torch.arange(n).view(n // s, s).T.reshape(-1)  # position at each regrouped index
    periodic = torch.zeros(n, n, dtype=torch.bool)
    periodic[perm[:, None], perm[None, :]] = regrouped.to_dense(n, n)
    dense = pattern.to_dense(n, n)
    assert torch.equal(rest.to_dense(n, n) | periodic, dense)
    assert not bool((rest.to_dense(n, n) & periodic).any())
    assert residue_split(pattern, n, n + 1) is None  # N != S: plain tiles
    assert residue_split(P.SlidingWindow(5), n, n) is None  # nothing periodic


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", [P.Strided(32) & P.Causal(), P.Dilated(200, 8, 40)], ids=repr)
def test_regrouped_computation_matches_the_oracle(pattern, dtype):
    B, H, Hkv, N, D = 1, 4, 2, 512, 32
    q = torch.randn(B, H, N, D, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, N, D, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, N, D, dtype=torch.float64).to(dtype)
    assert BlockSparseBackend.plan(pattern, N, N)[-1].stride is not None  # the regrouped path runs
    dout = torch.randn(B, H, N, D, dtype=torch.float64)

    def run(fn, cast=None):
        ts = [t.detach().to(cast or t.dtype).requires_grad_() for t in (q, k, v)]
        return grads(lambda: fn(*ts), ts, dout)

    want = run(lambda *t: attention_ref(*t, pattern=pattern), torch.float64)
    got = run(lambda *t: attention(*t, pattern=pattern, backend="blocksparse"))
    if dtype == torch.float64:
        for g, w in zip([got[0], *got[1]], [want[0], *want[1]], strict=True):
            assert max_err(g, w) < 1e-12
    else:
        eager = run(lambda *t: attention_ref(*t, pattern=pattern, dtype=dtype))
        for g, e, w in zip([got[0], *got[1]], [eager[0], *eager[1]], [want[0], *want[1]], strict=True):
            assert max_err(g, w) <= 2 * max_err(e, w) + 8e-3


def test_rows_left_unwritten_by_some_segments_stay_finite():
    """Regression: a layout whose rows are covered by different numbers of segments. The output
    accumulator used to be ``torch.empty``; merging read it for rows a segment never wrote, and
    with poisoned memory (this suite's deterministic mode) 128 rows came back NaN."""
    assert torch.are_deterministic_algorithms_enabled()  # torch.empty is filled with NaN
    grid = torch.zeros(8, 8, dtype=torch.bool)
    grid[torch.arange(2, 8), torch.arange(2, 8)] = True  # a diagonal on rows 2..7
    grid[:7, 7] = True  # and column 7 on rows 0..6
    pattern = P.BlockLayout(grid, 32)
    q, k, v = (torch.randn(1, 2, 256, 32, dtype=torch.float64, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 2, 256, 32, dtype=torch.float64)
    got = grads(lambda: attention(q, k, v, pattern=pattern, backend="blocksparse"), [q, k, v], dout)
    want = grads(lambda: attention_ref(q, k, v, pattern=pattern), [q, k, v], dout)
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]], strict=True):
        assert not bool(g.isnan().any())
        assert max_err(g, w) < 1e-12


@pytest.mark.parametrize("tiles", [None, (8, 16)], ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize(
    "static",
    [
        P.SlidingWindow(40, 7),
        BIGBIRD,
        P.Strided(24) & P.Causal(),
        P.Full(),
        P.Dilated(30, 3) | P.Global((5,)),
    ],
    ids=repr,
)
def test_key_padding_applied_at_call_time_matches_the_oracle(static, tiles, monkeypatch):
    """``KeyPadding & static``: one plan for ``static``, lengths applied per call (0 and S included)."""
    if tiles is not None:
        monkeypatch.setattr(BlockSparseBackend, "block", tiles[0])
        monkeypatch.setattr(BlockSparseBackend, "backward_block", tiles[1])
    B, H, Hkv, N, S, D = 4, 4, 2, 203, 230, 16
    pattern = P.KeyPadding((230, 0, 97, 161)) & static
    q = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hkv, S, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, H, N, D, dtype=torch.float64)
    got = grads(lambda: attention(q, k, v, pattern=pattern, backend="blocksparse"), [q, k, v], dout)
    want = grads(lambda: attention_ref(q, k, v, pattern=pattern), [q, k, v], dout)
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]], strict=True):
        assert max_err(g, w) < 1e-12


def test_key_padding_with_a_user_mask_and_dropout(small_tiles):
    """The eager engine (dropout) and a user mask on top of call-time key lengths."""
    B, H, N, D = 3, 2, 70, 16
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(3)) > 0.3
    pattern = P.KeyPadding((70, 33, 5)) & P.SlidingWindow(20) & P.Causal()
    runs = []
    for backend in ("reference", "blocksparse"):
        torch.manual_seed(9)
        runs.append(
            grads(
                lambda b=backend: attention(q, k, v, pattern=pattern, mask=mask, dropout_p=0.2, backend=b),
                [q, k, v],
                torch.ones(B, H, N, D),
            )
        )
    for a, b in zip([runs[0][0], *runs[0][1]], [runs[1][0], *runs[1][1]], strict=True):
        assert max_err(a, b) < 1e-12


def test_new_key_lengths_reuse_one_plan():
    """Every padded batch shares the plan of the batch-independent part: the plan cache does
    not grow with the number of distinct length tuples."""
    from attnkit import caches

    caches.clear("plans")
    q = torch.randn(2, 1, 512, 16)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(0, 513, (2,), generator=g).tolist()
        attention(q, q, q, pattern=P.KeyPadding(lengths) & P.SlidingWindow(64, 64), backend="blocksparse")
    assert caches.info()["plans"].entries == 1


@pytest.mark.parametrize(
    ("pattern", "heads"),
    [
        (P.Full(), (4, 2)),  # one fused call, query heads of a group stacked
        (P.Causal(), (3, 3)),  # one fused causal call on the square piece
        (P.Causal(), (4, 2)),  # GQA causal: tiles
        (P.SlidingWindow(5, 2), (4, 1)),
        (P.Document((9, 20, 12)) & P.Causal(), (2, 2)),
    ],
    ids=repr,
)
def test_partial_pieces_add_up_to_the_whole(pattern, heads):
    """Attention split by keys into pieces (as context parallelism splits it): the pieces'
    forwards merge through their log-sum-exps into the whole, and their backwards from the
    merged output add up to the whole's gradients, against the float64 oracle."""
    from attnkit.backends import _rows

    H, Hkv = heads
    n = 41
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, H, n, 16, generator=g)
    k, v = (torch.randn(2, Hkv, n, 16, generator=g) for _ in range(2))
    dout = torch.randn(2, H, n, 16, generator=g)
    cuts = [(0, 17), (17, n)]
    pieces = []
    for rows in cuts:  # query pieces
        for cols in cuts:  # key pieces
            part = P.crop(pattern, n, n, rows, cols)
            if part.num_allowed(rows[1] - rows[0], cols[1] - cols[0]) == 0:
                continue
            qs, ks = slice(*rows), slice(*cols)
            pieces.append((qs, ks, build_inputs(q[:, :, qs], k[:, :, ks], v[:, :, ks], pattern=part)))
    out = torch.zeros(2, H, n, 16)
    lse = torch.full((2, H, n), float("-inf"))
    for qs, _, inp in pieces:
        o, s = BlockSparseBackend.partial_forward(inp)
        out[:, :, qs], lse[:, :, qs] = _rows.combine(out[:, :, qs], lse[:, :, qs], o, s)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    added = [torch.zeros_like(t) for t in (q, k, v)]  # the same through ``into=``
    for qs, ks, inp in pieces:
        a, b, c = BlockSparseBackend.partial_backward(inp, out[:, :, qs], lse[:, :, qs], dout[:, :, qs])
        dq[:, :, qs] += a
        dk[:, :, ks] += b
        dv[:, :, ks] += c
        into = (added[0][:, :, qs], added[1][:, :, ks], added[2][:, :, ks])
        BlockSparseBackend.partial_backward(inp, out[:, :, qs], lse[:, :, qs], dout[:, :, qs], into=into)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want, want_grads = grads(lambda: attention_ref(*leaves, pattern=pattern), leaves, dout)
    assert max_err(out, want) < 1e-5
    for got, into_got, ref in zip((dq, dk, dv), added, want_grads, strict=True):
        assert max_err(got, ref) < 1e-5
        assert max_err(into_got, ref) < 1e-5


def test_partial_backward_adds_in_place_into_views_of_the_callers_gradients(monkeypatch):
    """A tiled piece whose rows and keys fill whole tiles (one query per key head) accumulates
    straight into ``into`` — views of the caller's gradients, no piece-sized copies — and
    the sums equal the float64 oracle's; a piece run as one fused call is not in place."""
    from attnkit.backends import _rows
    from attnkit.backends.blocksparse import _tile_views

    monkeypatch.setattr(BlockSparseBackend, "block", 8)
    monkeypatch.setattr(BlockSparseBackend, "backward_block", 8)
    n, pattern = 48, P.SlidingWindow(5, 2)
    g = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(1, 3, n, 16, generator=g) for _ in range(4))
    cuts = [(0, 16), (16, n)]
    pieces = []
    for rows in cuts:
        for cols in cuts:
            part = P.crop(pattern, n, n, rows, cols)
            if part.num_allowed(rows[1] - rows[0], cols[1] - cols[0]):
                pieces.append((slice(*rows), slice(*cols), build_inputs(q[:, :, slice(*rows)], k[:, :, slice(*cols)], v[:, :, slice(*cols)], pattern=part)))  # fmt: skip
    out, lse = torch.zeros(1, 3, n, 16), torch.full((1, 3, n), float("-inf"))
    for qs, _, inp in pieces:
        o, s = BlockSparseBackend.partial_forward(inp)
        out[:, :, qs], lse[:, :, qs] = _rows.combine(out[:, :, qs], lse[:, :, qs], o, s)
    added = [torch.zeros_like(t) for t in (q, k, v)]
    for qs, ks, inp in pieces:
        assert BlockSparseBackend.partial_in_place(inp)
        into = (added[0][:, :, qs], added[1][:, :, ks], added[2][:, :, ks])
        job, parts = BlockSparseBackend._job(inp, backward=True, whole_ok=True)
        views = _tile_views(job, parts[0].backward_plan, into)
        assert all(
            vw is not None and vw.data_ptr() == t.data_ptr() for vw, t in zip(views, into, strict=True)
        )
        BlockSparseBackend.partial_backward(inp, out[:, :, qs], lse[:, :, qs], dout[:, :, qs], into=into)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    _, want_grads = grads(lambda: attention_ref(*leaves, pattern=pattern), leaves, dout)
    for got, ref in zip(added, want_grads, strict=True):
        assert max_err(got, ref) < 1e-5
    whole = build_inputs(q, k, v, pattern=P.Causal())
    assert not BlockSparseBackend.partial_in_place(whole)


def test_tiles_priced_near_the_best_are_timed_on_the_call_and_the_fastest_kept(monkeypatch):
    """With tuning on, a call large enough to be worth it times the tiles the cost model prices
    near its best, on its own inputs, forward and backward, runs the fastest, keeps the choice
    per shape, and gives the oracle's numbers whatever the tile."""
    from attnkit import caches
    from attnkit._timing import Timing
    from attnkit.backends import _tuning
    from attnkit.backends import blocksparse as bs

    monkeypatch.setattr(_tuning, "enabled", lambda: True)
    monkeypatch.setattr(_tuning, "current", lambda dtype=None: _tuning.DEFAULT)
    monkeypatch.setattr(bs, "MEASURE_ABOVE_S", 0.0)
    monkeypatch.setattr(bs, "MEASURE_WITHIN", 100.0)  # every tile is a candidate
    caches.clear("measured_tiles")
    timed = []

    def fake_timing(calls, repeats):  # tile 128 is "fastest" forward, 64 backward
        timed.append(sorted(calls))
        winner = 128 if len(timed) == 1 else 64
        return {b: Timing((0.001 if b == winner else 0.002,)) for b in calls}

    monkeypatch.setattr(bs, "time_in_turns", fake_timing)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pattern = P.SlidingWindow(40, 9)
    used = []
    real_plan = bs.sparse_plan
    monkeypatch.setattr(bs, "sparse_plan", lambda p, n, s, b, d: used.append(b) or real_plan(p, n, s, b, d))
    out = attention(q, k, v, pattern=pattern, backend="blocksparse")
    assert timed == [[32, 64, 128, 256], [32, 64, 128, 256]]  # forward, then backward candidates
    # each direction plans every candidate to time it, then runs the winner: 128, then 64
    assert used == [32, 64, 128, 256, 128, 32, 64, 128, 256, 64]
    ref = attention_ref(q, k, v, pattern=pattern)
    assert max_err(out, ref) < 1e-12
    (out * torch.arange(16.0, dtype=torch.float64)).sum().backward()
    dq = q.grad.clone()
    q.grad = None
    (ref * torch.arange(16.0, dtype=torch.float64)).sum().backward()
    assert max_err(dq, q.grad) < 1e-10
    attention(q, k, v, pattern=pattern, backend="blocksparse")  # the same shape: not timed again
    assert len(timed) == 2
    caches.clear("measured_tiles")
