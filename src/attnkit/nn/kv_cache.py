"""``KVCache``: keys and values of earlier positions, kept for incremental decoding."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of one attention layer, grown step by step while decoding.

    Self-attention appends each step's keys and values (:meth:`update`); cross-attention
    fills the cache once from the encoder output and reuses it (:meth:`fill`). Storage grows
    by doubling, so appending ``T`` single tokens costs ``O(T)`` copies in total; a decoder
    that knows its final length sizes it exactly with :meth:`reserve`.

    Shapes: ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)``; :attr:`length` is the number of
    positions seen (``S`` unless the cache is windowed).

    Args:
        window: Keep only the keys and values of the last ``window`` positions: what a
            sliding-window layer whose queries see themselves and the ``window`` keys before
            them needs (Mistral, Gemma 3's local layers; pair it with ``SlidingWindow(window)``).
            Each :meth:`update` returns those, in position order, followed by the new ones; the
            cache itself holds exactly ``window`` positions (a ring buffer), however long the
            text. None (default) keeps everything.

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
        self._stored = 0  # positions held: length, or at most window
        self._head = 0  # windowed: the ring slot of the oldest position held
        self._reserved = 0
        #: True after :meth:`fill`: the contents are fixed (cross-attention) and reused.
        self.static = False

    @property
    def is_empty(self) -> bool:
        return self.length == 0

    @property
    def keys(self) -> Tensor:
        """Cached keys ``(B, Hkv, S, D)`` in position order (the last ``window`` of a windowed
        cache)."""
        self._check_filled("keys")
        return self._ordered(self._k)

    @property
    def values(self) -> Tensor:
        """Cached values ``(B, Hkv, S, Dv)`` in position order."""
        self._check_filled("values")
        return self._ordered(self._v)

    def reserve(self, positions: int) -> None:
        """Size the buffers of a cache that is not windowed for ``positions`` in all, at the
        first update, so that it never grows (or holds more than it needs)."""
        self._reserved = max(self._reserved, int(positions))

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k (B, Hkv, n, D)`` and ``v (B, Hkv, n, Dv)``; return everything cached and
        the new entries, in position order."""
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"KVCache.update: expected k (B, Hkv, n, D) and v (B, Hkv, n, Dv) with matching "
                f"B, Hkv, n, but got k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}."
            )
        if self.static:
            raise ValueError("KVCache.update: this cache was filled as static; call reset() first.")
        if self._k is not None:
            want = (self._k.shape[0], self._k.shape[1], self._k.shape[3])
            got = (k.shape[0], k.shape[1], k.shape[3])
            if want != got or v.shape[3] != self._v.shape[3]:
                raise ValueError(
                    f"KVCache.update: expected (B, Hkv, D)={want} as cached, but got {got} "
                    f"(k.shape={tuple(k.shape)}). Call reset() to start a new sequence."
                )
        out = self._append_window(k, v) if self.window is not None else self._append(k, v)
        self.length += k.shape[2]
        return out

    def _append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self._stored + k.shape[2]
        if self._k is None:
            capacity = max(self._reserved, end, 16)
            self._k, self._v = self._alloc(k, capacity), self._alloc(v, capacity)
        elif end > self._k.shape[2]:
            capacity = max(2 * self._k.shape[2], end)
            self._k, self._v = self._resized(self._k, capacity), self._resized(self._v, capacity)
        self._k[:, :, self._stored : end] = k
        self._v[:, :, self._stored : end] = v
        self._stored = end
        return self._k[:, :, :end], self._v[:, :, :end]

    def _append_window(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        W, n = self.window, k.shape[2]
        if self._stored:  # what the new queries see: the window held, then the new positions
            out = (
                torch.cat([self._ordered(self._k), k], dim=2),
                torch.cat([self._ordered(self._v), v], dim=2),
            )
        else:
            out = (k, v)
        if self._k is None:
            self._k, self._v = self._alloc(k, W), self._alloc(v, W)
        if n >= W:  # the last W new positions fill the ring
            self._k[:, :, :W] = k[:, :, n - W :]
            self._v[:, :, :W] = v[:, :, n - W :]
            self._head, self._stored = 0, W
        else:  # the new positions take the slots after the newest, overwriting the oldest
            slots = (self._head + self._stored + torch.arange(n, device=k.device)) % W
            self._k.index_copy_(2, slots, k)
            self._v.index_copy_(2, slots, v)
            dropped = max(0, self._stored + n - W)
            self._head, self._stored = (self._head + dropped) % W, min(W, self._stored + n)
        return out

    def _ordered(self, buf: Tensor) -> Tensor:
        """The positions held in ``buf``, oldest first (a view unless a ring has wrapped)."""
        if self.window is None or self._head == 0:
            return buf[:, :, : self._stored]
        return torch.cat([buf[:, :, self._head : self._stored], buf[:, :, : self._head]], dim=2)

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
        self.length = self._stored = self._head = 0
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

    def _resized(self, buf: Tensor, capacity: int) -> Tensor:
        new = self._alloc(buf, capacity)
        new[:, :, : self._stored] = buf[:, :, : self._stored]
        return new
