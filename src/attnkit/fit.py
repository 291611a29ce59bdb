"""Which sparse pattern each head of a trained model can run with, measured on real inputs.

:func:`coverage` runs a model on the user's inputs, records every head's real attention weights
(:func:`attnkit.viz.record`: the model runs on its fast path, the weights are recomputed in
float64 by the ``reference`` backend) and reports, per layer and head, the share of attention
mass each candidate pattern keeps. :func:`fit_patterns` then picks one pattern per head: the
cheapest candidate that keeps a target share of the mass (or the best one under a density
budget), and returns a :class:`~attnkit.patterns.PerHead` per layer.

    from attnkit import fit, patterns as P

    cov = fit.coverage(model, batches, fit.default_candidates())
    print(cov.table())
    per_layer = fit.fit_patterns(cov, keep=0.95)      # [PerHead, ...], one per layer

A head that keeps 95% of its mass under ``SlidingWindow(64)`` on your texts will, by this
measure, lose at most 5% of what it attended to; whether the model's outputs survive is a
separate measurement (perplexity, embedding agreement) that the caller makes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .patterns import Full, Global, Pattern, PerHead, SlidingWindow, Strided

__all__ = ["Coverage", "coverage", "default_candidates", "fit_patterns"]


def default_candidates(windows: Sequence[int] = (16, 32, 64, 128, 256), sinks: int = 4) -> list[Pattern]:
    """Windows of several sizes (symmetric, clipped by the model's own mask where it is causal),
    the same windows plus the first ``sinks`` tokens (StreamingLLM's attention sinks; Xiao et
    al. 2023), a strided pattern per window, and dense attention."""
    out: list[Pattern] = []
    for w in windows:
        local = SlidingWindow(w, w)
        out += [local, local | Global(tuple(range(sinks))), Strided(w)]
    return [*out, Full()]


@dataclass
class Coverage:
    """Attention mass each candidate pattern keeps, per layer and head.

    Attributes:
        layers: Names of the attention layers, in the order they ran.
        candidates: The candidate patterns.
        mass: ``(L, H, C)``: the share of each head's attention mass (weights summed over the
            rows that see any key, divided by the number of such rows) that candidate ``c``
            keeps, over every recorded input.
        density: ``(C,)``: the share of (query, key) pairs each candidate allows, over the same
            inputs (pairs the model's own mask forbids included, so dense is 1).
        rows: Number of query rows the averages are over.
    """

    layers: list[str]
    candidates: list[Pattern]
    mass: Tensor
    density: Tensor
    rows: int

    def table(self, keep: float = 0.95) -> str:
        """Per layer, each head's cheapest candidate keeping ``keep`` of its mass, as text."""
        lines = []
        choice = self.cheapest(keep)
        for i, name in enumerate(self.layers):
            cells = [
                f"h{h}:{self.candidates[c]!r} keeps {self.mass[i, h, c]:.2f} at density {self.density[c]:.2f}"
                for h, c in enumerate(choice[i].tolist())
            ]
            lines.append(f"{name}:\n  " + "\n  ".join(cells))
        return "\n".join(lines)

    def cheapest(self, keep: float) -> Tensor:
        """``(L, H)`` index of the lowest-density candidate keeping at least ``keep`` of the mass
        (the highest-mass one where none does)."""
        order = torch.argsort(self.density, stable=True)  # cheapest first
        ok = self.mass[..., order] >= keep
        first = torch.where(ok.any(-1), ok.float().argmax(-1), -1)
        best = self.mass.argmax(-1)
        return torch.where(first >= 0, order[first.clamp(min=0)], best)


def coverage(
    model: nn.Module,
    inputs: Iterable,
    candidates: Sequence[Pattern],
    *,
    forward: Callable[[nn.Module, object], object] | None = None,
) -> Coverage:
    """Run ``model`` on each of ``inputs`` and measure the attention mass each candidate keeps.

    Args:
        model: An attnkit model, or a Hugging Face model on the attnkit integration.
        inputs: What the model is called with, one batch per item (e.g. token id tensors).
        candidates: Patterns to score (see :func:`default_candidates`).
        forward: ``forward(model, batch)``; default ``model(batch)``.

    Returns:
        A :class:`Coverage` over every layer and head.
    """
    from .viz import record

    if not candidates:
        raise ValueError("coverage(): expected at least one candidate pattern, but got none.")
    run = forward or (lambda m, batch: m(batch))
    kept: Tensor | None = None
    allowed = torch.zeros(len(candidates), dtype=torch.float64)
    pairs = 0
    rows = 0
    layers: list[str] = []
    with torch.no_grad():
        for batch in inputs:
            with record(model) as rec:
                run(model, batch)
            if not rec.weights:
                raise ValueError("coverage(): the model ran no attnkit attention layer.")
            layers = rec.layers
            masses, seen = _masses(rec.weights, candidates)
            kept = masses if kept is None else kept + masses
            rows += seen
            B, _, N, S = rec.weights[0].shape
            allowed += torch.tensor([c.num_allowed(N, S) for c in candidates], dtype=torch.float64) * B
            pairs += B * N * S
    if kept is None:
        raise ValueError("coverage(): expected at least one input batch, but got none.")
    return Coverage(layers, list(candidates), (kept / rows).float(), (allowed / pairs).float(), rows)


def _masses(weights: list[Tensor], candidates: Sequence[Pattern]) -> tuple[Tensor, int]:
    """``(L, H, C)`` summed kept mass over the rows that see any key, and the number of rows
    (per head; the same for every head and layer of a self-attention stack)."""
    out = []
    seen = 0
    masks: dict[tuple[int, int], list[Tensor]] = {}  # per (N, S): every layer of a stack shares them
    for w in weights:  # (B, H, N, S)
        N, S = w.shape[-2:]
        if (N, S) not in masks:
            masks[N, S] = [c.to_dense(N, S).to(w.dtype).reshape(-1, 1, N, S) for c in candidates]
        live = w.sum(-1) > 0  # rows that see any key
        seen = int(live[:, 0].sum())
        per = [(w * dense).sum(-1).mul(live).sum((0, 2)) for dense in masks[N, S]]  # each (H,)
        out.append(torch.stack(per, -1).double())
    return torch.stack(out), seen


def fit_patterns(cov: Coverage, *, keep: float | None = None, budget: float | None = None) -> list[PerHead]:
    """One pattern per head, per layer, from measured coverage.

    Args:
        cov: A :class:`Coverage`.
        keep: Choose, per head, the lowest-density candidate that keeps at least this share of
            the attention mass (the best one where none does); 0.95 when neither is given.
        budget: Instead, choose per head the candidate keeping the most mass among those with
            density at most ``budget`` (the cheapest of those within 1e-4 of the most).

    Returns:
        A :class:`~attnkit.patterns.PerHead` per layer.
    """
    if keep is not None and budget is not None:
        raise ValueError("fit_patterns(): pass keep= or budget=, not both.")
    if budget is not None:
        affordable = cov.density <= budget
        if not affordable.any():
            raise ValueError(
                f"fit_patterns(): no candidate has density <= budget={budget} "
                f"(the sparsest is {float(cov.density.min()):.3f})."
            )
        mass = cov.mass.masked_fill(~affordable, -1.0)
        # the most mass; among candidates within 1e-4 of it, the cheapest
        near = mass >= mass.max(-1, keepdim=True).values - 1e-4
        choice = cov.density.expand_as(mass).masked_fill(~near, float("inf")).argmin(-1)
    else:
        keep = 0.95 if keep is None else keep
        if not 0 < keep <= 1:
            raise ValueError(f"fit_patterns(): expected 0 < keep <= 1, but got keep={keep!r}.")
        choice = cov.cheapest(keep)
    return [PerHead(cov.candidates[c] for c in row) for row in choice.tolist()]
