"""attnkit's in-memory caches: thread-safe, bounded in bytes, inspectable and clearable.

Building a block-sparse plan, a pattern's block map or a dispatch decision costs far more than
looking one up, so attnkit keeps them per ``(pattern, N, S, ...)``. Each cache is a
least-recently-used map bounded by the bytes its entries hold (tensors counted by their
storage), safe to use from many threads at once (a threaded inference server calls
``attention()`` concurrently), and open to the user::

    import attnkit

    attnkit.caches.info()                            # {'plans': CacheInfo(entries=3, ...), ...}
    attnkit.caches.set_limit("plans", 64 * 2**20)    # at most 64 MiB of plans
    attnkit.caches.clear()                           # drop everything (e.g. after a sweep)

An entry larger than its cache's whole limit is built and returned but not kept. Keys that
cannot be hashed are never cached.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields, is_dataclass
from typing import Generic, TypeVar

import torch

__all__ = ["CacheInfo", "clear", "info", "set_limit"]

V = TypeVar("V")

MiB = 2**20


@dataclass(frozen=True)
class CacheInfo:
    """One cache's state: ``entries`` kept, the ``bytes`` they hold, the ``limit`` in bytes,
    and the ``hits``/``misses`` since it was created or last cleared."""

    entries: int
    bytes: int
    limit: int
    hits: int
    misses: int


def nbytes(value: object) -> int:
    """Approximate memory held by ``value``: tensors by their element bytes, dataclasses,
    tuples, lists and dicts by their contents, anything else by ``sys.getsizeof``."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if is_dataclass(value) and not isinstance(value, type):
        return sys.getsizeof(value) + sum(nbytes(getattr(value, f.name)) for f in fields(value))
    if isinstance(value, (tuple, list)):
        return sys.getsizeof(value) + sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(nbytes(v) for v in value.values())
    return sys.getsizeof(value)


class ByteLRU(Generic[V]):
    """A least-recently-used map bounded by the total bytes of its values, guarded by a lock.

    Values are built outside the lock (two threads missing the same key at once may both build
    it; the first to finish is kept), so one slow build never blocks lookups of other keys.
    """

    def __init__(self, name: str, limit: int, size: Callable[[V], int] = nbytes) -> None:
        self.name = name
        self._limit = int(limit)
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0

    def get(self, key: Hashable, build: Callable[[], V]) -> V:
        """The value for ``key``, calling ``build()`` on a miss (and keeping what it returns)."""
        try:
            with self._lock:
                hit = self._entries.get(key)
                if hit is not None:
                    self._entries.move_to_end(key)
                    self._hits += 1
                    return hit[0]
                self._misses += 1
        except TypeError:  # an unhashable key: build, never keep
            return build()
        value = build()
        size = self._size(value)
        with self._lock:
            if key in self._entries:  # another thread finished first: share its value
                return self._entries[key][0]
            if size <= self._limit:
                self._entries[key] = (value, size)
                self._bytes += size
                self._evict()
        return value

    def peek(self, key: Hashable) -> V | None:
        """The value kept for ``key``, or None (a hit or a miss, as :meth:`get` counts them)."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return hit[0]

    def put(self, key: Hashable, value: V) -> None:
        """Keep ``value`` for ``key`` (if it fits the limit)."""
        size = self._size(value)
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            if size <= self._limit:
                self._entries[key] = (value, size)
                self._bytes += size
                self._evict()

    def _evict(self) -> None:
        while self._bytes > self._limit and self._entries:
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = self._hits = self._misses = 0

    def set_limit(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"set_limit: expected limit to be an int >= 0 (bytes), but got {limit!r}.")
        with self._lock:
            self._limit = limit
            self._evict()

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(len(self._entries), self._bytes, self._limit, self._hits, self._misses)


_REGISTRY: dict[str, ByteLRU] = {}


def register(name: str, limit: int, size: Callable[[object], int] = nbytes) -> ByteLRU:
    """Create the cache called ``name`` (library-internal: one per kind of cached object)."""
    if name in _REGISTRY:
        raise ValueError(f"register: a cache named {name!r} already exists.")
    cache = ByteLRU(name, limit, size)
    _REGISTRY[name] = cache
    return cache


def _get(name: str) -> ByteLRU:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"expected a cache name in {sorted(_REGISTRY)}, but got {name!r}.") from None


def info() -> dict[str, CacheInfo]:
    """Every cache's :class:`CacheInfo`, by name."""
    return {name: cache.info() for name, cache in sorted(_REGISTRY.items())}


def clear(name: str | None = None) -> None:
    """Empty the cache called ``name``, or every cache."""
    for cache in _REGISTRY.values() if name is None else [_get(name)]:
        cache.clear()


def set_limit(name: str, limit: int) -> None:
    """Bound the cache called ``name`` to ``limit`` bytes (0 disables it), evicting at once."""
    _get(name).set_limit(limit)
