"""Masks from data: ``Document`` (packed sequences) and ``KeyPadding`` (padded batches)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Grid, Pattern, _offset, check_align, query_positions
from .blockmap import EMPTY, FULL, PARTIAL

__all__ = ["Document", "KeyPadding"]


def _as_lengths(owner: str, lengths, minimum: int) -> tuple[int, ...]:
    raw = lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths
    try:
        values = list(raw)
    except TypeError:
        raise TypeError(
            f"{owner}: expected lengths to be a sequence of ints, but got lengths={lengths!r}."
        ) from None
    if not values:
        raise ValueError(f"{owner}: expected at least one length, but got lengths={values!r}.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(
                f"{owner}: expected every length to be an int >= {minimum}, but got {v!r} "
                f"in lengths={values!r}."
            )
    return tuple(values)


@dataclass(frozen=True, repr=False)
class Document(Pattern):
    """Packed sequences: positions see each other only inside the same segment.

    ``lengths`` cut the key axis into consecutive segments and must sum to ``S`` (which is
    ``N`` in self-attention). A query at position ``p`` (see :class:`Causal`) sees the keys of
    its own segment; compose with :class:`Causal` for packed causal training.

    Picture, ``Document((2, 3, 1))`` with N=6, S=6::

        ██····
        ██····
        ··███·
        ··███·
        ··███·
        ·····█
    """

    lengths: tuple[int, ...]
    align: str = field(default="bottom_right", kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", _as_lengths("Document", self.lengths, 1))
        check_align("Document", self.align)

    def check(self, n: int, s: int) -> None:
        total = sum(self.lengths)
        if total != s:
            raise ValueError(
                f"Document: expected sum(lengths) == S (the key length; N in self-attention), "
                f"but got sum(lengths)={total} for N={n}, S={s}."
            )

    def _segment(self, pos: torch.Tensor) -> torch.Tensor:
        """Segment id of each key-axis position; -1 outside ``[0, S)``."""
        ends = torch.tensor(self.lengths, device=pos.device).cumsum(0)
        seg = torch.searchsorted(ends, pos.contiguous(), right=True)
        return torch.where((pos < 0) | (pos >= ends[-1]), -1, seg)

    def mask_mod(self, q_idx, kv_idx, n, s, b=None):
        seg_q = self._segment(query_positions(q_idx, self.align, n, s))
        return (seg_q == self._segment(kv_idx)) & (seg_q >= 0)

    def _block_states(self, grid: Grid):
        off = _offset(self.align, grid.n, grid.s)
        q0, q1 = grid.q_bounds()
        p0, p1 = q0 + off, q1 + off
        k0, k1 = grid.k_bounds()
        invalid = (p0 < 0) | (p1 > grid.s - 1)
        none_valid = (p1 < 0) | (p0 > grid.s - 1)
        a = self._segment(p0.clamp(0, grid.s - 1))[:, None]
        z = self._segment(p1.clamp(0, grid.s - 1))[:, None]
        ka, kz = self._segment(k0)[None, :], self._segment(k1)[None, :]
        states = torch.full((grid.nqb, grid.nkb), PARTIAL, dtype=torch.int8)
        states[(z < ka) | (kz < a) | none_valid[:, None]] = EMPTY
        states[(a == z) & (ka == kz) & (a == ka) & ~invalid[:, None]] = FULL
        return states, None


@dataclass(frozen=True, repr=False)
class KeyPadding(Pattern):
    """Padded batches: in batch item ``b``, keys ``j >= lengths[b]`` are hidden.

    The only per-batch pattern: :meth:`to_dense` gives ``(B, 1, N, S)``. A length of 0 hides
    every key, and those rows produce zeros.

    Picture, ``KeyPadding((4,))`` with N=3, S=6::

        ████··
        ████··
        ████··
    """

    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", _as_lengths("KeyPadding", self.lengths, 0))

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def check(self, n: int, s: int) -> None:
        if max(self.lengths) > s:
            raise ValueError(
                f"KeyPadding: expected every length <= S={s}, but got max(lengths)={max(self.lengths)}."
            )

    def mask_mod(self, q_idx, kv_idx, n, s, b=None):
        if b is None:
            raise ValueError("KeyPadding.mask_mod: expected batch indices b, but got None.")
        lengths = torch.tensor(self.lengths, device=kv_idx.device)
        return kv_idx < lengths[b]

    def _block_states(self, grid: Grid):
        k0, k1 = grid.k_bounds()
        lengths = torch.tensor(self.lengths)[:, None]  # (B, 1)
        states = torch.full((len(self.lengths), grid.nkb), PARTIAL, dtype=torch.int8)
        states[k0[None, :] >= lengths] = EMPTY
        states[k1[None, :] < lengths] = FULL
        return states[:, None, :].expand(-1, grid.nqb, -1), None
