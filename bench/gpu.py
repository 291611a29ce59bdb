"""attnkit on a CUDA GPU: correctness first, then speed against torch's own kernels, mask by mask.

    python bench/gpu.py                  # a CUDA machine; under 5 minutes on an H100/H200
    python bench/gpu.py --budget 200     # stop timing new configurations after 200 s
    TRITON_INTERPRET=1 python bench/gpu.py --smoke   # the script's plumbing on a CPU (tiny sizes)

1. **Correctness** (bfloat16, B=2, H=8, Hkv=2, N=1000 and N=777 / S=1000): for every mask,
   every attnkit route that accepts it (``auto``, ``triton``, ``flex``, ``varlen``) against
   attnkit's float64 ``reference``, forward and dq/dk/dv. Pass: the error is at most 2x that
   of naive bfloat16 PyTorch plus 8e-3 (the test suite's criterion).
2. **Speed** (bfloat16, H=16, D=64 and 128, B*N = 65536 tokens, N = 1k, 4k, 16k, 64k):
   forward and forward+backward, median of CUDA-event timings over interleaved rounds, for

   ============  ================================  =======================================
   mask          attnkit pattern                   torch baselines
   ============  ================================  =======================================
   dense         ``Full()``                        SDPA
   causal        ``Causal()``                      SDPA ``is_causal``
   window        ``SlidingWindow(256, 256)``       varlen_attn window, FlexAttention
   causal-win    ``SlidingWindow(1023)``           varlen_attn window, FlexAttention
   document      ``Document(...) & Causal()``      varlen_attn packed, FlexAttention
   bigbird       window | 64 global | 3 random     FlexAttention
   strided       ``Strided(128) & Causal()``       FlexAttention
   ============  ================================  =======================================

   FlexAttention baselines are what a user writes: a ``mask_mod`` of the mask, a
   ``create_block_mask`` (compiled) and ``torch.compile(flex_attention)``. Useful TFLOP/s
   count only allowed (query, key) pairs: ``4 * B * H * D * pairs`` forward and 2.5x that
   backward (FlashAttention's convention). Ratios are baseline time / attnkit time (> 1:
   attnkit faster).
3. **First-call latency**: the first forward+backward of a new shape for ``triton`` (JIT and
   tables), ``flex`` backend and the FlexAttention baseline (compile), on a fresh process's
   caches.

Writes ``bench/results/gpu.json`` (``gpu-smoke.json`` with ``--smoke``) and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment
from attnkit import attention
from attnkit import patterns as P
from attnkit.backends import get as get_backend
from attnkit.functional import build_inputs

ROUTES = ("auto", "triton", "flex", "varlen")


# ----------------------------------------------------------------------------- masks
def doc_lengths(n: int) -> tuple[int, ...]:
    """Packed documents of uneven lengths (1/8, 1/4, 1/16, ... of N, the rest last)."""
    out, left, cycle = [], n, (8, 4, 16, 2, 32)
    i = 0
    while left > 0:
        size = max(1, min(left, n // cycle[i % len(cycle)]))
        out.append(size)
        left -= size
        i += 1
    return tuple(out)


def random_blocks(n: int, block: int, per_row: int, seed: int) -> torch.Tensor:
    """BigBird's random key blocks as a (blocks, blocks) bool table, the same draw attnkit's
    ``Random`` makes (so both sides compute the same mask)."""
    return P.Random(per_row, block, seed=seed).block_map(n, n, block).states != P.EMPTY


def masks(n: int) -> dict[str, tuple[P.Pattern, object]]:
    """name -> (attnkit pattern, FlexAttention mask_mod factory(device) or None)."""
    docs = doc_lengths(n)

    def window(before, after):
        return lambda device: lambda b, h, q, k: (q - k <= before) & (k - q <= after)

    def document(device):
        ids = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(docs)).to(device)
        return lambda b, h, q, k: (ids[q] == ids[k]) & (k <= q)

    def bigbird(device):
        table = random_blocks(n, 64, 3, 1).to(device)
        return lambda b, h, q, k: ((q - k).abs() <= 192) | (q < 64) | (k < 64) | table[q // 64, k // 64]

    def strided(device):
        return lambda b, h, q, k: (k <= q) & ((q - k < 128) | ((q - k) % 128 == 0))

    return {
        "dense": (P.Full(), None),
        "causal": (P.Causal(), None),
        "window": (P.SlidingWindow(256, 256), window(256, 256)),
        "causal-win": (P.SlidingWindow(1023), window(1023, 0)),
        "document": (P.Document(docs) & P.Causal(), document),
        "bigbird": (
            P.SlidingWindow(192, 192) | P.Global(tuple(range(64))) | P.Random(3, 64, seed=1),
            bigbird,
        ),
        "strided": (P.Strided(128) & P.Causal(), strided),
    }


# ----------------------------------------------------------------------------- baselines
def baselines(name: str, pattern: P.Pattern, mask_factory, q, k, v) -> dict:
    """name -> callable running torch's own kernel for this mask (only those that apply)."""
    import torch.nn.functional as F

    out = {}
    if name == "dense":
        out["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    if name == "causal":
        out["sdpa"] = lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
        )
    if name in ("window", "causal-win", "document") and q.is_cuda:
        from attnkit.backends.varlen import VarlenBackend

        inp = build_inputs(q, k, v, pattern=pattern)
        if not VarlenBackend.unsupported_reasons(inp):
            out["varlen_attn"] = lambda: VarlenBackend.forward(build_inputs(q, k, v, pattern=pattern)).out
    if mask_factory is not None and q.is_cuda:
        from torch.nn.attention.flex_attention import create_block_mask

        compiled = _baseline_flex()
        n, s = q.shape[2], k.shape[2]
        block_mask = create_block_mask(
            mask_factory(q.device), None, None, n, s, device=q.device, _compile=True
        )
        gqa = q.shape[1] != k.shape[1]
        out["flex_attention"] = lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return out


