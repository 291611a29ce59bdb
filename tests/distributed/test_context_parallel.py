"""Context-parallel attention on 2-4 gloo ranks equals single-process attention, forward and
backward (through the output and the log-sum-exp), for every pattern kind, both layouts and
both methods."""

from __future__ import annotations

import os
import time

import pytest
import torch

import attnkit.patterns as P
from attnkit import attention
from attnkit.distributed import (
    BalancedLayout,
    ContextParallel,
    PeerError,
    context_parallel_attention,
    gather_sequence,
    shard_ranges,
    shard_sequence,
)

from ._spawn import NO_RESULT, run_ranks, values

N, S_CROSS, B, H, HKV, D = 37, 29, 2, 12, 2, 8  # N divisible by none of 2, 3, 4; GQA


def _cases():
    bigbird = P.SlidingWindow(3, 3) | P.Global((0, 20)) | P.Random(1, 4, seed=1)
    return [
        ("full", P.Full(), None, N),
        ("causal", P.Causal(), None, N),
        ("window", P.SlidingWindow(4), None, N),
        ("document", P.Document((5, 14, 3, 15)) & P.Causal(), None, N),
        ("bigbird", bigbird, None, N),
        ("padding", P.KeyPadding((N - 3, 11)) & P.Causal(), None, N),
        ("bool mask", P.Causal(), "bool", N),
        ("cross", P.SlidingWindow(6, 2), None, S_CROSS),
    ]


def _inputs(s: int, mask_kind, kv_heads: int = HKV):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, kv_heads, s, D, generator=g)
    v = torch.randn(B, kv_heads, s, D, generator=g)
    dout = torch.randn(B, H, N, D, generator=g)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, N, s, generator=g) > 0.3
    return q, k, v, dout, mask


def _lse_weights(n: int):
    """The weights of the lse term of the loss (the lse is differentiable, as on one process)."""
    return torch.randn(B, H, n, generator=torch.Generator().manual_seed(11))


def _loss(out, lse, dout, dlse):
    """``(out * dout).sum() + (lse * dlse).sum()`` over the rows whose lse is finite."""
    return (out * dout).sum() + torch.where(torch.isfinite(lse), lse * dlse, 0.0).sum()


def _compare(rank: int, world: int, layouts, methods, kv_heads: int = HKV) -> dict:
    """Max errors of this rank's output and gradients against the single-process result."""
    errors = {}
    for name, pattern, mask_kind, s in _cases():
        q, k, v, dout, mask = _inputs(s, mask_kind, kv_heads)
        dlse = _lse_weights(N)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        want, want_lse = attention(*leaves, pattern=pattern, mask=mask, return_lse=True)
        _loss(want, want_lse, dout, dlse).backward()
        for layout in layouts:
            if layout == "balanced":
                if s != N:  # balances self-attention only
                    continue
                layout = BalancedLayout(pattern)
            qr, kr = shard_ranges(N, world, layout)[rank], shard_ranges(s, world, layout)[rank]

            def rows(t, ranges):
                return torch.cat([t[:, :, a:b] for a, b in ranges], 2)

            for method in methods:
                if method == "all_to_all" and H % world:
                    continue
                local = [shard_sequence(t, layout=layout).clone().requires_grad_() for t in (q, k, v)]
                out, lse = context_parallel_attention(
                    *local, pattern=pattern, mask=mask, layout=layout, method=method, return_lse=True
                )
                _loss(out, lse, rows(dout, qr), rows(dlse, qr)).backward()
                err = max(
                    (out - rows(want, qr)).abs().max().item(),
                    (local[0].grad - rows(leaves[0].grad, qr)).abs().max().item(),
                    (local[1].grad - rows(leaves[1].grad, kr)).abs().max().item(),
                    (local[2].grad - rows(leaves[2].grad, kr)).abs().max().item(),
                )
                errors[(name, layout, method)] = err
                mine = rows(want_lse.detach(), qr)
                finite = torch.isfinite(mine)
                assert torch.equal(finite, torch.isfinite(lse)), (name, layout, method)
                errors[(name, layout, method, "lse")] = (lse - mine)[finite].abs().max().item()
    return errors


