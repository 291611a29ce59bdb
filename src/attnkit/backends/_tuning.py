"""Per-machine rates for the block-sparse cost model and the eager crossover, measured on the
machine that runs.

The block-sparse backend chooses its tile size, which diagonals form the band, and whether
``auto`` should run it at all, by predicting times from a few kernel rates: torch's fused CPU
kernel's speed on band and gathered layouts per tile size, forward and backward; the extra
cost of copying gathered keys; and the speed of dense SDPA with a boolean mask (what ``auto``
would run instead). ``auto`` sends CPU training to the ``eager`` backend up to the length
where a materialized forward and backward measured faster than the fused kernel's
(``eager_keys``). These differ between CPUs by several times (an Intel Xeon with AMX runs
bf16 matmuls ~6x faster than fp32; a CPU without AVX-512 runs bf16 slowly), so they are
measured here, not shipped as one machine's constants.

* :func:`current` gives the rates for a dtype: from the tuning file when it holds an entry for
  this machine (CPU model, torch version, threads, dtype), else measured at first use (a few
  seconds, announced in one line) and stored;
* ``ATTNKIT_TUNE=off`` uses the built-in defaults (measured on a 2-core AMD EPYC, float32);
* the file is ``$ATTNKIT_TUNE_FILE``, else ``$XDG_CACHE_HOME/attnkit/tuning.json``. A corrupt
  or foreign file is ignored with a warning and rewritten, never a crash;
* ``attnkit tune`` measures ahead of time (``--force`` to measure again).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import caches
from .._files import atomic_write, user_cache_dir
from .._timing import time_in_turns
from ._materialized import materialized, matmul_dtype
from .base import AttentionInputs, compute_dtype

__all__ = [
    "EAGER_LENGTHS",
    "TILES",
    "Tuning",
    "calibrate",
    "current",
    "eager_crossover",
    "forget",
    "machine_key",
    "store",
    "tuning_file",
]

#: Candidate tile sizes of the block-sparse plans.
TILES = (32, 64, 128, 256)
#: Sequence lengths at which materialized and fused training attention are compared.
EAGER_LENGTHS = (16, 32, 64, 128, 256, 512)
FORMAT = 2  # 2: eager_keys added


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per machine key
class Tuning:
    """Rates the cost model uses, for one machine, thread count and dtype.

    Attributes:
        kernel_rates: ``{"forward"|"backward": {"band"|"gather": {tile: computed GFLOP/s}}}``
            of torch's fused CPU kernel (every pair of each call, masked or not; backward
            counted as 2.5x forward).
        gather_copy: Cost of a gathered tile including the copy of its keys and values, over
            its kernel time alone.
        sdpa_mask_rate: Forward GFLOP/s of dense ``scaled_dot_product_attention`` with a
            boolean mask.
        eager_keys: The longest sequence (of :data:`EAGER_LENGTHS`) up to which a training
            step of materialized attention (the ``eager`` backend: forward and backward with
            a key padding mask) is faster than ``scaled_dot_product_attention``'s, at every
            shorter length too; 0 when it never is.
        source: ``"built-in"``, ``"measured"`` or ``"file"``.
    """

    kernel_rates: dict
    gather_copy: float
    sdpa_mask_rate: float
    eager_keys: int
    source: str = "built-in"
    key: str = field(default="", compare=False)

    def gather_cost(self, block: int) -> float:
        """Cost of one gathered tile in band tiles, forward: the band keeps a diagonal when
        computing it for every row is cheaper than gathering its non-empty tiles."""
        rates = self.kernel_rates["forward"]
        tile = min(TILES, key=lambda t: abs(t - block))  # the nearest measured tile size
        return self.gather_copy * rates["band"][tile] / rates["gather"][tile]

    def to_json(self) -> dict:
        d = asdict(self)
        d["kernel_rates"] = {
            direction: {layout: {str(b): r for b, r in rates.items()} for layout, rates in by_layout.items()}
            for direction, by_layout in self.kernel_rates.items()
        }
        del d["source"], d["key"]
        return d

    @classmethod
    def from_json(cls, data: dict, key: str) -> Tuning:
        rates = {
            direction: {
                layout: {int(b): float(data["kernel_rates"][direction][layout][str(b)]) for b in TILES}
                for layout in ("band", "gather")
            }
            for direction in ("forward", "backward")
        }
        eager_keys = int(data["eager_keys"])
        if eager_keys not in (0, *EAGER_LENGTHS):
            raise ValueError(f"eager_keys={eager_keys} is not 0 or one of {EAGER_LENGTHS}")
        tuning = cls(
            rates, float(data["gather_copy"]), float(data["sdpa_mask_rate"]), eager_keys, "file", key
        )
        values = [r for d in rates.values() for lay in d.values() for r in lay.values()]
        if not all(
            v > 0 and v == v and v != float("inf")
            for v in [*values, tuning.gather_copy, tuning.sdpa_mask_rate]
        ):
            raise ValueError("non-positive or non-finite rate")
        return tuning


#: Measured with bench/sparse_tiles.py and bench/dispatch.py on a 2-core AMD EPYC (AVX-512 +
#: BF16, no AMX), torch 2.13, float32: used with ``ATTNKIT_TUNE=off``. ``eager_keys``: the
#: longest length where bench/eager_attention.py found eager faster in float32 at every shorter
#: one (bench/results/eager_attention.json; :func:`calibrate` said 16 there, a close call at 32).
DEFAULT = Tuning(
    kernel_rates={
        "forward": {
            "band": {32: 151, 64: 150, 128: 137, 256: 160},
            "gather": {32: 99, 64: 106, 128: 103, 256: 126},
        },
        "backward": {
            "band": {32: 38, 64: 104, 128: 124, 256: 155},
            "gather": {32: 35, 64: 87, 128: 108, 256: 122},
        },
    },
    gather_copy=1.2,
    sdpa_mask_rate=157.5,
    eager_keys=32,
)

_LOCK = threading.RLock()
_LOADED: dict[str, Tuning] = {}


def enabled() -> bool:
    return os.environ.get("ATTNKIT_TUNE", "").strip().lower() not in ("off", "0", "false", "no")


def tuning_file() -> Path:
    return Path(os.environ.get("ATTNKIT_TUNE_FILE") or user_cache_dir() / "tuning.json")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_key(dtype: torch.dtype) -> str:
    """What the rates depend on: CPU model, torch version, threads and dtype."""
    dt = str(dtype).replace("torch.", "")
    return f"{_cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {dt}"


def current(dtype: torch.dtype = torch.float32) -> Tuning:
    """The rates for ``dtype`` on this machine (measured once, then from the file)."""
    if not enabled():
        return DEFAULT
    dtype = torch.float32 if dtype == torch.float64 else dtype  # float64 is planned like float32
    key = machine_key(dtype)
    hit = _LOADED.get(key)
    if hit is not None:
        return hit
    with _LOCK:
        hit = _LOADED.get(key) or _read_entry(key)
        if hit is None:
            print(
                f"attnkit: measuring this machine's attention kernels ({str(dtype).replace('torch.', '')}, "
                f"a few seconds, once; `attnkit tune` does it ahead of time, ATTNKIT_TUNE=off skips it)",
                file=sys.stderr,
            )
            hit = calibrate(dtype)
            store(hit)
        _LOADED[key] = hit
    return hit


def _read_all() -> dict:
    """The file's entries; ``{}`` (with a warning) when it is unreadable or not ours."""
    path = tuning_file()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("format"), int) and data["format"] < FORMAT:
            return {}  # an older attnkit's file: measured again (quietly) and rewritten
        if (
            not isinstance(data, dict)
            or data.get("format") != FORMAT
            or not isinstance(data.get("entries"), dict)
        ):
            raise ValueError(f"expected {{'format': {FORMAT}, 'entries': {{...}}}}")
        return data["entries"]
    except (OSError, ValueError) as e:
        _warn(f"attnkit: ignoring the tuning file {str(path)!r} ({e}); it will be measured and rewritten.")
        return {}


