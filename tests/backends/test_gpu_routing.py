"""The GPU routes on a machine without CUDA: what each CUDA backend declares, how patterns
translate to ``varlen_attn``'s arguments, and FlexAttention compiled on CPU (inference only)."""

from __future__ import annotations

import shutil

import pytest
import torch

from attnkit import attention, backends
from attnkit import patterns as P
from attnkit.backends.flex import FlexBackend
from attnkit.backends.varlen import VarlenBackend, varlen_layout
from attnkit.functional import build_inputs

from ..reference import max_err


def _inputs(pattern, n=40, s=40, dtype=torch.float16, **kw):
    q = torch.randn(2, 4, n, 16, dtype=dtype)
    k = torch.randn(2, 2, s, 16, dtype=dtype)
    return build_inputs(q, k, k, pattern=pattern, **kw)


def test_the_auto_order():
    assert backends.available() == [
        "varlen",
        "triton",
        "flex",
        "blocksparse",
        "eager",
        "sdpa",
        "tiled",
        "reference",
    ]


@pytest.mark.parametrize(
    "pattern",
    [None, P.Causal(), P.SlidingWindow(8), P.Strided(4) & P.Causal(), P.KeyPadding([40, 3])],
    ids=repr,
)
def test_cpu_auto_is_unchanged_by_the_cuda_backends(pattern, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for dtype in (torch.float32, torch.bfloat16):
        chosen = backends.select(_inputs(pattern, 300, 300, dtype=dtype)).name
        assert chosen in ("blocksparse", "sdpa"), chosen


def test_cuda_backends_decline_on_cpu_with_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inp = _inputs(P.SlidingWindow(8))
    assert any("device=cpu" in r for r in VarlenBackend.unsupported_reasons(inp))
    assert any("device=cpu" in r for r in backends.get("triton").unsupported_reasons(inp))
    assert FlexBackend.auto_reasons(inp)  # runs on CPU when forced, never picked there
    with pytest.raises(NotImplementedError) as err:
        backends.select(inp, "varlen")
    assert "varlen: device=cpu (supported: ['cuda'])" in str(err.value)


def test_varlen_declines_what_it_cannot_express():
    cases = {
        P.Strided(4): "not a window, causal or document",
        P.SlidingWindow(3) | P.Global((0,)): "not a window",
        P.Document((10, 30)) & P.Causal(): None,
    }
    for pattern, reason in cases.items():
        got = varlen_layout(pattern, 2, 40, 40)
        assert (reason in got) if reason else not isinstance(got, str), (pattern, got)
    assert "align='top_left'" in varlen_layout(P.Causal(align="top_left"), 1, 10, 20)
    assert "N=20 > S=10" in varlen_layout(P.Causal(), 1, 20, 10)
    assert "N=20 != S=30" in varlen_layout(P.Document((10, 20)), 1, 20, 30)
    reasons = VarlenBackend.unsupported_reasons(_inputs(P.SlidingWindow(4), dtype=torch.float32))
    assert any("dtype=float32" in r for r in reasons)


def _varlen_semantics(layout, batch: int, n: int, s: int) -> torch.Tensor:
    """The ``(B, N, S)`` mask varlen_attn's documentation describes for ``layout``: segments are
    independent; in a segment of ``Lq`` queries and ``Lk`` keys, local query ``a`` sees local
    key ``c`` iff ``a + Lk - Lq - left <= c <= a + Lk - Lq + right`` (-1: no limit)."""
    left, right = layout.window
    dense = torch.zeros(batch * n, batch * s, dtype=torch.bool)
    for i in range(len(layout.cu_q) - 1):
        q0, q1, k0, k1 = layout.cu_q[i], layout.cu_q[i + 1], layout.cu_k[i], layout.cu_k[i + 1]
        a = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)
        c = torch.arange(k1 - k0)[None, :]
        ok = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        if left >= 0:
            ok &= c >= a - left
        if right >= 0:
            ok &= c <= a + right
        dense[q0:q1, k0:k1] = ok
    return torch.stack([dense[b * n : (b + 1) * n, b * s : (b + 1) * s] for b in range(batch)])


