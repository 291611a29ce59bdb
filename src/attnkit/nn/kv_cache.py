"""``KVCache``: keys and values of earlier positions, kept for incremental decoding."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of one attention layer, grown step by step while decoding.

    Self-attention appends each step's keys and values (:meth:`update`); cross-attention
    fills the cache once from the encoder output and reuses it (:meth:`fill`). Storage grows
    by doubling, so appending ``T`` single tokens costs ``O(T)`` copies in total.

    Shapes: ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)``; :attr:`length` is ``S``.

    Example:
        >>> cache = KVCache()
        >>> k_all, v_all = cache.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
        >>> k_all, v_all = cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        >>> cache.length, tuple(k_all.shape)
        (6, (1, 2, 6, 8))
    """

    def __init__(self) -> None:
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.length = 0
        #: True after :meth:`fill`: the contents are fixed (cross-attention) and reused.
        self.static = False

    @property
    def is_empty(self) -> bool:
        return self.length == 0

    @property
    def keys(self) -> Tensor:
        """Cached keys ``(B, Hkv, S, D)``."""
        self._check_filled("keys")
        return self._k[:, :, : self.length]

    @property
    def values(self) -> Tensor:
        """Cached values ``(B, Hkv, S, Dv)``."""
        self._check_filled("values")
        return self._v[:, :, : self.length]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k (B, Hkv, n, D)`` and ``v (B, Hkv, n, Dv)``; return everything cached."""
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"KVCache.update: expected k (B, Hkv, n, D) and v (B, Hkv, n, Dv) with matching "
                f"B, Hkv, n, but got k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}."
            )
        if self.static:
            raise ValueError("KVCache.update: this cache was filled as static; call reset() first.")
        n = k.shape[2]
        if self._k is None:
            self._k = self._alloc(k, max(16, n))
            self._v = self._alloc(v, max(16, n))
        else:
            want = (self._k.shape[0], self._k.shape[1], self._k.shape[3])
            got = (k.shape[0], k.shape[1], k.shape[3])
            if want != got or v.shape[3] != self._v.shape[3]:
                raise ValueError(
                    f"KVCache.update: expected (B, Hkv, D)={want} as cached, but got {got} "
                    f"(k.shape={tuple(k.shape)}). Call reset() to start a new sequence."
                )
            if self.length + n > self._k.shape[2]:
                capacity = max(2 * self._k.shape[2], self.length + n)
                self._k = self._grow(self._k, capacity)
                self._v = self._grow(self._v, capacity)
        self._k[:, :, self.length : self.length + n] = k
        self._v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.keys, self.values

    def fill(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Replace the contents with ``k`` and ``v`` and mark them :attr:`static`
        (cross-attention's encoder keys and values, computed once per sequence)."""
        self.reset()
        out = self.update(k, v)
        self.static = True
        return out

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (in that order), as beam search does after each step."""
        self._check_filled("reorder")
        self._k = self._k.index_select(0, index)
        self._v = self._v.index_select(0, index)

    def reset(self) -> None:
        """Forget everything."""
        self._k = self._v = None
        self.length = 0
        self.static = False

    def __repr__(self) -> str:
        if self._k is None:
            return "KVCache(empty)"
        return f"KVCache(length={self.length}, keys={tuple(self.keys.shape)}, dtype={self._k.dtype})"

    def _check_filled(self, what: str) -> None:
        if self._k is None:
            raise ValueError(f"KVCache.{what}: the cache is empty; call update() or fill() first.")

    @staticmethod
    def _alloc(like: Tensor, capacity: int) -> Tensor:
        b, h, _, d = like.shape
        return torch.empty(b, h, capacity, d, dtype=like.dtype, device=like.device)

    def _grow(self, buf: Tensor, capacity: int) -> Tensor:
        new = self._alloc(buf, capacity)
        new[:, :, : self.length] = buf[:, :, : self.length]
        return new
