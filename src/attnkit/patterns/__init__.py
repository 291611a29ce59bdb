"""Attention patterns: which keys each query may see.

Legend: query ``i`` of ``N`` sits at position ``p`` on the key axis (``p = i + S - N`` by
default, see :class:`Causal`); key ``j`` of ``S``. ``True`` means "may attend".

===========================  ==========================================================
``Full()``                   every ``j``
``Causal()``                 ``j <= p``
``SlidingWindow(b, a=0)``    ``p - b <= j <= p + a``
``Dilated(b, d, a=0)``       window ``[p - b, p + a]`` and ``(p - j) % d == 0``
``Strided(s)``               ``|p - j| < s`` or ``(p - j) % s == 0``
``Fixed(l, c)``              ``j // l == p // l`` or ``j % l >= l - c``
``Global(idx)``              ``p in idx`` or ``j in idx``
``Random(r, blk, seed)``     ``r`` key blocks per query block, chosen by ``seed``
``BlockLayout(grid, blk)``   ``grid[i // blk, j // blk]``
``Document(lengths)``        same segment of the packed sequence
``KeyPadding(lengths)``      ``j < lengths[b]`` (per batch item)
``a & b``, ``a | b``         both, either
``crop(p, N, S, rows, cols)``  a rectangle of ``p`` (context parallelism's shard pairs)
``PerHead([p_0, ...])``      head ``h`` uses ``p_h``
===========================  ==========================================================
"""

from .base import And, Or, Pattern
from .basic import Causal, Full
from .blockmap import EMPTY, FULL, PARTIAL, BlockMap
from .crop import Crop, crop
from .document import Document, KeyPadding
from .global_tokens import Global
from .layout import BlockLayout
from .parse import PATTERN_TYPES, parse_pattern
from .per_head import PerHead
from .random_blocks import Random
from .strided import Fixed, Strided
from .window import Dilated, SlidingWindow

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "PATTERN_TYPES",
    "And",
    "BlockLayout",
    "BlockMap",
    "Causal",
    "Crop",
    "Dilated",
    "Document",
    "Fixed",
    "Full",
    "Global",
    "KeyPadding",
    "Or",
    "Pattern",
    "PerHead",
    "Random",
    "SlidingWindow",
    "Strided",
    "crop",
    "parse_pattern",
]