def _read_entry(key: str) -> Tuning | None:
    entry = _read_all().get(key)
    if entry is None:
        return None
    try:
        return Tuning.from_json(entry, key)
    except (KeyError, TypeError, ValueError) as e:
        _warn(
            f"attnkit: ignoring the tuning entry {key!r} in {str(tuning_file())!r} ({e!r}); measuring again."
        )
        return None


def store(tuning: Tuning) -> None:
    """Add (or replace) this machine's entry in the tuning file, atomically."""
    entries = _read_all()
    entries[tuning.key] = tuning.to_json()
    text = json.dumps({"format": FORMAT, "entries": entries}, indent=1, sort_keys=True)
    try:
        atomic_write(tuning_file(), lambda p: p.write_text(text + "\n", encoding="utf-8"))
    except OSError as e:  # a read-only home: keep the rates for this process only
        _warn(f"attnkit: could not save the tuning file ({e}).")


_PACKAGE = str(Path(__file__).resolve().parents[1])


def _warn(message: str) -> None:
    """A ``RuntimeWarning`` attributed to the first caller outside attnkit (the user's line
    that needed the rates), however deep inside attnkit it was raised."""
    frame, level = sys._getframe(1), 2  # stacklevel 2 is _warn's caller
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def forget() -> None:
    """Drop the rates this process has loaded (the next use reads the file again)."""
    with _LOCK:
        _LOADED.clear()
    caches.clear("tile_choices")
    caches.clear("plans")
    caches.clear("dispatch")