@pytest.mark.parametrize("world", [2, 3, 4])
def test_context_parallel_equals_single_process(world):
    results = values(run_ranks(_compare, world, ("contiguous", "zigzag"), ("ring", "all_to_all")))
    worst = {}
    for errors in results:
        for key, err in errors.items():
            worst[key] = max(err, worst.get(key, 0.0))
    methods = {key[2] for key in worst}
    assert methods == ({"ring", "all_to_all"} if H % world == 0 else {"ring"})
    assert len(worst) == len(_cases()) * 2 * len(methods) * 2
    bad = {key: err for key, err in worst.items() if not err <= 1e-5}
    assert not bad, bad


def _compare_in_small_tiles(rank: int, world: int, layouts, methods, kv_heads: int) -> dict:
    """:func:`_compare` with the ring cutting shards into tiles of 2-3 tokens: many pieces per
    transfer step, many query tiles per piece, pieces that hold no work for some tiles."""
    from attnkit.distributed import ring

    ring._MIN_TILE, ring._TILES_PER_SHARD = 2, 8
    return _compare(rank, world, layouts, methods, kv_heads)


@pytest.mark.parametrize(("world", "kv_heads"), [(2, HKV), (3, HKV), (2, H)])
def test_ring_in_small_tiles_equals_single_process(world, kv_heads):
    """GQA pieces run in tiles; with one query head per key head, block-sparse pieces take the
    one-call path that adds into the rank's gradients (``into=``)."""
    results = values(run_ranks(_compare_in_small_tiles, world, ("contiguous", "zigzag"), ("ring",), kv_heads))
    worst = {}
    for errors in results:
        for key, err in errors.items():
            worst[key] = max(err, worst.get(key, 0.0))
    assert len(worst) == len(_cases()) * 2 * 2
    bad = {key: err for key, err in worst.items() if not err <= 1e-5}
    assert not bad, bad


def test_balanced_layout_equals_single_process():
    results = values(run_ranks(_compare, 3, ("balanced",), ("ring",)))
    worst = {}
    for errors in results:
        for key, err in errors.items():
            worst[key] = max(err, worst.get(key, 0.0))
    assert len(worst) == 2 * (len(_cases()) - 1)  # every case but cross-attention, with its lse
    assert all(err <= 1e-5 for err in worst.values()), worst


def _work(pattern, ranges, n: int) -> list[int]:
    """Allowed (query, key) pairs per rank."""
    dense = pattern.to_dense(n, n)
    return [sum(int(dense[a:b].sum()) for a, b in runs) for runs in ranges]


def test_balanced_layout_gives_every_rank_the_same_work():
    n, world = 1024, 4
    causal = shard_ranges(n, world, BalancedLayout(P.Causal()))
    assert causal == shard_ranges(n, world, "zigzag")  # zig-zag balances causal exactly
    window = P.SlidingWindow(64)
    assert shard_ranges(n, world, BalancedLayout(window)) == shard_ranges(n, world, "contiguous")
    docs = P.Document((640, 128, 128, 128)) & P.Causal()  # one long document, three short
    balanced = shard_ranges(n, world, BalancedLayout(docs))
    busiest = {name: max(_work(docs, shard_ranges(n, world, name), n)) for name in ("contiguous", "zigzag")}
    got = _work(docs, balanced, n)
    assert max(got) < 0.8 * min(busiest.values())  # better than both fixed layouts
    assert max(got) <= 1.15 * sum(got) / world  # within a tile row of perfect balance
    assert sum(b - a for runs in balanced for a, b in runs) == n
    with pytest.raises(TypeError, match="expected a Pattern"):
        BalancedLayout("causal")
    with pytest.raises(ValueError, match="or a BalancedLayout"):
        shard_ranges(8, 2, "balanced")


