"""``attnkit fit``: fit one sparse pattern per head of a pretrained model and measure what it costs.

1. Coverage (:func:`attnkit.fit.coverage`) on the fitting texts: the share of each head's real
   attention mass each candidate keeps.
2. Fitting: one pattern per head, per layer -- by attention mass kept
   (:func:`attnkit.fit.fit_patterns`), or, with ``by="effect"`` and a budget, by the effect on
   the model's output: each layer's loss rise under the sparsest window + sinks candidate
   (:func:`attnkit.fit.sensitivity`), the budget spent by :func:`attnkit.fit.allocate` under
   the weighting :func:`attnkit.fit.choose_allocation` finds best on the fitting texts. The
   loss is the next-token negative log-likelihood for decoders, and for encoders how far the
   pooled embeddings move from the dense ones (one minus their cosine).
3. Quality on held-out texts, against dense attention and against one pattern for every head at
   the same density (a window; a window plus the first tokens, StreamingLLM's "sinks"):
   sentence encoders -- cosine similarity of the embeddings to the dense ones, and agreement of
   nearest-neighbour retrieval among the held-out texts; decoder LMs -- perplexity.
4. Speed of one forward pass at the longest length the model takes (up to 4096 tokens; a
   decoder computes the last position's logits only).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .._files import atomic_write
from .._timing import time_in_turns
from ..fit import Coverage, choose_allocation, coverage, default_candidates, fit_patterns, sensitivity
from ..fit.choose import check_budget, choose, within_layer
from ..models import BertEncoder
from ..models._lm import CausalLM
from ..models.loading import LoadedModel, load, self_attention_patterns
from ..patterns import Full, Global, Or, Pattern, PerHead, SlidingWindow
from .errors import UsageError, argument, positive, read_text_file, reading, share

__all__ = ["FitReport", "baseline", "check_fit_budget", "fit_model", "run", "split_texts"]

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
    #: With ``by="effect"``: the weighting ``choose_allocation`` kept, as text.
    weighting: str | None = None

    def to_dict(self) -> dict:
        cov = self.coverage
        return {
            "model": self.model,
            "kind": self.kind,
            "texts": self.texts,
            "candidates": [repr(c) for c in cov.candidates],
            "layers": cov.layers,
            "mass": _rounded(cov.mass),
            "density": _rounded(cov.density),
            "own_patterns": [None if p is None else repr(p) for p in cov.own],
            "own_density": _rounded(cov.own_density),
            "fitted": [repr(p) for p in self.fitted],
            "choice": self.choice,
            "fitted_by": "mass" if self.weighting is None else f"effect ({self.weighting})",
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
    loaded: LoadedModel,
    fit_texts: Sequence[str],
    heldout_texts: Sequence[str],
    *,
    keep: float | None = None,
    budget: float | None = None,
    candidates: Sequence[Pattern] | None = None,
    speed_tokens: int | None = None,
    by: str = "mass",
    progress: bool = True,
) -> FitReport:
    """Coverage, fitting, held-out quality and speed for a loaded model (see the module
    docstring). Arguments are checked before anything runs; a ``budget`` below every
    candidate's density on these texts is an error before the coverage pass."""
    model, tokenizer, name, max_tokens = loaded.model, loaded.tokenizer, loaded.name, loaded.max_tokens
    if not isinstance(model, (CausalLM, BertEncoder)):
        raise TypeError(
            f"fit: expected a BertEncoder, DecoderLM or Gemma3LM, but got {type(model).__name__}."
        )
    kind = loaded.kind
    if not fit_texts or len(heldout_texts) < 2:
        raise ValueError(
            f"fit: expected texts to fit on and at least 2 held-out texts, but got {len(fit_texts)} "
            f"and {len(heldout_texts)}."
        )
    if keep is not None and budget is not None:
        raise ValueError("fit: pass keep= or budget=, not both.")
    if keep is not None and not 0 < keep <= 1:
        raise ValueError(f"fit: expected 0 < keep <= 1, but got keep={keep!r}.")
    if by not in ("mass", "effect"):
        raise ValueError(f"fit: expected by to be 'mass' or 'effect', but got {by!r}.")
    if by == "effect" and budget is None:
        raise ValueError("fit: by='effect' spends a density budget; pass budget=.")
    candidates = list(candidates or default_candidates())
    batches = [_ids(tokenizer, t, max_tokens) for t in fit_texts]
    own = self_attention_patterns(model)
    if budget is not None:
        check_fit_budget(budget, own, candidates, [ids.shape[1] for ids in batches])
    model.eval()
    bar = _bar(batches, "coverage", "text", progress)
    cov = coverage(model, bar, candidates)
    held = [_ids(tokenizer, t, max_tokens) for t in heldout_texts]
    weighting = None
    if by == "effect":
        loss = _loss(model, kind, batches)
        probe = _probe(cov)
        texts = range(len(batches))
        sens = sensitivity(model, texts, probe, loss=loss, own=own,
                           progress=lambda xs: _bar(xs, "sensitivity", "layer", progress))  # fmt: skip
        found = choose_allocation(model, texts, cov, sens, budget, loss=loss, probe=probe, own=own,
                                  progress=lambda xs: _bar(xs, "weighting", "try", progress))  # fmt: skip
        fitted, choice, weighting = found.patterns, found.choice.tolist(), str(found.weighting)
    else:
        fitted = fit_patterns(cov, keep=keep, budget=budget)
        choice = choose(cov, keep=keep, budget=budget).tolist()
    lengths = [ids.shape[1] for ids in held]
    density = _density(fitted, lengths)
    w_plain = _matching_window(lambda w: baseline(w, own), density, lengths)
    w_sinks = _matching_window(lambda w: baseline(w, own, SINKS), density, lengths)
    settings = [
        ("dense", None),
        ("fitted per head", fitted),
        (f"window {w_plain} (all heads)", baseline(w_plain, own)),
        (f"window {w_sinks} + {SINKS} sinks (all heads)", baseline(w_sinks, own, SINKS)),
    ]
    report = FitReport(name, kind, cov, fitted, choice, weighting=weighting)
    report.texts = {"fit": len(fit_texts), "heldout": len(heldout_texts), "heldout_tokens": sum(lengths)}
    dense_out = None
    for label, patterns in _bar(settings, "held-out", "setting", progress):
        model.set_patterns(patterns)
        out = _evaluate(model, held, kind)
        row = {"name": label, "density": _density(patterns or own, lengths)}
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


