"""Attention backends: each declares what it supports; :func:`select` picks one or explains why not.

===============  ==============================================  ==============================
backend          what                                            auto picks it for
===============  ==============================================  ==============================
``varlen``       torch's ``varlen_attn`` (FlashAttention, CUDA)  windows, documents (CUDA)
``triton``       attnkit's block-sparse Triton kernels (CUDA)    other patterns (CUDA)
``flex``         compiled FlexAttention on the block map         patterns ``triton`` declines
``blocksparse``  tiles of the block map on torch's CPU kernel    sparse patterns (CPU)
``eager``        materialized, in torch ops (autograd)          short-sequence training (CPU)
``sdpa``         torch's fused ``scaled_dot_product_attention``  dense, causal, padding, masks
``tiled``        FlashAttention in eager torch, ``O(N)`` memory  what others decline
``reference``    materialized float64 oracle, returns weights    ``return_weights``
===============  ==============================================  ==============================

The table is also the order ``backend="auto"`` tries them in: the first that can run the inputs
and has no reason to step aside (``auto_reasons``: another backend is faster there) runs.

``register_backend`` adds a backend (a :class:`Backend` subclass) to the registry and, with
``priority``, to the automatic choice.
"""

from __future__ import annotations

from .. import caches
from .base import AttentionInputs, AttentionResult, Backend
from .blocksparse import BlockSparseBackend
from .eager import EagerBackend
from .flex import FlexBackend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend
from .tiled import TiledBackend
from .triton import TritonBackend
from .varlen import VarlenBackend

__all__ = [
    "AttentionInputs",
    "AttentionResult",
    "Backend",
    "available",
    "get",
    "register_backend",
    "select",
    "select_partial",
]

_REGISTRY: dict[str, type[Backend]] = {}
# The order ``backend="auto"`` tries; the first backend with no reasons to decline runs.
_PRIORITY: list[str] = []
# auto's decisions, per signature of the inputs (see ``_signature``): in decoding the same
# shapes recur every step and every layer, and deciding (block maps, cost models) can cost
# more than the attention itself. Registering a backend clears it.
_DECISIONS = caches.register("dispatch", caches.MiB, size=lambda _: 256)


def register_backend(cls: type[Backend], *, priority: int | None = None) -> type[Backend]:
    """Add ``cls`` to the registry under ``cls.name``.

    Args:
        cls: A :class:`Backend` subclass.
        priority: Position in the automatic order (0 = tried first); ``None`` appends it
            before ``reference``, which always stays last.

    Returns:
        ``cls``, so this works as a class decorator.
    """
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"register_backend: expected a Backend subclass, but got {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_backend: {cls.__name__} needs a non-empty str `name`.")
    _REGISTRY[name] = cls
    if name in _PRIORITY:
        _PRIORITY.remove(name)
    if name == "reference":
        _PRIORITY.append(name)
    else:
        last = len(_PRIORITY) - (1 if "reference" in _PRIORITY else 0)
        _PRIORITY.insert(last if priority is None else min(priority, last), name)
    _DECISIONS.clear()
    return cls


def available() -> list[str]:
    """Names of the registered backends, in the order ``backend="auto"`` tries them."""
    return list(_PRIORITY)


def get(name: str) -> type[Backend]:
    """The backend registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"attention(): expected backend to be 'auto' or one of {available()}, but got backend={name!r}."
        ) from None


def select(inp: AttentionInputs, backend: str = "auto") -> type[Backend]:
    """The backend that will run ``inp``.

    Raises:
        ValueError: ``backend`` is not a registered name.
        NotImplementedError: No backend (or not the forced one) can run ``inp``; the message
            lists every backend's reasons.
    """
    if not isinstance(backend, str):
        raise TypeError(f"attention(): expected backend to be a str, but got {backend!r}.")
    if backend != "auto":
        chosen = get(backend)
        if not chosen.unsupported_reasons(inp):
            return chosen
    else:
        chosen = _DECISIONS.get(_signature(inp), lambda: _choose(inp))
        if chosen is not None:
            return chosen
    report = "\n".join(
        f"  {name}: " + ("; ".join(_REGISTRY[name].unsupported_reasons(inp)) or "can run these inputs")
        for name in _PRIORITY
    )
    what = "no backend can" if backend == "auto" else f"backend {backend!r} cannot"
    raise NotImplementedError(f"attention(): {what} run these inputs:\n{inp.describe()}\nBackends:\n{report}")


def select_partial(inp: AttentionInputs) -> type[Backend]:
    """The backend that computes ``inp`` as a piece of a larger softmax (the context-parallel
    ring's pairs): the first in the automatic order with no :meth:`~Backend.partial_reasons`.
    ``blocksparse`` runs every piece, so there always is one."""
    for name in _PRIORITY:
        cls = _REGISTRY[name]
        if not cls.partial_reasons(inp):
            return cls
    return _REGISTRY["blocksparse"]


def _choose(inp: AttentionInputs) -> type[Backend] | None:
    for name in _PRIORITY:
        cls = _REGISTRY[name]
        if not cls.unsupported_reasons(inp) and not cls.auto_reasons(inp):
            return cls
    return None


def _signature(inp: AttentionInputs) -> tuple:
    """Everything a backend's ``unsupported_reasons``/``auto_reasons`` may look at, as a key.

    Tensors enter by shape, dtype, device and gradient flags, never by value, so a decision is
    shared by every call with the same shapes. An unhashable pattern makes the key unhashable:
    such calls are decided afresh.
    """

    def tensor(t):
        return None if t is None else (tuple(t.shape), t.dtype, t.requires_grad)

    return (
        inp.pattern,
        tuple(inp.q.shape),
        tuple(inp.k.shape),
        tuple(inp.v.shape),
        inp.dtype,
        str(inp.device),
        tensor(inp.mask),
        tensor(inp.bias),
        inp.dropout_p > 0,
        inp.return_weights,
        inp.return_lse,
        inp.requires_grad,
    )


register_backend(ReferenceBackend)
register_backend(EagerBackend)
register_backend(SdpaBackend)
register_backend(TiledBackend)
register_backend(BlockSparseBackend, priority=0)
register_backend(FlexBackend, priority=0)
register_backend(TritonBackend, priority=0)
register_backend(VarlenBackend, priority=0)
