"""The ``triton`` backend: its tile tables (pure torch), its routing, and its kernels run by
Triton's CPU interpreter (``TRITON_INTERPRET=1``) against the float64 oracle.

The kernels are written for GPUs; the interpreter executes the same code on CPU tensors with
NumPy, so what is checked here is the algorithm (tile walk, masks, online softmax, GQA,
ragged edges, empty rows, the recomputing backward), not GPU code generation. bfloat16 is
left to ``bench/gpu.py``'s correctness pass on a GPU: Triton 3.8's interpreter stores
bfloat16 as uint16 and ``tl.dot`` multiplies those integers, so no bfloat16 kernel can be
checked on it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from attnkit import attention, backends
from attnkit import patterns as P
from attnkit.backends.triton import TritonBackend, kernel_tables

from ..reference import attention_ref, grads, max_err, naive_eager, report
from .cases import MASKS, SHAPES, make_inputs, shape_id

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")

# the patterns of the shared cases (mask and bias tensors are declined by this backend)
PATTERN_CASES = [name for name in MASKS if name not in ("bool-mask", "bias", "alibi-window")]
# the shared awkward shapes, with the big GQA one cut down: the interpreter runs every program
# of the grid in NumPy, one after another
SHAPES = [(2, 4, 2, 37, 71, 32, 32) if s == (2, 8, 2, 67, 133, 64, 64) else s for s in SHAPES]
RATIO = 2.0
ATOL = {torch.float32: 2e-6, torch.float16: 1e-3}


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels in the CPU interpreter (which conftest.py turned on before triton was
    imported), on 16 x 16 tiles: many ragged tiles even on small inputs."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: Triton compiles the kernels, and tests/test_cuda.py runs them")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(TritonBackend, "block", (16, 16))


def _check(shape, dtype, case):
    pattern, _, q, k, v = make_inputs(shape, dtype, case)
    dout = torch.randn(*q.shape[:3], v.shape[-1], dtype=torch.float64)

    def run(fn, cast=None):
        leaves = [(t if cast is None else t.to(cast)).detach().clone().requires_grad_() for t in (q, k, v)]
        return grads(lambda: fn(*leaves), leaves, dout)

    want, want_g = run(lambda q, k, v: attention_ref(q, k, v, pattern=pattern), torch.float64)
    eager, eager_g = run(lambda q, k, v: naive_eager(q, k, v, pattern=pattern))
    got, got_g = run(lambda q, k, v: attention(q, k, v, pattern=pattern, backend="triton"))
    assert got.dtype == dtype
    for name, g, e, w in zip(
        ["out", "dq", "dk", "dv"], [got, *got_g], [eager, *eager_g], [want, *want_g], strict=True
    ):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        bound = RATIO * max_err(e, w) + ATOL[dtype]
        assert max_err(g, w) <= bound, report(name, g, w, bound)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("case", PATTERN_CASES)
def test_float32_matches_oracle(interpret, case, shape):
    _check(shape, torch.float32, case)


@needs_triton
@pytest.mark.parametrize("case", PATTERN_CASES)
def test_float16_matches_oracle(interpret, case):
    # one awkward shape per case, rotating through the shared shapes
    shape = SHAPES[PATTERN_CASES.index(case) % len(SHAPES)]
    _check(shape, torch.float16, case)


@needs_triton
def test_lse_and_rows_that_see_nothing(interpret):
    # KeyPadding with a zero length: batch item 1 sees no key at all
    q, k, v = torch.randn(2, 2, 19, 16), torch.randn(2, 1, 23, 16), torch.randn(2, 1, 23, 16)
    for t in (q, k, v):
        t.requires_grad_()
    pattern = P.KeyPadding([23, 0]) | (P.SlidingWindow(2) & P.KeyPadding([0, 0]))
    out, lse = attention(q, k, v, pattern=pattern, backend="triton", return_lse=True)
    ref, ref_lse = attention(
        *(t.detach().double() for t in (q, k, v)), pattern=pattern, backend="reference", return_lse=True
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(lse[1], torch.full_like(lse[1], -torch.inf))
    assert max_err(out, ref) < 1e-5 and max_err(lse[0], ref_lse[0]) < 1e-5
    dq, dk, dv = torch.autograd.grad((out.sum() + lse[0].sum()), (q, k, v))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert torch.equal(dq[1], torch.zeros_like(dq[1]))


@needs_triton
def test_lse_gradient(interpret):
    q, k, v = (torch.randn(1, 2, 21, 16, dtype=torch.float64) for _ in range(3))
    pattern = P.SlidingWindow(5, 2)
    weights = torch.randn(1, 2, 21, dtype=torch.float64)

    def loss(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = attention(*leaves, pattern=pattern, backend=backend, return_lse=True)
        g = torch.autograd.grad(out.sum() + (lse * weights.to(lse.dtype)).sum(), leaves)
        return [x.double() for x in g]

    for got, want in zip(loss("triton", torch.float32), loss("reference", torch.float64), strict=True):
        assert max_err(got, want) < 2e-5


@needs_triton
def test_custom_op_passes_opcheck(interpret):
    """Schema, fake (meta) implementation, autograd registration, and ``torch.compile``'s
    dispatch: what makes the op compose with ``torch.compile``."""
    from attnkit.backends.triton._op import block_sparse_attention

    q = torch.randn(1, 2, 20, 16, requires_grad=True)
    k = torch.randn(1, 1, 33, 16, requires_grad=True)
    v = torch.randn(1, 1, 33, 24, requires_grad=True)
    tables = kernel_tables(P.SlidingWindow(4) | P.Global((0,)), 20, 33, 16, 16, q.device)
    result = torch.library.opcheck(block_sparse_attention, (q, k, v, *tables.tensors, 0.25, 16, 16, 1))
    assert set(result.values()) == {"SUCCESS"}, result


# ------------------------------------------------------------------------- tables (no triton)
@pytest.mark.parametrize(
    "pattern",
    [
        P.Causal(),
        P.SlidingWindow(40, 9),
        P.Strided(16) & P.Causal(),
        P.Document((50, 70, 37)),
        P.KeyPadding([157, 3]),
    ],
    ids=repr,
)
def test_tables_list_exactly_the_nonempty_tiles(pattern):
    n = s = 157
    bq, bk = 32, 16
    t = kernel_tables(pattern, n, s, bq, bk, torch.device("cpu"))
    dense = pattern.to_dense(n, s).reshape(-1, n, s)  # (Bp, N, S)
    states = pattern.block_map(n, s, (bq, bk)).states
    # rows: every non-empty tile once, in order; the columns list the same tiles
    listed = {(r, int(c)) for r in range(states.shape[0]) for c in t.cols[t.row_ptr[r] : t.row_ptr[r + 1]]}
    assert listed == {tuple(x) for x in (states != P.EMPTY).nonzero().tolist()}
    by_col = {(int(r), c) for c in range(states.shape[1]) for r in t.rows[t.col_ptr[c] : t.col_ptr[c + 1]]}
    assert by_col == listed
    # the tables rebuild the dense pattern exactly, for every batch item
    for b in range(dense.shape[0]):
        rebuilt = torch.zeros(n + bq, s + bk, dtype=torch.bool)
        for e in range(t.num_tiles):
            r = int(torch.searchsorted(t.row_ptr, e, right=True)) - 1
            c, mid = int(t.cols[e]), int(t.row_masks[b if t.row_masks.shape[0] > 1 else 0, e])
            tile = torch.ones(bq, bk, dtype=torch.bool) if mid < 0 else t.masks[mid].bool()
            rebuilt[r * bq : (r + 1) * bq, c * bk : (c + 1) * bk] = tile
        assert torch.equal(rebuilt[:n, :s], dense[b])


def test_tables_keep_each_distinct_mask_once():
    """SlidingWindow(100) on 64 x 64 tiles, counted by hand: query tile r sees key tiles r - 2,
    r - 1 and r (tiles 0 and 1 see one and two), so N = 65,536 lists 1 + 2 + 3 * 1022 tiles, and
    their element masks are three shapes, whatever the length."""
    t = kernel_tables(P.SlidingWindow(100), 65536, 65536, 64, 64, torch.device("cpu"))
    assert t.num_tiles == 1 + 2 + 3 * (1024 - 2) == 3069  # docs/gpu.md quotes these counts
    i, c = torch.arange(64)[:, None], torch.arange(64)[None]
    # key j = 64 * tile + c is visible from query 64 * r + i when 64 * r + i - 100 <= j <= 64 * r + i
    by_hand = {"diagonal tile": c <= i, "one tile back": c >= i - 36, "two tiles back": c >= i + 28}
    assert {tuple(m.bool().flatten().tolist()) for m in t.masks} == {
        tuple(m.flatten().tolist()) for m in by_hand.values()
    }


# ------------------------------------------------------------------------- routing
def _inputs(device="cpu", dtype=torch.float32, pattern=None, **kw):
    q = torch.randn(1, 2, 40, 16, dtype=dtype, device=device)
    k = torch.randn(1, 2, 40, 16, dtype=dtype, device=device)
    from attnkit.functional import build_inputs

    return build_inputs(q, k, k, pattern=pattern or P.SlidingWindow(8), **kw)


def test_declines_with_reasons_on_this_machine(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = TritonBackend.unsupported_reasons(_inputs())
    assert any("device=cpu" in r for r in reasons)
    reasons = TritonBackend.unsupported_reasons(_inputs(dtype=torch.float64, mask=torch.ones(40, 40).bool()))
    assert any("dtype=float64" in r for r in reasons) and any("mask" in r for r in reasons)
    import attnkit.backends.triton as triton_backend

    monkeypatch.setattr(triton_backend, "_installed", lambda: False)
    assert any("`triton` package" in r for r in TritonBackend.unsupported_reasons(_inputs()))


def test_auto_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inp = _inputs()
    assert backends.select(inp).name != "triton"
    assert TritonBackend.auto_reasons(inp)
    with pytest.raises(NotImplementedError, match="triton"):
        monkeypatch.delenv("TRITON_INTERPRET")
        backends.select(_inputs(pattern=P.Strided(4)), "triton")


# ------------------------------------------------------------------------- launch limits
def test_tiles_and_stages_fit_the_shared_memory(monkeypatch):
    """The largest tiles whose shared memory fits: 64 x 64 with two stages for small heads,
    smaller tiles for head dim 256 in float32 (which at 64 x 64 exceeds even an H100's 227 KiB),
    and a reason, not a crash, where nothing fits."""
    import attnkit.backends.triton as tb

    def inputs(d, dtype):
        q = torch.zeros(1, 1, 1, d, dtype=dtype).expand(1, 2, 300, d)
        from attnkit.functional import build_inputs

        return build_inputs(q, q, q, pattern=P.SlidingWindow(8))

    small, wide = inputs(64, torch.float16), inputs(256, torch.float32)
    assert tb.launch_config(small) == (64, 64, 2)
    bq, bk, stages = tb.launch_config(wide)
    assert (bq, bk, stages) != (64, 64, 2)
    assert tb.shared_memory(bq, bk, stages, 256, 256, 4) <= tb.INTERPRETER_SHARED_MEMORY
    assert tb.shared_memory(64, 64, 2, 256, 256, 4) > 227 * 1024  # an H100's opt-in limit
    monkeypatch.setattr(tb, "INTERPRETER_SHARED_MEMORY", 16 * 1024)
    reason = tb.launch_config(wide)
    assert isinstance(reason, str) and "16 KiB" in reason and "head dims 256/256" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if HAS_TRITON:
        assert reason in TritonBackend.unsupported_reasons(wide)
        with pytest.raises(NotImplementedError, match="shared memory"):
            backends.select(wide, "triton")


@needs_triton
def test_a_grid_past_cuda_limits_is_declined(monkeypatch):
    """Past 2^31 - 1 programs on the grid's one axis the backend declines with its reason
    (B * H beyond 65,535 runs: ``tests/test_cuda.py`` checks that on a GPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from attnkit.functional import build_inputs

    q = torch.zeros(1, 1, 1, 16).expand(2**20, 2**12, 1, 16)  # no memory: stride 0
    reasons = TritonBackend.unsupported_reasons(build_inputs(q, q, q, pattern=P.SlidingWindow(1)))
    assert any("exceed a grid's 2147483647" in r for r in reasons), reasons


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "blocksparse"])
def test_pieces_of_a_larger_softmax(interpret, backend):
    """The capability the context-parallel ring computes its pairs with (on CUDA through the
    Triton kernels): two key ranges' pieces merged through their lse give the whole attention,
    and each piece's backward against the merged output and lse adds up to the whole gradient,
    the lse's own gradient included."""
    from attnkit.backends import _rows
    from attnkit.functional import build_inputs

    g = torch.Generator().manual_seed(5)
    q, k, v = (
        torch.randn(1, 4, 20, 16, generator=g),
        torch.randn(1, 2, 33, 16, generator=g),
        torch.randn(1, 2, 33, 16, generator=g),
    )
    dout, dlse = torch.randn(1, 4, 20, 16, generator=g), torch.randn(1, 4, 20, generator=g)
    cls = backends.get(backend)
    cut = 15
    pieces = [build_inputs(q, k[:, :, a:b], v[:, :, a:b]) for a, b in ((0, cut), (cut, 33))]
    (out_a, lse_a), (out_b, lse_b) = (cls.partial_forward(p) for p in pieces)
    out, lse = _rows.combine(out_a, lse_a, out_b, lse_b)
    grads = [cls.partial_backward(p, out, lse, dout, dlse) for p in pieces]
    dq = grads[0][0] + grads[1][0]
    dk, dv = torch.cat([grads[0][1], grads[1][1]], 2), torch.cat([grads[0][2], grads[1][2]], 2)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want, want_lse = attention_ref(*leaves, return_lse=True)
    ((want * dout.double()).sum() + (want_lse * dlse.double()).sum()).backward()
    for name, got, ref in [("out", out, want), ("lse", lse, want_lse), ("dq", dq, leaves[0].grad),
                           ("dk", dk, leaves[1].grad), ("dv", dv, leaves[2].grad)]:  # fmt: skip
        assert max_err(got, ref) < 2e-5, report(name, got, ref, 2e-5)
