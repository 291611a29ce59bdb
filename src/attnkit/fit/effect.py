"""Fitting by the effect on the model's output: a density budget spent where the loss needs it.

Attention mass kept is a proxy: a layer whose heads lose 10% of their mass may change the model's
predictions a lot or not at all. :func:`sensitivity` measures, per layer, how much the model's
loss rises when that layer alone runs a sparse probe pattern (the rest dense), on the caller's
texts; :func:`allocate` then spends a density budget across layers and heads, choosing per head
the candidate that minimizes ``sensitivity[layer] * mass lost`` plus a price per unit of density,
the price set so that the whole model meets the budget (a Lagrangian allocation: MoA, Fu et al.
2024, searches a similar space per head with the loss in the loop). The mass-based
:func:`~attnkit.fit.fit_patterns` stays the fast first guess.

    cov = fit.coverage(model, batches, candidates)
    sens = fit.sensitivity(model, batches, probe, loss=lm_loss)    # (L,) loss rise per layer
    layers = fit.allocate(cov, sens, budget=0.15)                  # [PerHead, ...]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..patterns import Pattern, PerHead
from .choose import within_layer
from .measure import Coverage

__all__ = ["allocate", "choose_strength", "sensitivity"]


def sensitivity(
    model: nn.Module,
    batches: Iterable,
    probe: Pattern,
    *,
    loss: Callable[[nn.Module, object], float],
    own: Sequence[Pattern | None] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Tensor:
    """``(L,)``: how much ``loss`` rises when layer ``l`` alone runs ``probe`` (within its own
    pattern), summed over ``batches``, against the model with every layer as it is.

    Args:
        model: A model with ``set_patterns(list_per_layer)`` (BertEncoder, DecoderLM, Gemma3LM).
        batches: Inputs, one per ``loss`` call.
        probe: A sparse pattern (e.g. a small window with the first tokens).
        loss: ``loss(model, batch) -> float``; e.g. the summed next-token cross-entropy.
        own: Each layer's own pattern (default: the patterns the model runs now).
        progress: Wraps the loop over layers (a progress bar).
    """
    from ..models.loading import self_attention_patterns

    batches = list(batches)
    if not batches:
        raise ValueError("sensitivity(): expected at least one batch, but got none.")
    own = list(self_attention_patterns(model) if own is None else own)
    base = _total(model, batches, own, loss)
    layers = range(len(own))
    rises = []
    try:
        for layer in progress(layers) if progress else layers:
            patterns = list(own)
            patterns[layer] = within_layer(probe, own[layer])
            rises.append(_total(model, batches, patterns, loss) - base)
    finally:
        model.set_patterns(own)
    return torch.tensor(rises, dtype=torch.float64)


def _total(model: nn.Module, batches: list, patterns: list, loss) -> float:
    model.set_patterns(patterns)
    with torch.no_grad():
        return float(sum(loss(model, b) for b in batches))


def allocate(
    cov: Coverage, sens: Tensor, budget: float, *, strength: float = 1.0, floor: float = 1e-6
) -> list[PerHead]:
    """One candidate per head, per layer, spending at most ``budget`` of density in all.

    Each head ``(l, h)`` takes the candidate ``c`` minimizing
    ``sens[l] ** strength * (1 - mass[l, h, c]) + price * density[l, h, c]``; ``price`` is the
    smallest whose choices meet ``budget`` (their mean density over layers and heads), found by
    bisection. ``strength`` says how far to trust the per-layer sensitivities: 1 spends by them
    as measured, 0 weighs every layer alike (heads still differ by the mass they keep). One
    layer's loss rise is measured with the others dense; when many layers are cut at once their
    effects compound, so a smaller strength can do better at small budgets
    (:func:`choose_strength` picks it on the caller's texts).

    Args:
        cov: Coverage of the candidates (densities in the square, as :func:`coverage` gives).
        sens: ``(L,)`` loss rise per layer (:func:`sensitivity`); values below ``floor`` count
            as ``floor``, so a layer that seemed not to care still keeps what is cheap to keep.
        budget: Mean density over every head of every layer.

    Returns:
        A :class:`~attnkit.patterns.PerHead` per layer, each candidate within the layer's own
        pattern.

    Raises:
        ValueError: A budget below the sparsest choice, or a sensitivity per layer that does not
            match the coverage.
    """
    L = cov.mass.shape[0]
    if tuple(sens.shape) != (L,):
        raise ValueError(f"allocate(): expected sens of shape (L,)=({L},), but got {tuple(sens.shape)}.")
    lost = (1.0 - cov.mass.double()).clamp(min=0.0)  # (L, H, C)
    weight = sens.double().clamp(min=floor)
    weight = (weight / weight.max()) ** strength
    cost = weight[:, None, None] * lost
    density = cov.density.double()
    sparsest = float(density.min(-1).values.mean())
    if budget < sparsest:
        raise ValueError(
            f"allocate(): no choice meets budget={budget} (the sparsest candidates average {sparsest:.3f})."
        )

    def choose(price: float) -> Tensor:
        return (cost + price * density).argmin(-1)  # (L, H)

    def spent(choice: Tensor) -> float:
        return float(density.gather(-1, choice[..., None]).mean())

    lo, hi = 0.0, 1.0
    while spent(choose(hi)) > budget:  # a price high enough to meet the budget
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(choose(mid)) <= budget else (mid, hi)
    choice = choose(hi)
    return [
        PerHead(within_layer(cov.candidates[c], own, h) for h, c in enumerate(row))
        for row, own in zip(choice.tolist(), cov.own, strict=True)
    ]


def choose_strength(
    model: nn.Module,
    batches: Iterable,
    cov: Coverage,
    sens: Tensor,
    budget: float,
    *,
    loss: Callable[[nn.Module, object], float],
    strengths: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
    own: Sequence[Pattern | None] | None = None,
) -> tuple[list[PerHead], float, dict[float, float]]:
    """:func:`allocate` at each of ``strengths``, each allocation's ``loss`` summed over
    ``batches`` (the model runs it), and the best: ``(patterns, strength, {strength: loss})``.
    The model is left with its own patterns (``own``, default: those it runs now)."""
    from ..models.loading import self_attention_patterns

    batches = list(batches)
    if not batches:
        raise ValueError("choose_strength(): expected at least one batch, but got none.")
    own = list(self_attention_patterns(model) if own is None else own)
    tried: dict[float, tuple[float, list[PerHead]]] = {}
    try:
        for a in strengths:
            layers = allocate(cov, sens, budget, strength=a)
            tried[a] = (_total(model, batches, layers, loss), layers)
    finally:
        model.set_patterns(own)
    best = min(tried, key=lambda a: tried[a][0])
    return tried[best][1], best, {a: t[0] for a, t in tried.items()}
