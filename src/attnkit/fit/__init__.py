"""Which sparse pattern each head of a trained model can run with, measured on real inputs.

:func:`coverage` runs a model on the user's inputs and measures, per layer and head, the share
of attention mass each candidate pattern keeps: it observes every attention call through
attnkit's attention hook and recomputes the weights block by block of query rows from the
call's own queries and keys (never an ``N x S`` matrix per head, so 32k-token contexts fit).
:func:`fit_patterns` then picks one pattern per head: the cheapest candidate that keeps a
target share of the mass (or the best one under a density budget), intersected with what the
layer already allowed (a causal or sliding-window model stays so), and returns a
:class:`~attnkit.patterns.PerHead` per layer.

    from attnkit import fit, patterns as P

    cov = fit.coverage(model, batches, fit.default_candidates())
    print(cov.table())
    per_layer = fit.fit_patterns(cov, keep=0.95)      # [PerHead, ...], one per layer

A head that keeps 95% of its mass under ``SlidingWindow(64)`` on your texts will, by this
measure, lose at most 5% of what it attended to; whether the model's outputs survive is a
separate measurement (perplexity, embedding agreement) that the caller makes.
:func:`sensitivity` and :func:`allocate` put that measurement in the loop: the loss each layer
adds under a sparse probe decides where a density budget is spent, and
:func:`choose_allocation` chooses on the caller's texts how to weigh the two measurements.
"""

from .choose import fit_patterns
from .effect import Allocation, Weighting, allocate, choose_allocation, sensitivity
from .measure import Coverage, coverage, default_candidates

__all__ = [
    "Allocation",
    "Coverage",
    "Weighting",
    "allocate",
    "choose_allocation",
    "coverage",
    "default_candidates",
    "fit_patterns",
    "sensitivity",
]
