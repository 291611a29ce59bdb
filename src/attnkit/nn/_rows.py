"""Token-wise work in blocks of rows, for long inputs without autograd.

A model's norms, projections, rotary embedding and feed-forward treat every token alone, so a
prefill of ``N`` tokens can run them on blocks of rows. Run whole, each of those steps makes a
fresh ``N x width`` tensor, whose pages the kernel must fault in before the step writes them,
and streams it through memory. In blocks, each step's temporaries are a few MiB that the allocator
hands back block after block, near the caches, and only each step's result is ``N`` rows long.

With autograd recording, blocks would keep every block's graph: those calls run whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["BLOCK_BYTES", "in_row_blocks", "row_blocks"]

#: A block holds at most this many bytes of its widest activation: a fixed rule, not a measured
#: constant -- thousands of rows, so the matrix products run at full speed, in a few tens of MiB
#: at most, within the last-level cache of common server CPUs.
BLOCK_BYTES = 16 * 2**20


def row_blocks(rows: int, widest: int, element_size: int) -> list[slice] | None:
    """Slices of ``rows`` rows whose widest activation (``widest`` elements per row) fits in
    :data:`BLOCK_BYTES`, or None when one block holds them all or autograd is recording."""
    per_row = max(1, widest * element_size)
    if torch.is_grad_enabled() or rows * per_row <= BLOCK_BYTES:
        return None
    step = max(1, BLOCK_BYTES // per_row)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def in_row_blocks(fn: Callable[..., Tensor], *xs: Tensor, widest: int) -> Tensor:
    """``fn(*xs)`` for a function of the rows of ``(..., C_i)`` tensors, computed on blocks of
    rows when :func:`row_blocks` says so (``widest``: the widest activation ``fn`` makes per
    row) and written into one output. ``xs`` share their leading dimensions."""
    x = xs[0]
    if x.dim() < 2:
        return fn(*xs)
    rows = x.numel() // x.shape[-1]
    blocks = row_blocks(rows, widest, x.element_size())
    if blocks is None:
        return fn(*xs)
    flat = [t.reshape(rows, t.shape[-1]) for t in xs]
    out = None
    for sl in blocks:
        y = fn(*(t[sl] for t in flat))
        if out is None:
            out = y.new_empty(rows, y.shape[-1])
        out[sl] = y
    return out.view(*x.shape[:-1], out.shape[-1])
