"""``attnkit fit``: fit one sparse pattern per head of a pretrained model and measure what it costs.

1. Coverage (:func:`attnkit.fit.coverage`) on the fitting texts: the share of each head's real
   attention mass each candidate keeps.
2. Fitting (:func:`attnkit.fit.fit_patterns`): one pattern per head, per layer.
3. Quality on held-out texts, against dense attention and against one pattern for every head at
   the same density (a window; a window plus the first tokens, StreamingLLM's "sinks"):
   sentence encoders -- cosine similarity of the embeddings to the dense ones, and agreement of
   nearest-neighbour retrieval among the held-out texts; decoder LMs -- perplexity.
4. Speed of one forward pass at the longest length the model takes (up to 4096 tokens).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .._files import atomic_write
from ..fit import Coverage, coverage, default_candidates, fit_patterns
from ..models import BertEncoder, DecoderLM
from ..patterns import Causal, Global, Pattern, PerHead, SlidingWindow

__all__ = ["FitReport", "fit_model", "split_texts"]

SINKS = 4


def split_texts(text: str, heldout_every: int = 4) -> tuple[list[str], list[str]]:
    """Paragraphs (blank-line separated; lines if there are no blank lines), every
    ``heldout_every``-th one held out: ``(fit_texts, heldout_texts)``."""
    parts = [p.strip() for p in text.split("\n\n")]
    if len([p for p in parts if p]) < 2:
        parts = [line.strip() for line in text.splitlines()]
    parts = [" ".join(p.split()) for p in parts if p.strip()]
    fit = [p for i, p in enumerate(parts) if i % heldout_every != heldout_every - 1]
    held = [p for i, p in enumerate(parts) if i % heldout_every == heldout_every - 1]
    return fit, held


@dataclass
class FitReport:
    """What ``attnkit fit`` measured; ``to_dict`` is the JSON it writes."""

    model: str
    kind: str  # "encoder" or "decoder"
    coverage: Coverage
    fitted: list[Pattern]
    choice: list[list[int]]  # per layer and head, the index of the chosen candidate
    comparison: list[dict] = field(default_factory=list)
    speed: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        cov = self.coverage
        return {
            "model": self.model,
            "kind": self.kind,
            "texts": self.texts,
            "candidates": [repr(c) for c in cov.candidates],
            "candidate_density": [round(float(d), 5) for d in cov.density],
            "layers": cov.layers,
            "mass": [[[round(float(x), 5) for x in head] for head in layer] for layer in cov.mass],
            "fitted": [repr(p) for p in self.fitted],
            "choice": self.choice,
            "comparison": self.comparison,
            "speed": self.speed,
        }

    def table(self) -> str:
        metric = "ppl" if self.kind == "decoder" else "cosine  top-1 agree  top-5 overlap"
        lines = [f"{'patterns':<34} {'density':>8}  {metric}"]
        for row in self.comparison:
            if self.kind == "decoder":
                cells = f"{row['perplexity']:.3f}"
            else:
                cells = f"{row['cosine']:.4f}  {row['top1_agreement']:.3f}        {row['top5_overlap']:.3f}"
            lines.append(f"{row['name']:<34} {row['density']:>8.4f}  {cells}")
        return "\n".join(lines)


def fit_model(
    model: nn.Module,
    tokenizer,
    name: str,
    max_tokens: int,
    fit_texts: Sequence[str],
    heldout_texts: Sequence[str],
    *,
    keep: float | None = None,
    budget: float | None = None,
    candidates: Sequence[Pattern] | None = None,
    speed_tokens: int | None = None,
    progress: bool = True,
) -> FitReport:
    """Coverage, fitting, held-out quality and speed for ``model`` (see the module docstring)."""
    kind = "decoder" if isinstance(model, DecoderLM) else "encoder"
    if not isinstance(model, (DecoderLM, BertEncoder)):
        raise TypeError(f"fit: expected a BertEncoder or DecoderLM, but got {type(model).__name__}.")
    if not fit_texts or len(heldout_texts) < 2:
        raise ValueError(
            f"fit: expected texts to fit on and at least 2 held-out texts, but got {len(fit_texts)} "
            f"and {len(heldout_texts)}."
        )
    model.eval()
    candidates = list(candidates or default_candidates())
    batches = [_ids(tokenizer, t, max_tokens) for t in fit_texts]
    bar = _bar(batches, "coverage", "text", progress)
    cov = coverage(model, bar, candidates)
    fitted = fit_patterns(cov, keep=keep, budget=budget)
    choice = [[candidates.index(h) for h in layer.heads] for layer in fitted]
    if kind == "decoder":
        fitted = [p & Causal() for p in fitted]
    held = [_ids(tokenizer, t, max_tokens) for t in heldout_texts]
    lengths = [ids.shape[1] for ids in held]
    density = _density(fitted, lengths)
    sinks = Global(tuple(range(SINKS)))
    w_plain = _matching_window(lambda w: _uniform(_window(w, kind), len(fitted)), density, lengths)
    w_sinks = _matching_window(lambda w: _uniform(_window(w, kind, sinks), len(fitted)), density, lengths)
    settings = [
        ("dense", None),
        ("fitted per head", fitted),
        (f"window {w_plain} (all heads)", _uniform(_window(w_plain, kind), len(fitted))),
        (f"window {w_sinks} + {SINKS} sinks (all heads)",
         _uniform(_window(w_sinks, kind, sinks), len(fitted))),
    ]  # fmt: skip
    report = FitReport(name, kind, cov, fitted, choice)
    report.texts = {"fit": len(fit_texts), "heldout": len(heldout_texts), "heldout_tokens": sum(lengths)}
    dense_out = None
    for label, patterns in _bar(settings, "held-out", "setting", progress):
        model.set_patterns(patterns)
        out = _evaluate(model, held, kind)
        row = {"name": label, "density": _density(patterns, lengths) if patterns else 1.0}
        if kind == "decoder":
            row["perplexity"] = out
        else:
            dense_out = out if dense_out is None else dense_out
            row.update(_agreement(dense_out, out))
        report.comparison.append(row)
    tokens = torch.cat(held, dim=1)
    n = speed_tokens or min(4096, max_tokens)
    report.speed = _speed(model, settings[:3], tokens.repeat(1, -(-n // tokens.shape[1]))[:, :n])
    model.set_patterns(None)
    return report


def html_report(loaded: tuple, fitted: Sequence[Pattern], text: str, path: Path) -> Path:
    """The explain page (``attnkit explain --html``) of ``text`` through the model with its
    fitted patterns: each head's pattern beside its weights, what each head loses to it, and
    attention rollout. ``loaded`` is :func:`attnkit.apps.explain.load_model`'s tuple."""
    from ..viz.flow import lost_mass
    from ..viz.html import write_html
    from .explain import dense_record, explain, layer_patterns

    model = loaded[0]
    model.set_patterns(list(fitted))
    try:
        ex = explain(text, loaded=loaded)
        lost = lost_mass(dense_record(ex), layer_patterns(model))
        return write_html(ex.record, path, text=text, lost=lost)
    finally:
        model.set_patterns(None)


