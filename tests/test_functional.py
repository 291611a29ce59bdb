"""``attention()``'s contract: return values, special rows, dropout, dispatch and errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnkit import attention, backends
from attnkit import patterns as P
from attnkit.backends import AttentionResult, Backend, register_backend

from .reference import attention_ref, max_err

ALL = ["reference", "eager", "sdpa", "tiled", "blocksparse"]


def qkv(B=2, H=4, Hkv=2, N=19, S=23, D=16, dtype=torch.float32, grad=False):
    q = torch.randn(B, H, N, D, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, Hkv, S, D, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, Hkv, S, D, dtype=dtype, requires_grad=grad)
    return q, k, v


# ------------------------------------------------------------------ special rows and values
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ALL)
def test_fully_masked_rows_give_zero_output_and_zero_grad(backend, dtype, small_tiles):
    q, k, v = qkv(dtype=dtype, grad=True)
    mask = torch.ones(2, 1, 19, 23, dtype=torch.bool)
    mask[0, :, 3] = False
    mask[1, :, 10:] = False
    out = attention(q, k, v, mask=mask, backend=backend)
    assert torch.all(out[0, :, 3] == 0) and torch.all(out[1, :, 10:] == 0)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[0, :, 3] == 0) and torch.all(q.grad[1, :, 10:] == 0)


@pytest.mark.parametrize("backend", ALL)
def test_all_minus_inf_bias_row_gives_zero(backend, small_tiles):
    q, k, v = qkv(grad=True)
    bias = torch.zeros(1, 1, 19, 23, requires_grad=True)
    with torch.no_grad():
        bias[..., 5, :] = float("-inf")
    out = attention(q, k, v, mask=bias, backend=backend)
    assert torch.all(out[:, :, 5] == 0)
    out.sum().backward()
    assert torch.isfinite(bias.grad).all() and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", ALL)
def test_empty_key_padding_row_gives_zero(backend, small_tiles):
    q, k, v = qkv()
    out = attention(q, k, v, pattern=P.KeyPadding([23, 0]), backend=backend)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ALL)
def test_huge_logits_stay_finite(backend, dtype, small_tiles):
    q, k, v = qkv(dtype=dtype)
    q = (q * 100).requires_grad_()  # logits ~1e4
    k = (k * 100).requires_grad_()
    out = attention(q, k, v, pattern=P.Causal(), backend=backend)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    want = attention_ref(q.detach(), k.detach(), v, pattern=P.Causal())
    assert max_err(out, want) < (2e-5 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ALL)
def test_half_inputs_return_their_dtype(backend, dtype):
    q, k, v = qkv(dtype=dtype)
    assert attention(q, k, v, backend=backend).dtype == dtype


def test_scale_is_used():
    q, k, v = qkv()
    for backend in ALL:
        got = attention(q, k, v, scale=0.3, backend=backend)
        assert max_err(got, attention_ref(q, k, v, scale=0.3)) < 1e-5


def test_non_contiguous_inputs(small_tiles):
    x = torch.randn(2, 19, 4, 16)  # (B, N, H, D) as projections produce it
    q = k = v = x.transpose(1, 2)
    want = attention_ref(q, k, v, pattern=P.Causal())
    for backend in ALL:
        assert max_err(attention(q, k, v, pattern=P.Causal(), backend=backend), want) < 1e-5


def test_nan_poisoned_neighbours_are_never_read(small_tiles):
    """Inputs are views into buffers whose other entries are NaN."""
    buf = torch.full((2, 4, 40, 16), float("nan"))
    buf[:, :, :19] = torch.randn(2, 4, 19, 16)
    q = buf[:, :, :19]
    kbuf = torch.full((2, 2, 40, 16), float("nan"))
    kbuf[:, :, 5:28] = torch.randn(2, 2, 23, 16)
    k = v = kbuf[:, :, 5:28]
    for backend in ALL:
        out = attention(q, k, v, pattern=P.SlidingWindow(4), backend=backend)
        assert torch.isfinite(out).all(), backend


def test_tiled_is_deterministic(small_tiles):
    q, k, v = qkv(grad=True)
    runs = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        out = attention(q, k, v, pattern=P.SlidingWindow(5, 2), backend="tiled")
        out.square().sum().backward()
        runs.append([out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ lse and weights
@pytest.mark.parametrize("backend", ["reference", "eager", "tiled", "blocksparse"])
def test_lse_is_the_log_sum_exp_of_the_masked_scores(backend, small_tiles):
    q, k, v = qkv(dtype=torch.float64)
    pattern = P.SlidingWindow(3) & P.Causal()
    mask = torch.ones(19, 23, dtype=torch.bool)
    mask[7] = False
    _, lse = attention(q, k, v, pattern=pattern, mask=mask, return_lse=True, backend=backend)
    scores = q @ k.repeat_interleave(2, 1).mT * 16**-0.5
    allowed = pattern.to_dense(19, 23) & mask
    want = scores.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    assert lse.shape == (2, 4, 19) and lse.dtype == torch.float64
    assert torch.all(lse[:, :, 7] == float("-inf"))
    finite = torch.isfinite(want)
    assert torch.allclose(lse[finite], want[finite], atol=1e-12)


def test_lse_dtype_is_float32_for_half_inputs():
    q, k, v = qkv(dtype=torch.bfloat16)
    _, lse = attention(q, k, v, return_lse=True)
    assert lse.dtype == torch.float32


def test_weights_sum_to_one_and_match_the_oracle():
    q, k, v = qkv()
    mask = torch.ones(19, 23, dtype=torch.bool)
    mask[2] = False
    out, w = attention(q, k, v, pattern=P.Causal(), mask=mask, return_weights=True)
    assert out.shape == (2, 4, 19, 16) and w.shape == (2, 4, 19, 23)
    sums = w.sum(-1)
    assert torch.allclose(sums[:, :, 2], torch.zeros(())) and torch.allclose(
        sums[:, :, [i for i in range(19) if i != 2]], torch.ones(())
    )
    assert max_err(w @ v.repeat_interleave(2, 1), out) < 1e-5


def test_all_three_outputs():
    q, k, v = qkv(dtype=torch.float64)
    out, weights, lse = attention(q, k, v, pattern=P.Causal(), return_weights=True, return_lse=True)
    assert weights.shape == (2, 4, 19, 23) and lse.shape == (2, 4, 19)
    scores = torch.einsum("bhnd,bhsd->bhns", q, k.repeat_interleave(2, 1)) * 16**-0.5
    scores = scores.masked_fill(~P.Causal().to_dense(19, 23), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1))
    torch.testing.assert_close(weights, scores.softmax(-1))
    torch.testing.assert_close(out, attention(q, k, v, pattern=P.Causal()))


# ------------------------------------------------------------------ dropout
def test_dropout_is_the_same_mask_on_reference_eager_and_tiled(small_tiles):
    q, k, v = qkv(dtype=torch.float64, grad=True)
    results = []
    for backend in ("reference", "eager", "tiled"):
        for t in (q, k, v):
            t.grad = None
        torch.manual_seed(42)
        out = attention(q, k, v, pattern=P.Causal(), dropout_p=0.3, backend=backend)
        out.square().sum().backward()
        results.append([out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert max_err(a, b) < 1e-12


def test_dropout_statistics_and_reproducibility():
    q, k, v = qkv(B=4, H=4, Hkv=4, N=64, S=64)
    torch.manual_seed(1)
    _, w = attention(q, k, v, dropout_p=0.25, return_weights=True)
    dropped = (w == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.01  # 65k weights: 4 sigma is ~0.007
    _, w_plain = attention(q, k, v, return_weights=True)
    assert torch.allclose(w[w != 0], (w_plain / 0.75)[w != 0])
    torch.manual_seed(1)
    _, again = attention(q, k, v, dropout_p=0.25, return_weights=True)
    assert torch.equal(w, again)
    torch.manual_seed(2)
    _, other = attention(q, k, v, dropout_p=0.25, return_weights=True)
    assert not torch.equal(w, other)


@pytest.mark.parametrize("backend", ALL)
def test_dropout_is_reproducible_under_manual_seed(backend):
    q, k, v = qkv()
    torch.manual_seed(5)
    a = attention(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(5)
    b = attention(q, k, v, dropout_p=0.5, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, attention(q, k, v, backend=backend))


# ------------------------------------------------------------------ dispatch
def _auto(**kwargs):
    from attnkit.functional import build_inputs

    q, k, v = qkv()
    return backends.select(build_inputs(q, k, v, **kwargs)).name


def test_auto_choices():
    assert _auto() == "sdpa"
    assert _auto(pattern=P.Causal()) == "sdpa"
    assert _auto(pattern=P.KeyPadding([3, 23])) == "sdpa"
    assert _auto(return_weights=True) == "reference"
    assert _auto(return_lse=True) == "tiled"


def test_auto_trains_short_sequences_on_eager_up_to_the_measured_length(monkeypatch):
    from attnkit.backends import _tuning
    from attnkit.functional import build_inputs

    def choice(N, S, grad=True, **kwargs):
        q, k, v = qkv(N=N, S=S, grad=grad)
        return backends.select(build_inputs(q, k, v, **kwargs)).name

    for keys in (0, 32):
        monkeypatch.setattr(_tuning, "DEFAULT", dataclasses.replace(_tuning.DEFAULT, eager_keys=keys))
        _tuning.forget()  # the dispatch cache
        short = "eager" if keys else "sdpa"
        assert choice(19, 23) == short
        assert choice(19, 23, pattern=P.Causal()) == short
        assert choice(19, 23, pattern=P.KeyPadding([3, 23])) == short
        assert choice(19, 23, grad=False) == "sdpa"  # inference keeps the fused kernel
        assert choice(19, 33) == "sdpa"  # longer than the crossover
        with torch.no_grad():
            assert choice(19, 23) == "sdpa"
    assert choice(19, 23, pattern=P.SlidingWindow(4) | P.Global((0,))) != "eager"
    _tuning.forget()


def test_auto_within_tolerance_of_forced_backends():
    q, k, v = qkv()
    for pattern in (None, P.Causal(), P.SlidingWindow(4) | P.Global((0,))):
        want = attention_ref(q, k, v, pattern=pattern)
        assert max_err(attention(q, k, v, pattern=pattern), want) < 1e-5


def test_large_sparse_patterns_leave_sdpa():
    q = torch.randn(1, 1, 9000, 8)
    reasons = backends.get("sdpa").unsupported_reasons(
        __import__("attnkit.functional", fromlist=["x"]).build_inputs(q, q, q, pattern=P.SlidingWindow(8))
    )
    assert any("dense mask" in r for r in reasons)


def test_forcing_an_unable_backend_lists_every_backends_reasons():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError) as e:
        attention(q, k, v, return_weights=True, backend="sdpa")
    msg = str(e.value)
    assert "backend 'sdpa' can run these inputs" not in msg
    assert "sdpa: return_weights=True is not supported" in msg
    assert "tiled: return_weights=True is not supported" in msg
    assert "reference: can run these inputs" in msg
    assert "q: (2, 4, 19, 16)" in msg


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(
        ValueError,
        match=r"one of \['varlen', 'triton', 'flex', 'blocksparse', 'eager', 'sdpa', 'tiled', 'reference'\], "
        r"but got backend='flash'",
    ):
        attention(q, k, v, backend="flash")


def test_register_backend_and_priority():
    class Doubler(Backend):
        name = "doubler"
        dtypes = frozenset({torch.float64})

        @classmethod
        def forward(cls, inp):
            return AttentionResult(2 * attention(inp.q, inp.k, inp.v, backend="reference"))

    try:
        register_backend(Doubler, priority=0)
        assert backends.available()[0] == "doubler"
        q, k, v = qkv(dtype=torch.float64)
        assert torch.allclose(attention(q, k, v), 2 * attention(q, k, v, backend="sdpa"))
        q32, k32, v32 = qkv()
        assert torch.allclose(attention(q32, k32, v32), attention(q32, k32, v32, backend="sdpa"))
    finally:
        from attnkit.backends import _PRIORITY, _REGISTRY

        _REGISTRY.pop("doubler", None)
        _PRIORITY.remove("doubler")
    with pytest.raises(TypeError, match="Backend subclass"):
        register_backend(int)


# ------------------------------------------------------------------ errors
def _err(**over):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v} | {n: over.pop(n) for n in ("q", "k", "v") if n in over}
    return lambda: attention(args["q"], args["k"], args["v"], **over)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (_err(q=[1.0]), TypeError, r"expected q to be a Tensor, but got list"),
        (
            _err(q=torch.randn(4, 19, 16)),
            ValueError,
            r"q to be 4-D \(B, H, N, D\), but got q.shape=\(4, 19, 16\)",
        ),
        (
            _err(k=torch.randn(2, 2, 23, 16).long()),
            ValueError,
            r"k to be float16, .* k.dtype=torch.int64",
        ),
        (_err(v=torch.randn(2, 2, 23, 16, dtype=torch.float64)), ValueError, r"share one dtype"),
        (_err(q=torch.randn(2, 4, 0, 16)), ValueError, r"every dimension of q to be >= 1"),
        (
            _err(k=torch.randn(3, 2, 23, 16)),
            ValueError,
            r"the same batch size B \(q: 2, k: 3, v: 2\)",
        ),
        (
            _err(v=torch.randn(2, 2, 22, 16)),
            ValueError,
            r"k and v to have the same S \(k: 23, v: 22\)",
        ),
        (
            _err(k=torch.randn(2, 2, 23, 8)),
            ValueError,
            r"q and k to have the same D \(q: 16, k: 8\)",
        ),
        (
            _err(k=torch.randn(2, 3, 23, 16), v=torch.randn(2, 3, 23, 16)),
            ValueError,
            r"H to be a multiple of Hkv, but got H=4 .* Hkv=3",
        ),
        (_err(scale="big"), TypeError, r"scale to be a finite float or None, but got 'big'"),
        (_err(scale=float("nan")), TypeError, r"finite float"),
        (_err(dropout_p=1.0), ValueError, r"0 <= dropout_p < 1, but got dropout_p=1.0"),
        (_err(dropout_p=-0.1), ValueError, r"dropout_p=-0.1"),
        (_err(return_lse=1), TypeError, r"return_lse to be a bool"),
        (
            _err(pattern="causal"),
            TypeError,
            r"pattern to be an attnkit.patterns.Pattern, but got str",
        ),
        (
            _err(pattern=P.KeyPadding([1, 2, 3])),
            ValueError,
            r"batch size to equal B=2, but got .* 3 batch items",
        ),
        (_err(pattern=P.Document([10, 10])), ValueError, r"sum\(lengths\) == S"),
        (_err(mask=P.Causal()), TypeError, r"mask must be a Tensor; pass patterns as pattern="),
        (_err(mask=[[True]]), TypeError, r"mask to be a Tensor, but got list"),
        (
            _err(mask=torch.ones(19, 22, dtype=torch.bool)),
            ValueError,
            r"broadcastable to \(B, H, N, S\)=\(2, 4, 19, 23\), but got mask.shape=\(19, 22\)",
        ),
        (_err(mask=torch.ones(1, 1, 1, 19, 23, dtype=torch.bool)), ValueError, r"broadcastable"),
        (
            _err(mask=torch.ones(19, 23, dtype=torch.int64)),
            ValueError,
            r"bool .* or floating .* mask.dtype=torch.int64",
        ),
        (_err(backend=3), TypeError, r"backend to be a str"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