def calibrate(
    dtype: torch.dtype = torch.float32, *, rows: int = 2048, heads: int = 4, head_dim: int = 64
) -> Tuning:
    """Measure the rates on this machine (a few seconds): torch's fused CPU kernel on band
    (512 keys per tile) and gathered (256 keys per tile) layouts for every tile size, forward
    and backward; the copy of gathered keys; dense SDPA with a boolean mask; and a training
    step (forward and backward, ``rows`` query rows with a key padding mask) of fused against
    materialized attention at each of :data:`EAGER_LENGTHS`.

    All the measured calls are set up first and then timed in turns, the fastest of five runs
    each (:func:`attnkit._timing.time_in_turns`, attnkit's one timing policy)."""
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    g = torch.Generator().manual_seed(0)
    X, D = heads, head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    calls, flops = {}, {}
    for b in TILES:
        nr = max(1, rows // b)
        for layout, want in (("band", 512), ("gather", 256)):
            R = -(-(want + (b if layout == "band" else 0)) // b) * b
            q = randn(X, nr, b, D)
            if layout == "band":
                k_src, v_src = randn(X, nr * b + R, D), randn(X, nr * b + R, D)
                k = k_src.as_strided((X, nr, R, D), (k_src.stride(0), b * D, D, 1))
                v = v_src.as_strided((X, nr, R, D), (v_src.stride(0), b * D, D, 1))
            else:
                k_src, v_src = randn(X, nr * R, D), randn(X, nr * R, D)
                index = torch.randperm(nr * R, generator=g)
                k, v = k_src[:, index].view(X, nr, R, D), v_src[:, index].view(X, nr, R, D)
                calls["copy", layout, b] = lambda k_src=k_src, v_src=v_src, index=index: (
                    k_src[:, index],
                    v_src[:, index],
                )
            bias = torch.zeros(1, 1, b, R, dtype=dtype)
            out, lse = fwd(q, k, v, 0.0, False, attn_mask=bias)
            do = torch.randn(out.shape, generator=g).to(dtype)
            calls["forward", layout, b] = lambda q=q, k=k, v=v, bias=bias: fwd(
                q, k, v, 0.0, False, attn_mask=bias
            )
            calls["backward", layout, b] = lambda q=q, k=k, v=v, bias=bias, out=out, lse=lse, do=do: bwd(
                do, q, k, v, out, lse, 0.0, False, attn_mask=bias
            )
            flops["forward", layout, b] = 4 * X * nr * b * R * D
            flops["backward", layout, b] = 2.5 * 4 * X * nr * b * R * D
    n = rows
    qs, ks, vs = (randn(1, X, n, D) for _ in range(3))
    mask = torch.rand(n, n, generator=g) < 0.5
    calls["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
    for length in EAGER_LENGTHS:
        calls.update(_training_calls(randn, rows // length or 1, X, length, D, g))
    best = {name: t.best for name, t in time_in_turns(calls, repeats=5).items()}

    rates: dict = {d: {lay: {} for lay in ("band", "gather")} for d in ("forward", "backward")}
    for (direction, layout, b), f in flops.items():
        rates[direction][layout][b] = f / best[direction, layout, b] / 1e9
    copy_ratios = sorted(1 + best["copy", "gather", b] / best["forward", "gather", b] for b in TILES)
    return Tuning(
        kernel_rates=rates,
        gather_copy=copy_ratios[len(copy_ratios) // 2],
        sdpa_mask_rate=4 * X * n * n * D / best["sdpa"] / 1e9,
        eager_keys=eager_crossover({n: (best["eager", n], best["fused", n]) for n in EAGER_LENGTHS}),
        source="measured",
        key=machine_key(dtype),
    )


def _training_calls(randn, batch: int, heads: int, length: int, head_dim: int, g) -> dict:
    """``{("fused"|"eager", length): step}``: forward and backward of self-attention over
    ``batch`` padded sequences of ``length``, by ``scaled_dot_product_attention`` and by the
    ``eager`` backend's :func:`~attnkit.backends._materialized.materialized`."""

    with _autograd():
        q, k, v = (randn(batch, heads, length, head_dim).requires_grad_() for _ in range(3))
    lengths = torch.randint(length // 2 + 1, length + 1, (batch, 1), generator=g)
    mask = (torch.arange(length) < lengths).view(batch, 1, 1, length)
    dout = randn(batch, heads, length, head_dim)
    inp = AttentionInputs(q, k, v, None, mask, None, head_dim**-0.5, 0.0, None, False, False)
    mm, ct = matmul_dtype(q.dtype), compute_dtype(q.dtype)

    def fused() -> None:
        with _autograd():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(dout)

    def eager() -> None:
        with _autograd():
            materialized(inp, mm, ct)[0].backward(dout)

    return {("fused", length): fused, ("eager", length): eager}


@contextlib.contextmanager
def _autograd():
    """Autograd on, whatever the caller's mode: the first use that measures may come from
    inference code (``torch.no_grad`` or ``torch.inference_mode``)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def eager_crossover(times: dict[int, tuple[float, float]]) -> int:
    """From ``{length: (eager seconds, fused seconds)}``, the longest length up to which eager
    is faster at every measured length (0 when it is slower at the shortest)."""
    longest = 0
    for length in sorted(times):
        eager, fused = times[length]
        if eager >= fused:
            break
        longest = length
    return longest
