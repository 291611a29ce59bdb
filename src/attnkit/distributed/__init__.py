"""Context parallelism: attention over a sequence sharded across processes, any pattern.

Each rank of a ``torch.distributed`` group holds a shard of the sequence (made by
:func:`shard_sequence`). :func:`context_parallel_attention` returns this rank's shard of what
:func:`attnkit.attention` would give on the whole sequence, forward and backward, by one of two
methods:

* ``ring``: every rank keeps its queries; keys and values travel between ranks with
  ``isend``/``irecv``, in pieces, the next piece's transfer overlapping the current one's compute. Each
  (query run, key run) pair is an ordinary attention call on the pattern's rectangle
  (:func:`attnkit.patterns.crop`); partial results merge exactly through their log-sum-exps.
  The backward re-sends the keys and values and returns each pair's ``dK``/``dV`` to their
  owner. A rank sends another only the keys that its queries see (the exact span, from the
  cropped block maps), and a pair computes only the query rows that see its keys: a sliding
  window sends one window to the next rank whatever ``N`` is, ``Document`` reaches only the
  ranks that share a document, and pairs the pattern never connects cost nothing.
  ``layout="zigzag"`` (rank ``r`` holds runs ``r`` and ``2P - 1 - r`` of ``2P``) balances
  causal work; :class:`BalancedLayout` balances any pattern's.
* ``all_to_all`` (DeepSpeed-Ulysses): swap sequence sharding for head sharding, run the whole
  sequence with the full pattern on ``H / P`` heads through any local backend, swap back.
  Needs ``H % P == 0``.

Only ``torch.distributed`` point-to-point operations move data (gloo on CPU, NCCL on GPU).
Every wait has a timeout (``timeout=``, default ``ATTNKIT_DIST_TIMEOUT`` seconds or 300) and
names the peer it waited for, so a rank that raised or died makes the others fail with
:class:`PeerError` instead of hanging. Every call first checks that all ranks agree on shapes,
dtype, pattern, layout and method.

Shape legend: ``B`` batch, ``H``/``Hkv`` query/key-value heads, ``N``/``S`` whole query/key
lengths, ``N_local`` a rank's share, ``D``/``Dv`` head dims, ``P`` ranks in the group.

The package, bottom up: :mod:`.transport` (communication device, timeouts, transfers, peer
failures), :mod:`.layouts` (who holds which tokens), :mod:`.ring` and :mod:`.all_to_all` (the
two methods), :mod:`.attention` (the call, its agreement across ranks, and models).
"""

from __future__ import annotations

from .attention import METHODS, ContextParallel, context_parallel_attention, set_context_parallel
from .layouts import (
    LAYOUTS,
    SEQUENCE_DIMS,
    BalancedLayout,
    gather_sequence,
    sequence_dim,
    shard_ranges,
    shard_sequence,
)
from .transport import PeerError, communication_device

__all__ = [
    "LAYOUTS",
    "METHODS",
    "SEQUENCE_DIMS",
    "BalancedLayout",
    "ContextParallel",
    "PeerError",
    "communication_device",
    "context_parallel_attention",
    "gather_sequence",
    "sequence_dim",
    "set_context_parallel",
    "shard_ranges",
    "shard_sequence",
]
