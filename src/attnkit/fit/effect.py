"""Fitting by the effect on the model's output: a density budget spent where the loss needs it.

Attention mass kept is a proxy: a layer whose heads lose 10% of their mass may change the model's
predictions a lot or not at all. :func:`sensitivity` measures, per layer, how much the model's
loss rises when that layer alone runs a sparse probe pattern (the rest dense), on the caller's
texts; :func:`allocate` then spends a density budget across layers and heads, choosing per head
the candidate that minimizes its predicted loss rise (the layer's sensitivity times a power of
the mass the candidate drops) plus a price per unit of density, the price set so that the whole
model meets the budget (a Lagrangian allocation: MoA, Fu et al. 2024, searches a similar space
per head with the loss in the loop). How the two measurements combine is itself chosen with the
loss in the loop: :func:`choose_allocation` runs the model under each weighting and keeps the
best. The mass-based :func:`~attnkit.fit.fit_patterns` stays the fast first guess.

    cov = fit.coverage(model, batches, candidates)
    sens = fit.sensitivity(model, batches, probe, loss=lm_loss)    # (L,) loss rise per layer
    best = fit.choose_allocation(model, batches, cov, sens, budget=0.15, loss=lm_loss, probe=probe)
    model.set_patterns(best.patterns)                              # [PerHead, ...]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..patterns import Full, Pattern, PerHead
from .choose import within_layer
from .measure import Coverage

__all__ = ["Allocation", "Weighting", "allocate", "choose_allocation", "sensitivity"]


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
        _set_patterns(model, own)
    return torch.tensor(rises, dtype=torch.float64)


def _set_patterns(model: nn.Module, patterns: Sequence[Pattern | None]) -> None:
    """``model.set_patterns`` with None (a layer without a pattern, e.g. an encoder's) as
    :class:`~attnkit.patterns.Full`, and None for the model when no layer has one."""
    patterns = list(patterns)
    if all(p is None for p in patterns):
        model.set_patterns(None)
    else:
        model.set_patterns([Full() if p is None else p for p in patterns])


def _total(model: nn.Module, batches: list, patterns: list, loss) -> float:
    _set_patterns(model, patterns)
    with torch.no_grad():
        return float(sum(loss(model, b) for b in batches))


def allocate(
    cov: Coverage,
    sens: Tensor,
    budget: float,
    *,
    strength: float = 1.0,
    exponent: float = 1.0,
    probe: Pattern | None = None,
    floor: float = 1e-6,
) -> list[PerHead]:
    """One candidate per head, per layer, spending at most ``budget`` of density in all.

    Each head ``(l, h)`` takes the candidate ``c`` minimizing its predicted loss rise plus a
    price per unit of density, ``sens[l] ** strength * lost[l, h, c] ** exponent + price *
    density[l, h, c]``, where ``lost = 1 - mass`` is the attention mass the candidate drops;
    ``price`` is the smallest whose choices meet ``budget`` (their mean density over layers and
    heads), found by bisection.

    ``strength`` says how far to trust the per-layer sensitivities: 1 spends by them as
    measured, 0 weighs every layer alike (heads still differ by the mass they keep). One
    layer's loss rise is measured with the others dense; when many layers are cut at once their
    effects compound, so a smaller strength can do better at small budgets. ``exponent`` shapes
    the loss against the mass dropped: 1 linear; 2 as a second-order expansion predicts near a
    trained optimum, where the first-order term averages out over many tokens and the loss grows
    with the square of the change to the attention output, so large drops weigh more than many
    small ones. With ``probe``, the pattern the sensitivity was measured with (one of the
    candidates), each head's drop is counted in units of what the probe drops for that head:
    ``sens[l]`` is then what the layer's heads cost at the probe, as measured, and every other
    candidate is priced relative to it. :func:`choose_allocation` picks these on the caller's
    texts.

    Args:
        cov: Coverage of the candidates (densities in the square, as :func:`coverage` gives).
        sens: ``(L,)`` loss rise per layer (:func:`sensitivity`); values below ``floor`` count
            as ``floor``, so a layer that seemed not to care still keeps what is cheap to keep.
        budget: Mean density over every head of every layer.
        strength: Exponent of the per-layer sensitivities (>= 0).
        exponent: Exponent of the mass dropped (> 0).
        probe: The candidate ``sens`` was measured with, to calibrate each head against.

    Returns:
        A :class:`~attnkit.patterns.PerHead` per layer, each candidate within the layer's own
        pattern.

    Raises:
        ValueError: A budget below the sparsest choice, a sensitivity per layer that does not
            match the coverage, a negative strength or exponent, or a probe that is not a
            candidate.
    """
    w = Weighting(strength, exponent, calibrated=probe is not None)
    return _patterns_of(cov, _choice(cov, sens, budget, w, probe, floor))


def _patterns_of(cov: Coverage, choice: Tensor) -> list[PerHead]:
    """A :class:`~attnkit.patterns.PerHead` per layer from ``(L, H)`` candidate indices, each
    candidate within the layer's own pattern."""
    return [
        PerHead(within_layer(cov.candidates[c], own, h) for h, c in enumerate(row))
        for row, own in zip(choice.tolist(), cov.own, strict=True)
    ]


def _choice(
    cov: Coverage, sens: Tensor, budget: float, w: Weighting, probe: Pattern | None, floor: float = 1e-6
) -> Tensor:
    """``(L, H)``: the index of each head's candidate, as :func:`allocate` chooses it."""
    L = cov.mass.shape[0]
    if tuple(sens.shape) != (L,):
        raise ValueError(f"allocate(): expected sens of shape (L,)=({L},), but got {tuple(sens.shape)}.")
    strength, exponent = w.strength, w.exponent
    if not strength >= 0 or not exponent > 0:
        raise ValueError(
            f"allocate(): expected strength >= 0 and exponent > 0, but got strength={strength!r}, "
            f"exponent={exponent!r}."
        )
    lost = (1.0 - cov.mass.double()).clamp(min=0.0)  # (L, H, C)
    if w.calibrated:
        if probe not in cov.candidates:
            raise ValueError(
                f"allocate(): expected probe to be one of the coverage's candidates, but got {probe!r}."
            )
        at_probe = lost[..., cov.candidates.index(probe)]
        # a head the probe costs nothing keeps its raw drop (the probe says nothing about it)
        lost = torch.where(at_probe[..., None] > floor, lost / at_probe.clamp(min=floor)[..., None], lost)
    weight = sens.double().clamp(min=floor)
    weight = (weight / weight.max()) ** strength
    cost = weight[:, None, None] * lost**exponent
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
    return choose(hi)


@dataclass(frozen=True)
class Weighting:
    """How :func:`allocate` weighs the loss: its ``strength``, ``exponent`` and whether each
    head is calibrated against the sensitivity's probe."""

    strength: float = 1.0
    exponent: float = 1.0
    calibrated: bool = False

    def __str__(self) -> str:
        return f"strength {self.strength:g}, exponent {self.exponent:g}" + (
            ", calibrated to the probe" if self.calibrated else ""
        )


@dataclass
class Allocation:
    """What :func:`choose_allocation` found: the best ``patterns`` on the caller's texts (and
    ``choice``, ``(L, H)`` candidate indices), its ``weighting``, and the summed loss of every
    weighting tried (``losses``)."""

    patterns: list[PerHead]
    choice: Tensor
    weighting: Weighting
    losses: dict[Weighting, float]


def choose_allocation(
    model: nn.Module,
    batches: Iterable,
    cov: Coverage,
    sens: Tensor,
    budget: float,
    *,
    loss: Callable[[nn.Module, object], float],
    probe: Pattern | None = None,
    strengths: Sequence[float] = (0.0, 0.5, 1.0),
    exponents: Sequence[float] = (1.0, 2.0, 3.0),
    own: Sequence[Pattern | None] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Allocation:
    """:func:`allocate` under every weighting (each of ``strengths`` x ``exponents``, each raw
    and, with ``probe``, calibrated to it), the model run with each allocation and its ``loss``
    summed over ``batches``: the loss in the loop decides how the measured sensitivities and
    masses are combined. Allocations that come out identical are run once. The model is left
    with its own patterns (``own``, default: those it runs now).

    Measured on SmolLM2-135M (``bench/fit_llm.py``), the best weighting depends on the budget:
    linear and as measured at a generous budget, calibrated and steeper at a small one.
    """
    from ..models.loading import self_attention_patterns

    batches = list(batches)
    if not batches:
        raise ValueError("choose_allocation(): expected at least one batch, but got none.")
    own = list(self_attention_patterns(model) if own is None else own)
    weightings = [
        Weighting(float(a), float(p), c)
        for c in ((False, True) if probe is not None else (False,))
        for p in exponents
        for a in strengths
    ]
    seen: dict[tuple, float] = {}
    tried: dict[Weighting, tuple[float, Tensor]] = {}
    try:
        for w in progress(weightings) if progress else weightings:
            choice = _choice(cov, sens, budget, w, probe)
            key = tuple(choice.flatten().tolist())
            if key not in seen:
                seen[key] = _total(model, batches, _patterns_of(cov, choice), loss)
            tried[w] = (seen[key], choice)
    finally:
        _set_patterns(model, own)
    best = min(tried, key=lambda w: tried[w][0])
    choice = tried[best][1]
    return Allocation(_patterns_of(cov, choice), choice, best, {w: t[0] for w, t in tried.items()})
