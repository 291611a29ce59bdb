"""``PerHead``: a different pattern for each attention head.

Heads of one layer do different jobs -- some look at their neighbours, some at the first tokens,
some everywhere (Fu et al. 2024, MoA; Xiao et al. 2024, DuoAttention) -- so the cheapest pattern
that keeps a model's quality is chosen per head. ``PerHead([p_0, ..., p_{H-1}])`` says head ``h``
uses ``p_h``. :func:`attnkit.attention` runs each distinct pattern on the heads that use it
(heads sharing a pattern share one plan, so the cost is the sum of what each group needs), on
any backend, and keeps GQA: a pattern's heads run in as many calls as there are distinct counts
of them per key/value head, each call sharing its key/value heads without copies.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .base import Grid, Or, Pattern

__all__ = ["PerHead"]


class PerHead(Pattern):
    """Head ``h`` sees what ``patterns[h]`` allows.

    Args:
        patterns: One pattern per query head (at least one). Per-batch patterns must agree on
            the batch size.

    Combining with ``&`` and ``|`` applies to every head: ``PerHead([a, b]) & Causal()`` is
    ``PerHead([a & Causal(), b & Causal()])``.

    Head-agnostic views (``mask_mod``, ``block_map``) describe the *union* of the heads: what a
    kernel running all heads together would have to visit. :meth:`to_dense` has a head
    dimension, ``(1, H, N, S)`` (``(B, H, N, S)`` for per-batch parts), and ``num_allowed`` sums
    over heads.

    Example::

        PerHead([SlidingWindow(64)] * 6 + [SlidingWindow(64) | Global(range(4))] * 2)
    """

    per_head = True

    def __init__(self, patterns: Iterable[Pattern]) -> None:
        heads = tuple(patterns) if not isinstance(patterns, Pattern) else None
        if heads is None:
            raise TypeError("PerHead: expected a sequence of patterns (one per head), but got one Pattern.")
        if not heads:
            raise ValueError("PerHead: expected at least one pattern (one per head), but got none.")
        for h, p in enumerate(heads):
            if not isinstance(p, Pattern):
                raise TypeError(
                    f"PerHead: expected patterns[{h}] to be a Pattern, but got {type(p).__name__}."
                )
            if getattr(p, "per_head", False):
                raise TypeError(
                    f"PerHead: patterns[{h}] is itself a PerHead; nest the per-head patterns flat."
                )
        sizes = {p.batch_size for p in heads} - {None}
        if len(sizes) > 1:
            raise ValueError(f"PerHead: per-batch patterns disagree on the batch size: {sorted(sizes)}.")
        object.__setattr__(self, "heads", heads)
        distinct = tuple(dict.fromkeys(heads))
        object.__setattr__(self, "_union", distinct[0] if len(distinct) == 1 else Or(*distinct))

    heads: tuple[Pattern, ...]

    def __setattr__(self, key, value):
        raise AttributeError("PerHead is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PerHead) and self.heads == other.heads

    def __hash__(self) -> int:
        return hash(("PerHead", self.heads))

    def __repr__(self) -> str:
        runs, last, count = [], None, 0
        for p in (*self.heads, None):
            if p == last and p is not None:
                count += 1
                continue
            if last is not None:
                runs.append(f"[{last!r}]" if count == 1 else f"[{last!r}] * {count}")
            last, count = p, 1
        return f"PerHead({' + '.join(runs)})"  # runs of equal heads; parse_pattern reads it back

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def groups(self) -> list[tuple[Pattern, tuple[int, ...]]]:
        """Each distinct pattern with the heads that use it, in order of first use."""
        out: dict[Pattern, list[int]] = {}
        for h, p in enumerate(self.heads):
            out.setdefault(p, []).append(h)
        return [(p, tuple(hs)) for p, hs in out.items()]

    # --------------------------------------------------------------- Pattern interface
    @property
    def batch_size(self) -> int | None:
        return self._union.batch_size

    def check(self, n: int, s: int) -> None:
        for p, _ in self.groups():
            p.check(n, s)

    def mask_mod(self, q_idx: Tensor, kv_idx: Tensor, n: int, s: int, b: Tensor | None = None) -> Tensor:
        return self._union.mask_mod(q_idx, kv_idx, n, s, b)

    def _block_states(self, grid: Grid) -> tuple[Tensor, Tensor | None]:
        return self._union._block_states(grid)

    def to_dense(self, n: int, s: int | None = None, device: torch.device | str | None = None) -> Tensor:
        """``(1, H, N, S)`` bool, or ``(B, H, N, S)`` when parts are per-batch."""
        s = n if s is None else s
        dense = {p: p.to_dense(n, s, device=device) for p, _ in self.groups()}
        B = self.batch_size or 1
        return torch.stack([dense[p].reshape(-1, n, s).expand(B, n, s) for p in self.heads], dim=1)

    def num_allowed(self, n: int, s: int | None = None) -> int:
        """Allowed (query, key) pairs summed over heads (and batch items for per-batch parts)."""
        counts = {p: p.num_allowed(n, s) for p, _ in self.groups()}
        return sum(counts[p] for p in self.heads)

    def density(self, n: int, s: int | None = None) -> float:
        """Fraction of the ``H x N x S`` pairs that are allowed (averaged over heads)."""
        s = n if s is None else s
        return self.num_allowed(n, s) / (self.num_heads * n * s * (self.batch_size or 1))

    def to_string(self, n: int, s: int | None = None, block: int | None = None, width: int = 64) -> str:
        """One picture per distinct pattern, headed by the heads that use it."""
        s = n if s is None else s
        density = 100 * self.density(n, s)
        lines = [f"PerHead: {self.num_heads} heads, {len(self.groups())} patterns, density={density:.2f}%"]
        for p, heads in self.groups():
            lines += ["", f"heads {', '.join(map(str, heads))}:", p.to_string(n, s, block, width)]
        return "\n".join(lines)

    def __and__(self, other: Pattern) -> Pattern:
        return self._apply(other, lambda p, o: p & o)

    def __rand__(self, other: Pattern) -> Pattern:
        return self._apply(other, lambda p, o: o & p)

    def __or__(self, other: Pattern) -> Pattern:
        return self._apply(other, lambda p, o: p | o)

    def __ror__(self, other: Pattern) -> Pattern:
        return self._apply(other, lambda p, o: o | p)

    def _apply(self, other, op) -> Pattern:
        if not isinstance(other, Pattern):
            return NotImplemented
        if isinstance(other, PerHead):
            if other.num_heads != self.num_heads:
                raise ValueError(
                    f"PerHead: expected both sides to have the same number of heads, but got "
                    f"{self.num_heads} and {other.num_heads}."
                )
            return PerHead(op(p, o) for p, o in zip(self.heads, other.heads, strict=True))
        return PerHead(op(p, other) for p in self.heads)
