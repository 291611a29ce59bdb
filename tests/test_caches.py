"""attnkit.caches: bounded in bytes, clearable, and safe under concurrent ``attention()`` calls."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch

from attnkit import attention, caches
from attnkit import patterns as P
from attnkit.caches import ByteLRU

from .reference import attention_ref, max_err


def test_byte_bound_evicts_least_recently_used():
    cache = ByteLRU("t", limit=3000, size=lambda v: v.numel() * 8)
    make = {k: (lambda k=k: torch.zeros(100, dtype=torch.float64) + k) for k in range(5)}
    for k in range(3):
        cache.get(k, make[k])  # 800 bytes each
    cache.get(0, make[0])  # 0 becomes the most recent
    cache.get(3, make[3])  # 4 * 800 > 3000: evicts 1, the least recently used
    info = cache.info()
    assert (info.entries, info.bytes, info.hits, info.misses) == (3, 2400, 1, 4)
    built = []
    cache.get(1, lambda: built.append(1) or make[1]())
    assert built == [1]  # 1 was evicted: rebuilt
    cache.set_limit(1000)
    assert cache.info().entries == 1 and cache.info().bytes == 800


def test_entries_larger_than_the_limit_are_returned_but_not_kept():
    cache = ByteLRU("t", limit=10, size=lambda v: 100)
    assert cache.get("k", lambda: "value") == "value"
    assert cache.info().entries == 0


def test_unhashable_keys_are_built_every_time():
    cache = ByteLRU("t", limit=1000)
    assert cache.get(["unhashable"], lambda: 7) == 7
    assert cache.info().entries == 0


def test_public_info_limit_and_clear():
    q = torch.randn(1, 1, 300, 16)
    attention(q, q, q, pattern=P.SlidingWindow(20), backend="blocksparse")
    importlib.import_module("attnkit.distributed")  # its caches exist once it is imported
    info = caches.info()
    assert set(info) == {
        "block_maps", "dispatch", "plans", "tile_choices", "measured_tiles",
        "context_parallel", "context_parallel_layouts", "context_parallel_links",
        "flex_block_masks", "triton_tables",
    }  # fmt: skip
    assert info["plans"].entries >= 1 and info["plans"].bytes > 0
    caches.clear("plans")
    assert caches.info()["plans"].entries == 0
    caches.clear()
    assert all(i.entries == 0 for i in caches.info().values())
    with pytest.raises(
        ValueError,
        match=r"expected a cache name in \['block_maps', 'context_parallel', 'context_parallel_layouts', "
        r"'context_parallel_links', 'dispatch', 'flex_block_masks', 'measured_tiles', 'plans', "
        r"'tile_choices', 'triton_tables'\]",
    ):
        caches.set_limit("plan", 10)
    with pytest.raises(ValueError, match=r"expected limit to be an int >= 0 \(bytes\), but got -1"):
        caches.set_limit("plans", -1)


CALLS = [
    (P.SlidingWindow(20, 5), 200, 200),
    (P.SlidingWindow(8) | P.Global((0, 3)), 150, 170),
    (P.Strided(7) & P.Causal(), 130, 130),
    (P.Random(2, 16, seed=3) | P.SlidingWindow(16), 190, 160),
    (P.Document((40, 60, 50)) & P.Causal(), 150, 150),
    (P.KeyPadding((120, 64)) & P.SlidingWindow(30), 100, 120),
    (P.Dilated(40, 3), 97, 97),
    (P.Causal(), 1, 50),
]


def _run(i: int) -> list[torch.Tensor]:
    outs = []
    for j in range(len(CALLS)):
        pattern, n, s = CALLS[(i + j) % len(CALLS)]
        g = torch.Generator().manual_seed(n * 1000 + s)
        q = torch.randn(2, 2, n, 16, dtype=torch.float64, generator=g)
        k = torch.randn(2, 1, s, 16, dtype=torch.float64, generator=g)
        outs.append(attention(q, k, k, pattern=pattern, backend="blocksparse"))
        outs.append(attention(q, k, k, pattern=pattern))  # auto dispatch: its cache too
    return outs


def test_eight_threads_with_different_shapes_agree_with_one_thread():
    """Concurrent calls share the caches while tiny limits make them evict all the time."""
    caches.clear()
    alone = [_run(i) for i in range(8)]
    limits = {name: i.limit for name, i in caches.info().items()}
    try:
        for name in limits:
            caches.set_limit(name, 200_000)  # a few entries each: constant eviction
        results: list = [None] * 8
        errors: list = []
        start = threading.Barrier(8)

        def worker(i: int) -> None:
            try:
                start.wait(timeout=30)
                for _ in range(3):
                    results[i] = _run(i)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        for got, want in zip(results, alone, strict=True):
            for a, b in zip(got, want, strict=True):
                assert max_err(a, b) < 1e-12
    finally:
        for name, limit in limits.items():
            caches.set_limit(name, limit)


def test_the_threaded_calls_are_right():
    """The single-thread results the test above compares against match the oracle."""
    for pattern, n, s in CALLS:
        g = torch.Generator().manual_seed(n * 1000 + s)
        q = torch.randn(2, 2, n, 16, dtype=torch.float64, generator=g)
        k = torch.randn(2, 1, s, 16, dtype=torch.float64, generator=g)
        got = attention(q, k, k, pattern=pattern, backend="blocksparse")
        assert max_err(got, attention_ref(q, k, k, pattern=pattern)) < 1e-12


def test_decode_steps_decide_once_and_build_no_block_maps():
    """One-query steps go to sdpa without pricing tiles; the decision is cached per shape."""
    from attnkit import backends
    from attnkit.functional import build_inputs

    caches.clear()
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 4, 4096, 32)
    inp = build_inputs(q, k, k, pattern=P.SlidingWindow(256))
    assert backends.select(inp).name == "sdpa"
    assert backends.select(inp).name == "sdpa"
    assert caches.info()["block_maps"].entries == 0
    assert (caches.info()["dispatch"].hits, caches.info()["dispatch"].misses) == (1, 1)
    got = attention(q, k, k, pattern=P.SlidingWindow(256))
    assert max_err(got, attention_ref(q, k, k, pattern=P.SlidingWindow(256))) < 1e-5