def save_report(report: FitReport, out: Path) -> list[Path]:
    """Write ``fit.json`` and the heat map ``fit.png`` into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "fit.json"]
    text = json.dumps(report.to_dict(), indent=1) + "\n"
    atomic_write(paths[0], lambda tmp: tmp.write_text(text))
    try:
        from ..viz.plot import plot_fit

        paths.append(plot_fit(report, out / "fit.png"))
    except ImportError:  # matplotlib is optional
        pass
    return paths


# ----------------------------------------------------------------------------- helpers
def _ids(tokenizer, text: str, max_tokens: int) -> Tensor:
    return torch.tensor([tokenizer.encode(text)[:max_tokens]], dtype=torch.long)


def _bar(items, desc: str, unit: str, show: bool):
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)


def _window(w: int, kind: str, sinks: Pattern | None = None) -> Pattern:
    """A window of ``w`` keys each side (before the query only, for decoders), with the
    ``sinks`` as well; decoders' patterns stay causal (``Global`` alone would let the sink
    positions see the future)."""
    if kind != "decoder":
        return SlidingWindow(w, w) if sinks is None else SlidingWindow(w, w) | sinks
    return SlidingWindow(w) if sinks is None else (SlidingWindow(w) | sinks) & Causal()


def _uniform(pattern: Pattern, num_layers: int) -> list[Pattern]:
    return [pattern] * num_layers


def _density(patterns: Sequence[Pattern], lengths: Sequence[int]) -> float:
    """Share of (head, query, key) pairs allowed, over layers and the given lengths."""
    allowed = total = 0
    counts: dict[Pattern, tuple[int, int]] = {}
    for p in patterns:
        if p not in counts:
            heads = p.num_heads if isinstance(p, PerHead) else 1
            counts[p] = (sum(p.num_allowed(n, n) for n in lengths), heads * sum(n * n for n in lengths))
        allowed += counts[p][0]
        total += counts[p][1]
    return allowed / total


def _matching_window(make, density: float, lengths: Sequence[int]) -> int:
    """The window ``w`` whose ``make(w)`` density over ``lengths`` is closest to ``density``
    (densities grow with ``w``: a binary search)."""
    lo, hi = 0, max(lengths)
    while lo < hi:  # the smallest w reaching the density
        mid = (lo + hi) // 2
        if _density(make(mid), lengths) >= density:
            hi = mid
        else:
            lo = mid + 1
    below = max(lo - 1, 0)
    return min((below, lo), key=lambda w: abs(_density(make(w), lengths) - density))


def _evaluate(model: nn.Module, held: list[Tensor], kind: str):
    with torch.no_grad():
        if kind == "decoder":
            nll = tokens = 0.0
            for ids in held:
                if ids.shape[1] < 2:
                    continue
                logits = model(ids)[:, :-1].float()
                nll += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                ).item()
                tokens += ids.shape[1] - 1
            return math.exp(nll / tokens)
        vectors = [model.pool(model(ids), torch.ones_like(ids)) for ids in held]
        return torch.cat(vectors).double()


def _agreement(dense: Tensor, other: Tensor) -> dict:
    """Cosine of each embedding to its dense one; agreement of nearest-neighbour retrieval."""
    cos = torch.nn.functional.cosine_similarity(dense, other, dim=-1).mean().item()

    def neighbours(e: Tensor, k: int) -> Tensor:
        e = torch.nn.functional.normalize(e, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-math.inf)
        return sim.topk(min(k, e.shape[0] - 1), dim=-1).indices

    top1 = (neighbours(dense, 1) == neighbours(other, 1)).float().mean().item()
    a, b = neighbours(dense, 5), neighbours(other, 5)
    shared = [len(set(x.tolist()) & set(y.tolist())) / a.shape[1] for x, y in zip(a, b, strict=True)]
    overlap = statistics.mean(shared)
    return {"cosine": cos, "top1_agreement": top1, "top5_overlap": overlap}


def _speed(model: nn.Module, settings, ids: Tensor, repeats: int = 3) -> dict:
    """Median seconds of one forward pass of ``ids (1, n)`` per setting, alternating settings."""
    n = ids.shape[1]
    times: dict[str, list[float]] = {label: [] for label, _ in settings}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up (plans, block maps)
            for label, patterns in settings:
                model.set_patterns(patterns)
                start = time.perf_counter()
                model(ids)
                times[label].append(time.perf_counter() - start)
    return {"tokens": n, "seconds": {label: statistics.median(t[1:]) for label, t in times.items()}}
