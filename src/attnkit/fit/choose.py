"""Choosing one pattern per head from measured coverage."""

from __future__ import annotations

import torch
from torch import Tensor

from ..patterns import Full, Pattern, PerHead
from .measure import Coverage

__all__ = ["check_budget", "choose", "fit_patterns", "within_layer"]


def fit_patterns(cov: Coverage, *, keep: float | None = None, budget: float | None = None) -> list[PerHead]:
    """One pattern per head, per layer, from measured coverage.

    Args:
        cov: A :class:`~attnkit.fit.Coverage`.
        keep: Choose, per head, the lowest-density candidate that keeps at least this share of
            the attention mass (the best one where none does); 0.95 when neither is given.
        budget: Instead, choose per head the candidate keeping the most mass among those with
            density at most ``budget`` (the cheapest of those within 1e-4 of the most).

    Returns:
        A :class:`~attnkit.patterns.PerHead` per layer. Each head's candidate is intersected
        with what the layer already allowed (:func:`within_layer`): a causal model's heads stay
        causal, a sliding-window layer keeps its window.

    Raises:
        ValueError: Both or an invalid ``keep``/``budget``; a budget below every candidate's
            density.
    """
    return [
        PerHead(within_layer(cov.candidates[c], own, h) for h, c in enumerate(row))
        for row, own in zip(choose(cov, keep=keep, budget=budget).tolist(), cov.own, strict=True)
    ]


def choose(cov: Coverage, *, keep: float | None = None, budget: float | None = None) -> Tensor:
    """``(L, H)``: the index of each head's candidate, as :func:`fit_patterns` chooses it."""
    if keep is not None and budget is not None:
        raise ValueError("fit_patterns(): pass keep= or budget=, not both.")
    if budget is not None:
        check_budget(budget, cov.density.min().item())
        affordable = cov.density <= budget
        mass = cov.mass.masked_fill(~affordable, -1.0)
        # the most mass; among candidates within 1e-4 of it, the cheapest
        near = (mass >= mass.max(-1, keepdim=True).values - 1e-4) & affordable
        fallback = cov.density.argmin(-1)  # a head with no affordable candidate: the sparsest
        choice = torch.where(
            affordable.any(-1), cov.density.masked_fill(~near, float("inf")).argmin(-1), fallback
        )
    else:
        keep = 0.95 if keep is None else keep
        if not 0 < keep <= 1:
            raise ValueError(f"fit_patterns(): expected 0 < keep <= 1, but got keep={keep!r}.")
        choice = cov.cheapest(keep)
    return choice


def within_layer(candidate: Pattern, own: Pattern | None, head: int = 0) -> Pattern:
    """``candidate`` restricted to what a layer running ``own`` allowed head ``head`` to see."""
    if own is not None and own.per_head:
        own = own.heads[head]
    if own is None or isinstance(own, Full):
        return candidate
    if isinstance(candidate, Full):
        return own
    return candidate & own


def check_budget(budget: float, sparsest: float) -> None:
    """Raise ``ValueError`` unless ``budget`` is a share in (0, 1] that the sparsest candidate
    (density ``sparsest``) fits."""
    if not 0 < budget <= 1:
        raise ValueError(f"fit_patterns(): expected 0 < budget <= 1, but got budget={budget!r}.")
    if sparsest > budget:
        raise ValueError(
            f"fit_patterns(): no candidate has density <= budget={budget} (the sparsest is "
            f"{sparsest:.3f}); raise the budget or add smaller windows."
        )
