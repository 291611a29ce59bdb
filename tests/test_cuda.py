"""What only a GPU can check: every CUDA route against the float64 oracle (rows that see
nothing included), the Triton kernels compiled (not interpreted) at the sizes where int32
offsets, a second grid axis or shared memory would fail, and NCCL transport.

Each test is marked ``cuda`` and skips with its reason on a machine without CUDA (as here);
``pytest -m cuda`` on a GPU machine runs them all.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch

from attnkit import attention, backends
from attnkit import patterns as P
from attnkit.functional import build_inputs

from .reference import attention_ref, max_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]

ROUTES = ["sdpa", "flex", "varlen", "triton", "blocksparse", "tiled", "eager", "reference"]
CASES = {
    "causal": (P.Causal(), None),
    "window": (P.SlidingWindow(16, 0), None),
    "padding": (P.KeyPadding([40, 0]), None),  # the second item sees nothing
    "bigbird": (P.SlidingWindow(8) | P.Global((0,)) | P.Random(2, 16, seed=1), None),
    "bool-mask-empty-row": (None, "mask"),
}


def _case(name, dtype):
    pattern, mask_kind = CASES[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 70, 64, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA
    mask = None
    if mask_kind == "mask":
        mask = torch.rand(2, 1, 70, 70, generator=g) > 0.5
        mask[:, :, 3] = False
    return pattern, mask, [t.to("cuda", dtype) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ROUTES)
def test_every_cuda_route_matches_the_oracle(backend, case, dtype):
    pattern, mask, (q, k, v) = _case(case, dtype)
    mask = None if mask is None else mask.cuda()
    inp = build_inputs(q, k, v, pattern=pattern, mask=mask, return_lse=True)
    reasons = backends.get(backend).unsupported_reasons(inp)
    if reasons:
        pytest.skip("; ".join(reasons))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, pattern=pattern, mask=mask, backend=backend)
    want = attention_ref(
        *(t.double().cpu() for t in (q, k, v)), pattern=pattern, mask=None if mask is None else mask.cpu()
    )
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    assert torch.isfinite(out).all(), "rows that see nothing must give 0, not NaN"
    assert max_err(out.cpu(), want) < tol
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_triton_offsets_past_two_to_the_31():
    """A (1, 2, 2^24, 64) float16 tensor holds 2^31 elements: the last rows are right only with
    int64 offsets."""
    n = 2**24
    q = torch.randn(1, 2, n, 64, dtype=torch.float16, device="cuda")
    out = attention(q, q, q, pattern=P.SlidingWindow(32, 0), backend="triton")
    tail = slice(n - 64, n)
    want = attention_ref(
        *(t[:, :, n - 96 :].double().cpu() for t in (q, q, q)), pattern=P.SlidingWindow(32, 0)
    )
    assert max_err(out[:, :, tail].cpu(), want[:, :, -64:]) < 2e-2


def test_triton_more_heads_than_a_grid_axis_takes():
    """B * H = 70,000 programs per query block: beyond CUDA's 65,535 on a second grid axis."""
    q = torch.randn(17_500, 4, 16, 16, device="cuda", dtype=torch.float16)
    out = attention(q, q, q, pattern=P.SlidingWindow(4), backend="triton")
    want = attention_ref(*(q[-8:].double().cpu(),) * 3, pattern=P.SlidingWindow(4))
    assert max_err(out[-8:].cpu(), want) < 2e-2


def test_triton_head_dim_256_in_float32_runs():
    """Tiles and stages chosen from the device's shared memory: no launch failure."""
    q = torch.randn(1, 2, 300, 256, device="cuda", requires_grad=True)
    out = attention(q, q, q, pattern=P.SlidingWindow(32), backend="triton")
    out.sum().backward()
    want = attention_ref(*(q.detach().double().cpu(),) * 3, pattern=P.SlidingWindow(32))
    assert max_err(out.detach().cpu(), want) < 1e-4 and torch.isfinite(q.grad).all()


def _nccl_ring(rank: int, world: int, init: str) -> None:
    import torch.distributed as dist

    from attnkit.distributed import context_parallel_attention, shard_sequence

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, 256, 32, generator=g).cuda() for _ in range(3))
        want = attention(q, k, v, pattern=P.Causal())
        for method in ("ring", "all_to_all", "auto"):
            local = [shard_sequence(t, layout="zigzag").clone().requires_grad_() for t in (q, k, v)]
            out = context_parallel_attention(*local, pattern=P.Causal(), layout="zigzag", method=method)
            out.sum().backward()
            assert max_err(out, shard_sequence(want, layout="zigzag")) < 1e-4, method
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_context_parallel_on_nccl(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{os.path.join(tmp_path, 'rendezvous')}"
    mp.start_processes(_nccl_ring, args=(2, init), nprocs=2, start_method="spawn")
