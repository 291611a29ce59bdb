"""attnkit: self-attention for PyTorch.

Exact, multi-head and block-sparse attention with patterns you can read, on backends that
say what they support.
"""

from . import backends, caches, models, nn, patterns
from .functional import attention

__version__ = "0.1.0"

__all__ = ["__version__", "attention", "backends", "caches", "models", "nn", "patterns"]
