"""Neural-network modules built on :func:`attnkit.attention`."""

from .attention import MultiHeadAttention
from .kv_cache import KVCache

__all__ = ["KVCache", "MultiHeadAttention"]