def _sends(rank: int, world: int) -> dict:
    """Count this rank's point-to-point sends and the bytes of its forward key/value sends."""
    import torch.distributed as dist

    counted = {"n": 0, "bytes": 0}
    real = dist.batch_isend_irecv

    def counting(ops):  # every transfer of attnkit.distributed goes through one batch call
        for op in ops:
            if op.op is dist.isend:
                counted["n"] += 1
                counted["bytes"] += op.tensor.numel() * op.tensor.element_size()
        return real(ops)

    dist.batch_isend_irecv = counting
    n = 64
    sends = {}
    for name, pattern in [("full", P.Full()), ("window", P.SlidingWindow(4)), ("docs", P.Document((16, 48)))]:
        q = torch.randn(1, 2, n, 8)
        local = shard_sequence(q).clone().requires_grad_()
        counted.update(n=0, bytes=0)
        out = context_parallel_attention(local, local, local, pattern=pattern, method="ring")
        forward_bytes = counted["bytes"]
        out.sum().backward()
        sends[name] = counted["n"]
        sends[name + " forward bytes"] = forward_bytes
    return sends


def test_ring_sends_only_what_the_pattern_connects():
    sends = values(run_ranks(_sends, 4))
    shape_check = 3  # each rank tells the 3 others its call description
    description = shape_check * 14 * 8  # 13 described fields and auto's cached choice
    per_token = 2 * 2 * 8 * 4  # k and v, 2 heads, D = 8, float32
    # Full: 3 key/value shards out in the forward, 3 again and 3 gradients in the backward
    assert [s["full"] - shape_check for s in sends] == [9, 9, 9, 9]
    assert [s["full forward bytes"] - description for s in sends] == [3 * 16 * per_token] * 4
    # a 4-token window over 16-token shards: rank r's keys reach only rank r + 1's queries, so
    # r sends them to r + 1 (forward and backward) and gets their gradient back from r + 1
    assert [s["window"] - shape_check for s in sends] == [2, 3, 3, 1]
    # ... and only the last 4 of them, whatever the shard length
    assert [s["window forward bytes"] - description for s in sends] == [4 * per_token] * 3 + [0]
    # documents [0, 16) and [16, 64): rank 0's shard is alone; ranks 1-3 share one document
    docs = [s["docs"] - shape_check for s in sends]
    assert docs[0] == 0 and docs[1:] == [6, 6, 6]


def _gather(rank: int, world: int) -> bool:
    x = torch.arange(2 * 11 * 3, dtype=torch.float64).view(2, 11, 3)
    ok = True
    for layout in ("contiguous", "zigzag"):
        local = shard_sequence(x, dim=1, layout=layout).clone().requires_grad_()
        full = gather_sequence(local, dim=1, n=11, layout=layout)
        ok &= torch.equal(full, x)
        # one default everywhere: the sequence axis of the layout, for functions and methods alike
        cp = ContextParallel(layout=layout)
        ok &= torch.equal(shard_sequence(x, layout=layout), local) and torch.equal(cp.shard(x), local)
        ok &= torch.equal(cp.gather(local.detach(), n=11), x)
        heads_first = x.T[None]  # (1, 3, 11, 2): the sequence is dim 2
        ok &= torch.equal(
            shard_sequence(heads_first, layout=layout), shard_sequence(heads_first, dim=2, layout=layout)
        )
        (full * (rank + 1)).sum().backward()  # every rank's loss uses every position
        ok &= torch.equal(local.grad, torch.full_like(local, sum(range(1, world + 1))))
    return bool(ok)


def test_ring_groups_whole_tiles_and_keeps_the_others_alone():
    """In one key column, runs of whole tiles share a call (at most _FULL_TILES_PER_CALL
    tiles), partial tiles (a causal diagonal) run alone, empty ones not at all."""
    from attnkit.distributed.ring import _FULL_TILES_PER_CALL, _row_runs
    from attnkit.patterns import EMPTY, FULL, PARTIAL

    assert _FULL_TILES_PER_CALL == 2
    assert _row_runs([FULL] * 5) == [(0, 2), (2, 4), (4, 5)]
    assert _row_runs([EMPTY, PARTIAL, FULL, FULL, PARTIAL, FULL, EMPTY, FULL]) == [
        (1, 2), (2, 4), (4, 5), (5, 6), (7, 8)
    ]  # fmt: skip
    assert _row_runs([PARTIAL, PARTIAL]) == [(0, 1), (1, 2)]
    assert _row_runs([EMPTY, EMPTY]) == []


