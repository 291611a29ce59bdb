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

    Shapes: ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)``; :attr:`length` is the number of
    positions seen (``S`` unless the cache is windowed).

    Args:
        window: Keep only the keys and values of the last ``window`` positions before each new
            step: what a sliding-window layer whose queries see themselves and the ``window``
            keys before them needs (Mistral, Gemma 3's local layers; pair it with
            ``SlidingWindow(window)``). Each :meth:`update` returns those plus the new ones, so
            the memory of a decode stays ``O(window)`` however long the text. None (default)
            keeps everything.

    Example:
        >>> cache = KVCache()
        >>> k_all, v_all = cache.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
        >>> k_all, v_all = cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        >>> cache.length, tuple(k_all.shape)
        (6, (1, 2, 6, 8))
    """

    def __init__(self, window: int | None = None) -> None:
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"KVCache: expected window >= 1 or None, but got window={window!r}.")
        self.window = window
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        #: Positions seen so far (the next token's position).
        self.length = 0
        self._start = 0  # the stored positions are _k[:, :, _start:_end]
        self._end = 0
        #: True after :meth:`fill`: the contents are fixed (cross-attention) and reused.
        self.static = False

    @property
    def is_empty(self) -> bool:
        return self.length == 0

    @property
    def keys(self) -> Tensor:
        """Cached keys ``(B, Hkv, S, D)`` (the last ``window`` positions of a windowed cache)."""
        self._check_filled("keys")
        return self._k[:, :, self._kept() : self._end]

    @property
    def values(self) -> Tensor:
        """Cached values ``(B, Hkv, S, Dv)``."""
        self._check_filled("values")
        return self._v[:, :, self._kept() : self._end]

    def _kept(self, extra: int = 0) -> int:
        """Where the stored positions a step needs begin: the last ``window`` before the
        ``extra`` newest ones (all of them without a window)."""
        if self.window is None:
            return self._start
        return max(self._start, self._end - extra - self.window)

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
            self._start = self._end = 0
        else:
            want = (self._k.shape[0], self._k.shape[1], self._k.shape[3])
            got = (k.shape[0], k.shape[1], k.shape[3])
            if want != got or v.shape[3] != self._v.shape[3]:
                raise ValueError(
                    f"KVCache.update: expected (B, Hkv, D)={want} as cached, but got {got} "
                    f"(k.shape={tuple(k.shape)}). Call reset() to start a new sequence."
                )
            self._start = self._kept()  # a windowed cache forgets what no later step sees
            if self._end + n > self._k.shape[2]:
                stored = self._end - self._start
                capacity = self._k.shape[2]
                if stored + n > capacity // 2:  # compacting alone would leave too little room
                    capacity = max(2 * capacity, stored + n)
                self._k = self._moved(self._k, capacity)
                self._v = self._moved(self._v, capacity)
                self._start, self._end = 0, stored
        self._k[:, :, self._end : self._end + n] = k
        self._v[:, :, self._end : self._end + n] = v
        self._end += n
        self.length += n
        start = self._kept(extra=n)
        return self._k[:, :, start : self._end], self._v[:, :, start : self._end]

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
        self.length = self._start = self._end = 0
        self.static = False

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers held (capacity included)."""
        return sum(t.numel() * t.element_size() for t in (self._k, self._v) if t is not None)

    def __repr__(self) -> str:
        window = "" if self.window is None else f"window={self.window}, "
        if self._k is None:
            return f"KVCache({window}empty)"
        return f"KVCache({window}length={self.length}, keys={tuple(self.keys.shape)}, dtype={self._k.dtype})"

    def _check_filled(self, what: str) -> None:
        if self._k is None:
            raise ValueError(f"KVCache.{what}: the cache is empty; call update() or fill() first.")

    @staticmethod
    def _alloc(like: Tensor, capacity: int) -> Tensor:
        b, h, _, d = like.shape
        return torch.empty(b, h, capacity, d, dtype=like.dtype, device=like.device)

    def _moved(self, buf: Tensor, capacity: int) -> Tensor:
        """The stored positions at the front of a buffer of ``capacity`` (a new one if it grows)."""
        stored = buf[:, :, self._start : self._end]
        if capacity == buf.shape[2] and self._start >= stored.shape[2]:  # no overlap: move in place
            buf[:, :, : stored.shape[2]] = stored
            return buf
        new = self._alloc(buf, capacity)
        new[:, :, : stored.shape[2]] = stored
        return new