def _probe(cov: Coverage) -> Pattern:
    """The candidate the sensitivity is measured with: the window + sinks candidate with the
    lowest density measured on the fitting texts (a window alone where there is none), so that
    no fitted head is sparser than what was measured."""
    local = [i for i, c in enumerate(cov.candidates) if not isinstance(c, Full)]
    with_sinks = [
        i for i in local
        if isinstance(c := cov.candidates[i], Or) and any(isinstance(p, Global) for p in c.parts)
    ]  # fmt: skip
    mean = cov.density.mean(dim=(0, 1))
    return cov.candidates[min(with_sinks or local, key=lambda i: float(mean[i]))]


def _loss(model: nn.Module, kind: str, batches: list[Tensor]):
    """``loss(model, i)`` for fitting text ``i``: the summed next-token NLL of a decoder; for an
    encoder, one minus the cosine of its pooled embedding to the dense model's."""
    if kind == "decoder":
        return lambda m, i: _nll(m, batches[i])[0]
    model.set_patterns(None)
    dense = [_embedding(model, ids) for ids in batches]

    def distance(m: nn.Module, i: int) -> float:
        return float(
            1 - torch.nn.functional.cosine_similarity(_embedding(m, batches[i]), dense[i], dim=-1).sum()
        )

    return distance


def check_fit_budget(budget: float, own: Sequence[Pattern | None], candidates: Sequence[Pattern],
                     lengths: Sequence[int]) -> None:  # fmt: skip
    """Raise ``ValueError`` when no candidate fits ``budget`` on texts of ``lengths`` in a model
    whose layers run ``own``: known from the lengths alone, before any forward pass."""
    check_budget(budget, min(_density([within_layer(c, p) for p in own], lengths) for c in candidates))