def test_shard_and_gather_round_trip():
    assert values(run_ranks(_gather, 3)) == [True, True, True]


def test_shard_ranges():
    assert shard_ranges(10, 3) == (((0, 4),), ((4, 7),), ((7, 10),))
    assert shard_ranges(10, 2, "zigzag") == (((0, 3), (8, 10)), ((3, 6), (6, 8)))
    with pytest.raises(ValueError, match=r"zigzag layout cuts the sequence in 8 runs.*n=7"):
        shard_ranges(7, 4, "zigzag")
    with pytest.raises(ValueError, match=r"layout in \('contiguous', 'zigzag'\).*'ring'"):
        shard_ranges(7, 4, "ring")


def _disagree(rank: int, world: int) -> str:
    x = torch.randn(1, 2, 4, 8)
    pattern = P.Causal() if rank == 0 else P.SlidingWindow(2)
    try:
        context_parallel_attention(x, x, x, pattern=pattern, timeout=20)
    except ValueError as e:
        return str(e)
    return "no error"


def test_ranks_that_disagree_are_reported():
    messages = values(run_ranks(_disagree, 2))
    assert "ranks disagree on pattern" in messages[0] and "rank 1" in messages[0]
    assert "ranks disagree on pattern" in messages[1] and "rank 0" in messages[1]


def _fault(rank: int, world: int, mode: str) -> str:
    x = torch.randn(1, 2, 4, 8)
    if rank == world - 1:
        if mode == "dies":
            os._exit(1)
        time.sleep(4)  # "hangs": never calls (the others give up after 2 s)
        return "slept"
    start = time.monotonic()
    try:
        context_parallel_attention(x, x, x, pattern=P.Causal(), timeout=2)
    except PeerError as e:
        return f"{time.monotonic() - start:.1f} {e.peer} {e}"
    return "no error"


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_a_lost_rank_fails_the_others_within_the_timeout(mode):
    outcomes = run_ranks(_fault, 3, mode, deadline=60)
    if mode == "dies":
        assert outcomes[2] == ("none", NO_RESULT)
    else:
        assert values(outcomes[2:]) == ["slept"]
    for text in values(outcomes[:2]):
        seconds, peer, message = text.split(" ", 2)
        assert peer == "2" and "rank 2" in message, message
        assert float(seconds) < 4.0, message


def test_errors_without_a_process_group():
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialized"):
        context_parallel_attention(x, x, x)
    with pytest.raises(ValueError, match=r"method in .*'fast'"):
        context_parallel_attention(x, x, x, method="fast")


def _auto(rank: int, world: int) -> dict:
    from attnkit import caches

    caches.clear()
    q, k, v, _, _ = _inputs(N, None)
    want = attention(q, k, v, pattern=P.Causal())
    mine = torch.cat([want[:, :, a:b] for a, b in shard_ranges(N, world, "zigzag")[rank]], 2)
    local = [shard_sequence(t, layout="zigzag").clone() for t in (q, k, v)]
    errors = []
    for _ in range(2):  # the first call measures both methods, the second reuses the choice
        out = context_parallel_attention(
            *local, pattern=P.Causal(), layout="zigzag", method="auto", timeout=20
        )
        errors.append((out - mine).abs().max().item())
    info = caches.info()["context_parallel"]
    return {"errors": errors, "entries": info.entries, "hits": info.hits}


def test_auto_measures_once_and_every_rank_agrees():
    # ranks that chose different methods would wait for messages that never come (PeerError)
    results = values(run_ranks(_auto, 2))
    assert all(err <= 1e-5 for r in results for err in r["errors"])
    assert [(r["entries"], r["hits"]) for r in results] == [(1, 1), (1, 1)]


