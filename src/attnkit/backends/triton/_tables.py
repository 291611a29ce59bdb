"""What the block-sparse Triton kernels read: a pattern's tiles as index lists, built once.

For a pattern on an ``(N, S)`` matrix cut into ``block_q x block_k`` tiles, the kernels need

* row lists (the forward and ``dQ``): for each query block, its non-empty key blocks, in
  increasing order (``row_ptr``, ``cols``), in CSR form;
* column lists (``dK``/``dV``): for each key block, its non-empty query blocks (``col_ptr``,
  ``rows``), the transposed map in CSC form;
* for every listed tile, which element mask it needs (``row_masks``/``col_masks``): ``-1`` for
  a full tile (no mask at all), otherwise an index into ``masks``.

Element masks are deduplicated: the partial tiles of a window's diagonal, of a causal
diagonal or of a strided pattern repeat a handful of shapes, so ``masks`` holds a few
``block_q x block_k`` tiles however long the sequence. Per-batch patterns (``KeyPadding``,
per-item documents) get one mask index per batch item for each tile of the union map.

Pure torch: built on the CPU from the pattern's exact :class:`~attnkit.patterns.BlockMap`
(no ``N x S`` evaluation, only the partial tiles are evaluated), then moved to the device
once and cached in ``attnkit.caches`` as ``"triton_tables"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ... import caches
from ...patterns import EMPTY, PARTIAL, Pattern

__all__ = ["KernelTables", "kernel_tables"]

_TABLES = caches.register("triton_tables", 256 * caches.MiB)

#: Element masks evaluated per batch of partial tiles (bounds the host memory of the build).
_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True, eq=False)
class KernelTables:
    """Tile lists of one pattern for one ``(N, S, block_q, block_k)``, on one device.

    Attributes:
        block_q, block_k: Tile size the lists were built for (the kernels' ``BLOCK_Q``/``BLOCK_K``).
        row_ptr: ``(ceil(N / block_q) + 1,)`` int32; row ``r``'s entries are
            ``row_ptr[r]:row_ptr[r + 1]``.
        cols: ``(T,)`` int32 key block of each row entry.
        row_masks: ``(Bp, T)`` int32 mask index of each row entry (``-1``: full tile); ``Bp`` is
            1, or the pattern's batch size for per-batch patterns.
        col_ptr: ``(ceil(S / block_k) + 1,)`` int32, the same tiles by key block.
        rows: ``(T,)`` int32 query block of each column entry.
        col_masks: ``(Bp, T)`` int32 mask index of each column entry.
        masks: ``(M, block_q, block_k)`` int8 distinct element masks (``M >= 1``).
    """

    block_q: int
    block_k: int
    row_ptr: Tensor
    cols: Tensor
    row_masks: Tensor
    col_ptr: Tensor
    rows: Tensor
    col_masks: Tensor
    masks: Tensor

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        """The seven tensors, in the order the kernel ops take them."""
        return (self.row_ptr, self.cols, self.row_masks, self.col_ptr, self.rows, self.col_masks, self.masks)

    @property
    def num_tiles(self) -> int:
        return self.cols.numel()

    def to(self, device: torch.device) -> KernelTables:
        """The same tables on ``device``."""
        moved = [t.to(device).contiguous() for t in self.tensors]
        return KernelTables(self.block_q, self.block_k, *moved)


def kernel_tables(
    pattern: Pattern, n: int, s: int, block_q: int, block_k: int, device: torch.device
) -> KernelTables:
    """The :class:`KernelTables` of ``pattern`` on ``(n, s)``, cached per device."""
    key = (pattern, n, s, block_q, block_k, str(device))
    return _TABLES.get(key, lambda: _build(pattern, n, s, block_q, block_k).to(device))


def _build(pattern: Pattern, n: int, s: int, bq: int, bk: int) -> KernelTables:
    states = pattern.block_map(n, s, (bq, bk)).states
    nqb, nkb = states.shape
    entries = (states != EMPTY).nonzero()  # row-major: each row's key blocks in order
    r, c = entries[:, 0], entries[:, 1]
    per_batch = pattern.batch_size or 1
    ids = torch.full((per_batch, r.numel()), -1, dtype=torch.int32)
    partial = (states[r, c] == PARTIAL).nonzero().flatten()
    masks = _distinct_masks(pattern, n, s, (bq, bk), r, c, partial, ids)
    by_col = torch.argsort(c * nqb + r)
    return KernelTables(
        bq,
        bk,
        _pointers(r, nqb),
        c.to(torch.int32),
        ids,
        _pointers(c, nkb),
        r[by_col].to(torch.int32),
        ids[:, by_col].contiguous(),
        masks,
    )


def _pointers(index: Tensor, count: int) -> Tensor:
    """CSR row pointers of sorted-or-not ``index`` values in ``[0, count)``."""
    ptr = torch.zeros(count + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(index, minlength=count), 0)
    return ptr.to(torch.int32)


def _distinct_masks(
    pattern: Pattern,
    n: int,
    s: int,
    block: tuple[int, int],
    r: Tensor,
    c: Tensor,
    partial: Tensor,
    ids: Tensor,
) -> Tensor:
    """Evaluate the partial tiles' masks in chunks, keep each distinct one once, and write
    every (batch item, entry)'s index into ``ids``."""
    bq, bk = block
    per_batch = ids.shape[0]
    seen: dict[bytes, int] = {}
    distinct: list[Tensor] = []
    step = max(1, _CHUNK_BYTES // (per_batch * bq * bk))
    for lo in range(0, partial.numel(), step):
        sel = partial[lo : lo + step]
        masks, _ = pattern.tile_masks(n, s, block, r[sel], c[sel])
        flat = masks.reshape(per_batch * sel.numel(), bq * bk).to(torch.int8)
        unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
        index = torch.empty(unique.shape[0], dtype=torch.int32)
        for u in range(unique.shape[0]):
            raw = unique[u].numpy().tobytes()
            if raw not in seen:
                seen[raw] = len(distinct)
                distinct.append(unique[u])
            index[u] = seen[raw]
        ids[:, sel] = index[inverse].view(per_batch, sel.numel())
    if not distinct:
        return torch.zeros(1, bq, bk, dtype=torch.int8)
    return torch.stack(distinct).view(-1, bq, bk)
