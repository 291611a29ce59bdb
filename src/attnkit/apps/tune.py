"""``attnkit tune``: measure this machine's attention kernels for the block-sparse cost model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backends import _tuning
from .errors import UsageError, positive

__all__ = ["run"]


def run(
    dtypes: Sequence[str] = ("float32", "bfloat16"), *, force: bool = False, threads: int | None = None
) -> int:
    """Measure (or read from the tuning file) the rates of each dtype and print them."""
    if threads is not None:
        positive(threads=threads)
        torch.set_num_threads(threads)
    if not _tuning.enabled():
        raise UsageError("ATTNKIT_TUNE=off is set: the built-in rates are used and nothing is measured.")
    print(f"tuning file: {_tuning.tuning_file()}")
    for name in dtypes:
        dtype = getattr(torch, name)
        key = _tuning.machine_key(dtype)
        if force:
            _tuning.forget()
            tuning = _tuning.calibrate(dtype)
            _tuning.store(tuning)
        else:
            tuning = _tuning.current(dtype)
        print(f"\n{key} ({'measured now' if tuning.source == 'measured' else 'from the file'})")
        for direction, layouts in tuning.kernel_rates.items():
            for layout, rates in layouts.items():
                cells = "  ".join(f"{b:>3}: {r:6.1f}" for b, r in rates.items())
                print(f"  {direction:<8} {layout:<6} GFLOP/s by tile  {cells}")
        print(f"  gathered tile cost (copy included) {tuning.gather_copy:.2f}x its kernel time")
        print(f"  dense SDPA with a boolean mask     {tuning.sdpa_mask_rate:.1f} GFLOP/s")
        eager = f"up to {tuning.eager_keys} tokens" if tuning.eager_keys else "never"
        print(f"  training on the eager backend      {eager} (faster than the fused kernel there)")
    return 0