def test_the_sequence_axis_is_the_one_default():
    from attnkit.distributed import sequence_dim

    assert [sequence_dim(torch.zeros((2,) * d), None) for d in (1, 2, 3, 4)] == [0, 1, 1, 2]
    assert sequence_dim(torch.zeros(2, 3, 4), -1) == 2
    with pytest.raises(ValueError, match=r"expected dim= for a 5-d tensor"):
        sequence_dim(torch.zeros((1,) * 5), None)
    with pytest.raises(ValueError, match=r"expected dim in \[-3, 3\)"):
        sequence_dim(torch.zeros(2, 3, 4), 3)


def _caches_cleared_on_one_rank(rank: int, world: int) -> list[float]:
    from attnkit import caches

    q, k, v, _, _ = _inputs(N, None)
    want = attention(q, k, v, pattern=P.Causal())
    mine = torch.cat([want[:, :, a:b] for a, b in shard_ranges(N, world, "zigzag")[rank]], 2)
    local = [shard_sequence(t, layout="zigzag").clone() for t in (q, k, v)]
    errors = []
    for step in range(3):
        if step == 1 and rank == 0:  # rank 0 alone forgets auto's choice
            caches.clear()
        out = context_parallel_attention(
            *local, pattern=P.Causal(), layout="zigzag", method="auto", timeout=20
        )
        errors.append((out - mine).abs().max().item())
    return errors


def test_auto_agrees_when_one_rank_cleared_its_caches():
    """A rank without the cached choice makes every rank measure again (together), instead of
    measuring alone while the others wait in the ring (a PeerError, or a hang without timeouts)."""
    results = values(run_ranks(_caches_cleared_on_one_rank, 2))
    assert all(err <= 1e-5 for errors in results for err in errors)


class _DeviceChecked:
    """Stands in for ``torch`` inside ``attnkit.distributed``: every tensor the package creates
    must name its device (NCCL moves only CUDA tensors, so a buffer made on the default device,
    the CPU, fails there). Everything else is torch's."""

    CREATORS = ("tensor", "empty", "zeros", "ones", "full", "arange")

    def __init__(self, real):
        self._real, self.missing = real, []

    def __getattr__(self, name):
        value = getattr(self._real, name)
        if name not in self.CREATORS:
            return value

        def create(*args, **kwargs):
            if kwargs.get("device") is None:
                import traceback

                self.missing.append(f"torch.{name} without device= at {traceback.format_stack()[-2].strip()}")
            return value(*args, **kwargs)

        return create


def _device_named(rank: int, world: int) -> list[str]:
    from attnkit.distributed import all_to_all, attention, layouts, ring, transport

    modules = (transport, layouts, ring, all_to_all, attention)
    checked = _DeviceChecked(torch)
    for module in modules:
        module.torch = checked
    try:
        q, k, v, _, _ = _inputs(N, None)
        cp = ContextParallel(layout="zigzag")
        cp.positions(sum(b - a for a, b in shard_ranges(N, world, "zigzag")[rank]))
        for method in ("ring", "all_to_all", "auto"):
            local = [shard_sequence(t, layout="zigzag").clone().requires_grad_() for t in (q, k, v)]
            out, lse = context_parallel_attention(
                *local, pattern=P.Causal(), layout="zigzag", method=method, return_lse=True, timeout=20
            )
            (out.sum() + lse.sum()).backward()
            gather_sequence(out.detach(), n=N, layout="zigzag", timeout=20)
    finally:
        for module in modules:
            module.torch = torch
    return checked.missing


def test_every_tensor_the_transport_creates_names_its_device():
    """On this CPU machine the inputs' device and the default device coincide, so a buffer made
    without ``device=`` works here and fails under NCCL; this catches it here."""
    for missing in values(run_ranks(_device_named, 2)):
        assert not missing, "\n".join(missing)
