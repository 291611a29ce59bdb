"""What every backend receives (:class:`AttentionInputs`) and declares (:class:`Backend`).

Shape legend (used throughout attnkit)::

    B  batch            H   query heads        Hkv  key/value heads (G = H // Hkv)
    N  query length     S   key/value length   D    head dim (q, k)    Dv  value head dim
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..patterns import Pattern

__all__ = ["AttentionInputs", "AttentionResult", "Backend"]

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """Validated arguments of :func:`attnkit.attention`.

    Attributes:
        q: ``(B, H, N, D)``.
        k: ``(B, Hkv, S, D)``.
        v: ``(B, Hkv, S, Dv)``.
        pattern: Optional :class:`~attnkit.patterns.Pattern`.
        mask: Optional bool tensor, 4-D and broadcastable to ``(B, H, N, S)``.
        bias: Optional float tensor, 4-D and broadcastable to ``(B, H, N, S)``.
        scale: Multiplier of ``q @ k^T``.
        dropout_p: Probability of dropping an attention weight.
        dropout_seed: Seed of the counter-based dropout (``None`` when ``dropout_p == 0``).
        return_weights: The caller wants the ``(B, H, N, S)`` weights.
        return_lse: The caller wants the ``(B, H, N)`` log-sum-exp.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    pattern: Pattern | None
    mask: Tensor | None
    bias: Tensor | None
    scale: float
    dropout_p: float
    dropout_seed: int | None
    return_weights: bool
    return_lse: bool

    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def H(self) -> int:
        return self.q.shape[1]

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def G(self) -> int:
        return self.H // self.Hkv

    @property
    def N(self) -> int:
        return self.q.shape[2]

    @property
    def S(self) -> int:
        return self.k.shape[2]

    @property
    def D(self) -> int:
        return self.q.shape[3]

    @property
    def Dv(self) -> int:
        return self.v.shape[3]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def requires_grad(self) -> bool:
        tensors = (self.q, self.k, self.v, self.bias)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    def describe(self) -> str:
        """One line per input, for error messages."""
        lines = [
            f"  q: {tuple(self.q.shape)} {self.q.dtype} on {self.q.device}",
            f"  k: {tuple(self.k.shape)}   v: {tuple(self.v.shape)}",
            f"  pattern: {self.pattern!r}",
        ]
        if self.mask is not None:
            lines.append(f"  mask: bool {tuple(self.mask.shape)}")
        if self.bias is not None:
            lines.append(f"  bias: {self.bias.dtype} {tuple(self.bias.shape)}")
        extras = [f"scale={self.scale:.4g}", f"dropout_p={self.dropout_p}"]
        if self.return_weights:
            extras.append("return_weights=True")
        if self.return_lse:
            extras.append("return_lse=True")
        lines.append("  " + ", ".join(extras))
        return "\n".join(lines)


@dataclass(frozen=True)
class AttentionResult:
    """What a backend returns: ``out (B, H, N, Dv)``, and optionally weights and lse."""

    out: Tensor
    weights: Tensor | None = None
    lse: Tensor | None = None


class Backend:
    """A way of computing attention that says what it can run.

    Subclasses set the class attributes and implement :meth:`forward`; they extend
    :meth:`unsupported_reasons` for conditions beyond the declared capabilities. Register
    with :func:`attnkit.backends.register_backend`.
    """

    name: ClassVar[str]
    devices: ClassVar[frozenset[str] | None] = None  # None: any device
    dtypes: ClassVar[frozenset[torch.dtype]] = FLOAT_DTYPES
    supports_dropout: ClassVar[bool] = False
    supports_weights: ClassVar[bool] = False
    supports_lse: ClassVar[bool] = False
    #: Computes a piece of a larger softmax (:meth:`partial_forward`/:meth:`partial_backward`),
    #: as the context-parallel ring needs.
    supports_partial: ClassVar[bool] = False

    @classmethod
    def unsupported_reasons(cls, inp: AttentionInputs) -> list[str]:
        """Why this backend cannot run ``inp`` (empty when it can)."""
        reasons = []
        if cls.devices is not None and inp.device.type not in cls.devices:
            reasons.append(f"device={inp.device.type} (supported: {sorted(cls.devices)})")
        if inp.dtype not in cls.dtypes:
            names = sorted(str(d).replace("torch.", "") for d in cls.dtypes)
            reasons.append(f"dtype={str(inp.dtype).replace('torch.', '')} (supported: {names})")
        if inp.dropout_p > 0 and not cls.supports_dropout:
            reasons.append(f"dropout_p={inp.dropout_p} > 0 is not supported")
        if inp.return_weights and not cls.supports_weights:
            reasons.append("return_weights=True is not supported")
        if inp.return_lse and not cls.supports_lse:
            reasons.append("return_lse=True is not supported")
        return reasons

    @classmethod
    def auto_reasons(cls, inp: AttentionInputs) -> list[str]:
        """Why ``backend="auto"`` should not pick this backend although it could run ``inp``
        (another backend is faster there). Forcing the backend by name ignores these."""
        return []

    @classmethod
    def forward(cls, inp: AttentionInputs) -> AttentionResult:
        raise NotImplementedError

    @classmethod
    def partial_reasons(cls, inp: AttentionInputs) -> list[str]:
        """Why this backend should not compute ``inp`` as a piece of a larger softmax (empty
        when it should)."""
        if not cls.supports_partial:
            return ["computes no pieces of a larger softmax"]
        return cls.unsupported_reasons(inp)

    @classmethod
    def partial_forward(cls, inp: AttentionInputs) -> tuple[Tensor, Tensor]:
        """``(out (B, H, N, Dv), lse (B, H, N))`` of ``inp`` in the compute dtype, without an
        autograd graph: one piece of a larger softmax, merged with the others through the
        log-sum-exps (``_rows.combine``). No dropout; a float bias gets no gradient."""
        raise NotImplementedError

    @classmethod
    def partial_backward(
        cls,
        inp: AttentionInputs,
        out: Tensor,
        lse: Tensor,
        dout: Tensor,
        dlse: Tensor | None = None,
        *,
        into: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(dq, dk, dv)`` (compute dtype) of this piece when ``out``/``lse`` are the *merged*
        output and log-sum-exp of the whole softmax it belongs to and ``dout``/``dlse`` (or None)
        their gradients: probabilities are recomputed against the whole row's normalizer, so the
        pieces' gradients add up to the whole's (as in ring attention).

        ``into``: compute-dtype tensors shaped like ``q``, ``k``, ``v`` that the gradients are
        added to (and returned); where :meth:`partial_in_place` says so, without temporaries
        the size of the piece."""
        raise NotImplementedError

    @classmethod
    def partial_in_place(cls, inp: AttentionInputs) -> bool:
        """Whether :meth:`partial_backward` with ``into`` adds the gradients of ``inp`` without
        piece-sized temporaries (so a caller bounding its memory need not cut the piece)."""
        return False


def add_into(into: tuple[Tensor, Tensor, Tensor] | None, grads: tuple[Tensor, Tensor, Tensor]):
    """``grads``, or, with ``into``, ``into`` after adding ``grads`` to it."""
    if into is None:
        return grads
    for acc, g in zip(into, grads, strict=True):
        acc.add_(g)
    return into


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a returned log-sum-exp: float32, or float64 for float64 inputs."""
    return compute_dtype(dtype)
