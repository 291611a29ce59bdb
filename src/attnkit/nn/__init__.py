"""Neural-network modules built on :func:`attnkit.attention`."""

from .attention import MultiHeadAttention
from .dropout import Dropout
from .kv_cache import KVCache
from .layers import (
    Decoder,
    DecoderCache,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    FeedForward,
    LayerCache,
    RMSNorm,
    make_norm,
)
from .loss import cross_entropy
from .positional import ALiBi, LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding

__all__ = [
    "ALiBi",
    "Decoder",
    "DecoderCache",
    "DecoderLayer",
    "Dropout",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "KVCache",
    "LayerCache",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "cross_entropy",
    "make_norm",
]