def run(
    model: str | None,
    texts: str,
    *,
    heldout: str | None = None,
    keep: float | None = None,
    budget: float | None = None,
    windows: str = "16,32,64,128,256",
    max_texts: int = 200,
    out: str = "fit",
    save: str | None = None,
    by: str = "mass",
    progress: bool = True,
) -> int:
    """``attnkit fit``: fit, measure, print the report and write ``fit.json``, ``fit.png`` and
    ``fit.html`` into ``out`` (and the model with its patterns into ``save``). Every argument
    is checked before the coverage pass."""
    share(keep=keep, budget=budget)
    positive(max_texts=max_texts)
    if by == "effect" and budget is None:
        raise UsageError("--by effect: expected --budget (the density to spend), but got none.")
    with argument("--windows"):
        sizes = [int(w) for w in windows.split(",")]
        if not sizes or min(sizes) < 0:
            raise ValueError(f"expected comma-separated window sizes >= 0, but got {windows!r}")
    fit_texts, held = split_texts(read_text_file("--texts", texts))
    if heldout is not None:
        held = [t for part in split_texts(read_text_file("--heldout", heldout)) for t in part]
    fit_texts, held = fit_texts[:max_texts], held[:max_texts]
    if not fit_texts or len(held) < 2:
        raise UsageError(
            f"--texts: expected paragraphs to fit on and at least 2 held out, but got {len(fit_texts)} "
            f"and {len(held)} (paragraphs are separated by blank lines; every 4th is held out)."
        )
    with reading("MODEL"):
        loaded = load(model)
    candidates = default_candidates(sizes)
    if budget is not None:
        lengths = [_ids(loaded.tokenizer, t, loaded.max_tokens).shape[1] for t in fit_texts]
        with argument("--budget"):
            check_fit_budget(budget, self_attention_patterns(loaded.model), candidates, lengths)
    print(f"{loaded.name}: fitting on {len(fit_texts)} texts, measuring on {len(held)} held-out texts",
          flush=True)  # fmt: skip
    report = fit_model(loaded, fit_texts, held, keep=keep, budget=budget, candidates=candidates, by=by,
                       progress=progress)  # fmt: skip
    if budget is None:
        print(report.coverage.table(keep or 0.95))
    how = f" (by the effect on the loss; {report.weighting})" if report.weighting else ""
    print(f"\nFitted patterns{how}:")
    for i, p in enumerate(report.fitted):
        print(f"  layer {i}: {p!r}")
    print("\nHeld-out quality against dense attention:")
    print(report.table())
    speed = report.speed
    print(f"\nOne forward pass of {speed['tokens']} tokens (median of 3, this machine):")
    for label, seconds in speed["seconds"].items():
        print(f"  {label:<34} {seconds * 1e3:9.1f} ms")
    for path in save_report(report, Path(out)):
        print(f"wrote {path}")
    path = html_report(loaded, report.fitted, held[0], Path(out) / "fit.html")
    print(f"wrote {path}: the first held-out text through the fitted model (open it in a browser)")
    if save:
        loaded.model.set_patterns(report.fitted)
        loaded.model.save_pretrained(save)
        print(f"saved the model with its fitted patterns to {save}")
    return 0


def html_report(loaded: LoadedModel, fitted: Sequence[Pattern], text: str, path: Path) -> Path:
    """The explain page (``attnkit explain --html``) of ``text`` through the model with its
    fitted patterns: each head's pattern beside its weights, what each head loses to it, and
    attention rollout."""
    from ..viz.flow import lost_mass
    from ..viz.html import write_html
    from .explain import dense_record, explain, layer_patterns

    model = loaded.model
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
def _rounded(t: Tensor, decimals: int = 5) -> list:
    return t.double().round(decimals=decimals).tolist()


def _ids(tokenizer, text: str, max_tokens: int) -> Tensor:
    return torch.tensor([tokenizer.encode(text)[:max_tokens]], dtype=torch.long)


def _bar(items, desc: str, unit: str, show: bool):
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)


def baseline(w: int, own: Sequence[Pattern | None], sinks: int = 0) -> list[Pattern]:
    """One pattern for every head of every layer: a window of ``w`` keys each side (with the
    first ``sinks`` tokens), within what each layer already allows (``own``: a causal layer
    keeps only the window's past half, and its sink positions do not see the future)."""
    base: Pattern = SlidingWindow(w, w)
    if sinks:
        base = base | Global(tuple(range(sinks)))
    return [within_layer(base, p) for p in own]


def _density(patterns: Sequence[Pattern], lengths: Sequence[int]) -> float:
    """Share of (head, query, key) pairs allowed, over layers and the given lengths."""
    allowed = total = 0
    counts: dict[Pattern, tuple[int, int]] = {}
    for p in patterns:
        p = Full() if p is None else p
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


def _nll(model: nn.Module, ids: Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ``ids (1, T)`` and the tokens it scores."""
    if ids.shape[1] < 2:
        return 0.0, 0
    with torch.no_grad():
        logits = model(ids)[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
    return nll.item(), ids.shape[1] - 1


def _embedding(model: nn.Module, ids: Tensor) -> Tensor:
    """An encoder's pooled embedding of ``ids``, float64."""
    with torch.no_grad():
        return model.pool(model(ids), torch.ones_like(ids)).double()


def _evaluate(model: nn.Module, held: list[Tensor], kind: str):
    if kind == "decoder":
        scored = [_nll(model, ids) for ids in held]
        return math.exp(sum(n for n, _ in scored) / sum(t for _, t in scored))
    return torch.cat([_embedding(model, ids) for ids in held])


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
    """Median seconds of one forward pass of ``ids (1, n)`` per setting, timed in turns after a
    warm-up (:func:`attnkit._timing.time_in_turns`)."""

    last_only = {"logits_to_keep": 1} if isinstance(model, CausalLM) else {}

    def forward(patterns) -> None:  # a decoder's logits for the last position: what attention changes
        model.set_patterns(patterns)
        model(ids, **last_only)

    with torch.no_grad():
        timed = time_in_turns({label: (lambda p=p: forward(p)) for label, p in settings}, repeats=repeats)
    return {"tokens": ids.shape[1], "seconds": {label: t.median for label, t in timed.items()}}
