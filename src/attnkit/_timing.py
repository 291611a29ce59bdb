"""Timing alternatives to choose between them: the one way attnkit does it.

Every place that measures before it decides (the block-sparse tile rates, the eager crossover,
context parallelism's ring or all-to-all, training precision, the fit report's speed table)
goes through :func:`time_in_turns`:

1. each call runs once untimed (plans, caches, lazy allocations, compilation);
2. then ``repeats`` rounds, each running every call once, in turns (A B C A B C ...), so a burst
   of load on a shared machine slows one round of every call rather than every run of one;
3. a decision takes each call's fastest time (:attr:`Timing.best`): interference only ever adds
   time, so the minimum is the steadiest estimate of what the call itself costs. Reports show
   the median and the spread beside it.

``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, so asynchronous devices
are timed to completion.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import TypeVar

__all__ = ["Timing", "time_in_turns"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Timing:
    """The timed runs of one call, in seconds."""

    times: tuple[float, ...]

    @property
    def best(self) -> float:
        """The fastest run (what decisions use); never below 1 ns."""
        return max(min(self.times), 1e-9)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.times), max(self.times)


def time_in_turns(
    calls: Mapping[K, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], object] | None = None,
) -> dict[K, Timing]:
    """Time every call ``repeats`` times, in turns, after ``warmup`` untimed runs of each.

    Args:
        calls: Name to a call taking no arguments.
        repeats: Timed rounds (at least 1).
        warmup: Untimed runs of each call first.
        sync: Called before each clock read (device synchronization).

    Returns:
        Name to its :class:`Timing`.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"time_in_turns(): expected repeats >= 1 and warmup >= 0, but got {repeats}, {warmup}."
        )
    wait = sync or (lambda: None)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[K, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            wait()
            t0 = perf_counter()
            fn()
            wait()
            times[name].append(perf_counter() - t0)
    return {name: Timing(tuple(t)) for name, t in times.items()}