@functools.cache
def _baseline_flex():
    """The user's own ``torch.compile(flex_attention)``: a compiled function of its own, not the
    flex backend's, so that neither's first-call latency is paid by the other."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


# ----------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, backward: bool, device) -> float:
    """Seconds of one call (forward, or forward + backward of sum(out * g))."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    out = fn()
    if backward:
        out.backward(torch.ones_like(out))
    return time.perf_counter() - t


def interleaved(fns: dict, backward: bool, device, rounds: int) -> dict[str, float | str]:
    """Median seconds per method, methods alternating within each round; failures as text."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    failed: dict[str, str] = {}
    for name, fn in fns.items():  # warm-up (and compile) outside the timed rounds
        try:
            for _ in range(2):
                time_once(fn, backward, device)
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    for _ in range(rounds):
        for name, fn in fns.items():
            if name not in failed:
                times[name].append(time_once(fn, backward, device))
    return {name: failed.get(name) or statistics.median(times[name]) for name in fns}


# ----------------------------------------------------------------------------- correctness
def check(device, dtype, smoke: bool) -> list[dict]:
    rows = []
    n_max = 96 if smoke else 1000
    for n, s in ((n_max, n_max), (n_max * 7 // 9, n_max)):
        for name, (pattern, _) in masks(s).items():
            torch.manual_seed(0)
            q = torch.randn(2, 8, n, 64, device=device, dtype=dtype)
            k = torch.randn(2, 2, s, 64, device=device, dtype=dtype)
            v = torch.randn(2, 2, s, 64, device=device, dtype=dtype)
            dout = torch.randn(2, 8, n, 64, device=device, dtype=torch.float64)
            want, want_g = _run(q, k, v, pattern, "reference", torch.float64, dout)
            eager, eager_g = _run(q, k, v, pattern, "eager", None, dout)
            for route in ROUTES:
                row = {"mask": name, "N": n, "S": s, "route": route}
                reason = _declines(route, q, k, v, pattern)
                if reason:
                    rows.append({**row, "status": "declined", "why": reason})
                    continue
                try:
                    got, got_g = _run(q, k, v, pattern, route, None, dout)
                except Exception as e:
                    rows.append({**row, "status": "error", "why": f"{type(e).__name__}: {e}"[:300]})
                    continue
                worst = 0.0
                for g, e_, w in zip([got, *got_g], [eager, *eager_g], [want, *want_g], strict=True):
                    err = (g.double() - w).abs().max().item()
                    bound = 2 * (e_.double() - w).abs().max().item() + 8e-3
                    worst = max(worst, err / bound if math.isfinite(err) else math.inf)
                rows.append({**row, "status": "pass" if worst <= 1 else "FAIL", "error_over_bound": worst})
    return rows


def _declines(route, q, k, v, pattern) -> str | None:
    if route == "auto":
        return None
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # every call here is differentiated
    reasons = get_backend(route).unsupported_reasons(build_inputs(*leaves, pattern=pattern))
    return "; ".join(reasons) or None


def _run(q, k, v, pattern, route, cast, dout):
    leaves = [(t if cast is None else t.to(cast)).detach().clone().requires_grad_() for t in (q, k, v)]
    if route == "eager":
        from attnkit.patterns import Full

        dense = (pattern or Full()).to_dense(q.shape[2], k.shape[2], device=q.device)
        dense = dense if dense.dim() == 4 else dense[None, None]
        G = q.shape[1] // k.shape[1]
        kk, vv = (t.repeat_interleave(G, 1) for t in leaves[1:])
        scores = (leaves[0] @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
        w = scores.masked_fill(~dense, float("-inf")).softmax(-1).nan_to_num(0.0)
        out = w @ vv
    else:
        out = attention(*leaves, pattern=pattern, backend=route)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


# ----------------------------------------------------------------------------- speed
def speed(device, dtype, budget: float, smoke: bool, started: float) -> list[dict]:
    rows = []
    lengths = (64, 128) if smoke else (1024, 4096, 16384, 65536)
    tokens = 128 if smoke else 65536
    heads, rounds = (2, 2) if smoke else (16, 7)
    for d in (64,) if smoke else (64, 128):
        for n in lengths:
            b = max(1, tokens // n)
            for name, (pattern, factory) in masks(n).items():
                if time.perf_counter() - started > budget:
                    rows.append({"mask": name, "N": n, "D": d, "status": "skipped (time budget)"})
                    continue
                torch.manual_seed(0)
                q, k, v = (
                    torch.randn(b, heads, n, d, device=device, dtype=dtype, requires_grad=True)
                    for _ in range(3)
                )
                pairs = pattern.num_allowed(n, n)
                flops_fwd = 4 * b * heads * d * pairs
                fns = {}
                for route in ("auto", "triton", "flex"):
                    if route == "auto" or not _declines(route, q, k, v, pattern):
                        fns[f"attnkit:{route}"] = lambda route=route, pattern=pattern, q=q, k=k, v=v: (
                            attention(q, k, v, pattern=pattern, backend=route)
                        )
                try:
                    fns.update(
                        {f"torch:{m}": f for m, f in baselines(name, pattern, factory, q, k, v).items()}
                    )
                except Exception as e:
                    rows.append({"mask": name, "N": n, "D": d, "baseline_error": str(e)[:200]})
                chosen = _chosen(q, k, v, pattern)
                for backward in (False, True):
                    medians = interleaved(fns, backward, device, rounds)
                    flops = flops_fwd * (3.5 if backward else 1.0)
                    row = {
                        "mask": name,
                        "N": n,
                        "B": b,
                        "H": heads,
                        "D": d,
                        "pass": "fwd+bwd" if backward else "fwd",
                        "auto_chose": chosen,
                        "density": pairs / (n * n),
                        "seconds": medians,
                        "tflops": {
                            m: (flops / t / 1e12 if isinstance(t, float) else None)
                            for m, t in medians.items()
                        },
                    }
                    rows.append(row)
                    print(_line(row), flush=True)
    return rows


def _call(q, k, v, pattern, route):
    return lambda: attention(q, k, v, pattern=pattern, backend=route)


def _tflops(flops: float, seconds) -> float | None:
    return flops / seconds / 1e12 if isinstance(seconds, float) else None


def _chosen(q, k, v, pattern) -> str:
    from attnkit.backends import select

    return select(build_inputs(q, k, v, pattern=pattern)).name


def _line(row) -> str:
    times = row["seconds"]
    theirs = {m: t for m, t in times.items() if m.startswith("torch") and isinstance(t, float)}
    best = min(theirs.values()) if theirs else None
    auto = times.get("attnkit:auto")
    ratio = f"{best / auto:5.2f}x" if best and isinstance(auto, float) else "  -  "
    cells = " ".join(
        f"{m.split(':')[1]}={t * 1e3:8.2f}ms" if isinstance(t, float) else f"{m.split(':')[1]}=FAILED"
        for m, t in times.items()
    )
    return (
        f"{row['mask']:>10} N={row['N']:>6} D={row['D']:>3} {row['pass']:>7} "
        f"auto({row['auto_chose']}) vs best torch {ratio} | {cells}"
    )


def first_call(device, dtype, smoke: bool) -> list[dict]:
    """Seconds of the first forward+backward of a shape no earlier call used."""
    rows = []
    n = 96 if smoke else 12288
    pattern, factory = masks(n)["bigbird"]
    for route in ("triton", "flex", "torch:flex_attention"):
        q, k, v = (torch.randn(1, 4, n, 96, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        sync(device)
        t = time.perf_counter()
        try:
            if route.startswith("torch"):
                if not q.is_cuda:
                    raise RuntimeError("FlexAttention baseline timed on CUDA only")
                fn = baselines("bigbird", pattern, factory, q, k, v)["flex_attention"]
                out = fn()
            else:
                out = attention(q, k, v, pattern=pattern, backend=route)
            out.sum().backward()
            sync(device)
            rows.append({"route": route, "N": n, "D": 96, "seconds": time.perf_counter() - t})
        except Exception as e:
            rows.append({"route": route, "N": n, "D": 96, "error": f"{type(e).__name__}: {e}"[:200]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=240.0, help="seconds after which timing stops")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device (plumbing check)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("bench/gpu.py needs a CUDA GPU (use --smoke to check the script on a CPU)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    env = environment()
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    print("correctness ...", flush=True)
    correctness = check(device, dtype, args.smoke)
    for row in correctness:
        if row["status"] in ("FAIL", "error"):
            print("  ", row, flush=True)
    print(f"  {sum(r['status'] == 'pass' for r in correctness)} pass, "
          f"{sum(r['status'] in ('FAIL', 'error') for r in correctness)} fail", flush=True)  # fmt: skip
    print("first-call latency ...", flush=True)
    latency = first_call(device, dtype, args.smoke)
    print("speed ...", flush=True)
    timings = speed(device, dtype, args.budget, args.smoke, started)
    result = {
        "environment": env,
        "dtype": str(dtype),
        "correctness": correctness,
        "first_call": latency,
        "speed": timings,
        "wall_seconds": time.perf_counter() - started,
    }
    path = RESULTS / ("gpu-smoke.json" if args.smoke else "gpu.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path} in {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