@pytest.mark.parametrize(
    ("pattern", "n", "s"),
    [
        (P.SlidingWindow(5), 23, 23),
        (P.SlidingWindow(4, 3), 17, 29),
        (P.Causal(), 9, 31),
        (P.Causal() & P.SlidingWindow(6, 2), 30, 30),
        (P.SlidingWindow(9) & P.SlidingWindow(3, 7), 25, 25),
        (P.Document((5, 11, 1, 8)), 25, 25),
        (P.Document((5, 11, 1, 8)) & P.Causal(), 25, 25),
        (P.Document((12, 13)) & P.SlidingWindow(3), 25, 25),
        (P.Document((12, 13), align="top_left") & P.Causal(align="top_left"), 25, 25),
    ],
    ids=lambda x: repr(x) if isinstance(x, P.Pattern) else str(x),
)
def test_varlen_layout_means_the_pattern(pattern, n, s):
    layout = varlen_layout(pattern, 3, n, s)
    assert not isinstance(layout, str), layout
    want = pattern.to_dense(n, s).expand(3, n, s)
    assert torch.equal(_varlen_semantics(layout, 3, n, s), want)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler")
def test_flex_forward_on_cpu():
    """FlexAttention compiled by Inductor for CPU (inference only in torch 2.13), on the
    BlockMask attnkit builds from the block map; one compile, then dynamic shapes."""
    torch.manual_seed(0)
    cases = [
        (P.SlidingWindow(7, 3), 37, 67),
        (P.KeyPadding([60, 0]), 37, 67),  # batch item 1 sees no key: zeros
        (P.Strided(5) & P.Causal(), 45, 45),
    ]
    for pattern, n, s in cases:
        q, k, v = torch.randn(2, 4, n, 32), torch.randn(2, 2, s, 32), torch.randn(2, 2, s, 32)
        with torch.no_grad():
            got = attention(q, k, v, pattern=pattern, backend="flex")
        want = attention(q.double(), k.double(), v.double(), pattern=pattern, backend="reference")
        assert max_err(got, want) < 1e-5, (pattern, max_err(got, want))
    reasons = FlexBackend.unsupported_reasons(_inputs(P.SlidingWindow(4), return_lse=True))
    assert any("return_lse=True on CPU" in r for r in reasons)


@pytest.mark.parametrize("kind", ["bool", "bias"])
def test_rows_that_see_nothing_are_made_finite_then_zeroed(kind):
    """The fix-up sdpa applies on CUDA (whose kernels may return NaN there), checked here on the
    helper: masked rows get every key, the others keep their mask, and zeroing gives the oracle."""
    import torch.nn.functional as F

    from attnkit.backends import _rows

    from ..reference import attention_ref

    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    allowed = torch.rand(1, 1, 6, 6) > 0.4
    allowed[..., 2, :] = False
    mask = (
        allowed
        if kind == "bool"
        else torch.zeros(1, 1, 6, 6, dtype=torch.float64).masked_fill(~allowed, -torch.inf)
    )
    fixed, seen = _rows.give_unseen_rows_every_key(mask)
    assert seen[..., 2, 0].item() is False and bool(seen.sum() == allowed.any(-1).sum())
    row = fixed[..., 2, :]
    assert bool(torch.isfinite(row).all()) if kind == "bias" else bool(row.all())
    assert torch.equal(fixed[..., 3:, :], mask[..., 3:, :])  # rows that see keys are untouched
    out = torch.where(seen, F.scaled_dot_product_attention(q, k, v, attn_mask=fixed), 0.0)
    assert max_err(out, attention_ref(q, k, v, mask=allowed)) < 1e-12
