"""``attnkit`` command line: thin ``argparse`` subcommands over :mod:`attnkit.apps`.

attnkit explain [TEXT]                   what a pretrained model attends to (default MiniLM)
attnkit demo [TEXT] [--causal]           self-attention step by step on a tiny fixed model
attnkit patterns SPEC [--png FILE]       draw a pattern and its block map
attnkit data translate|summarize         build a corpus from Debian's archive
attnkit train translate|summarize --config FILE [--resume]   (data-parallel under torchrun)
attnkit eval RUN [--split test]          sacreBLEU/chrF or ROUGE on held-out data
attnkit translate|summarize TEXT|-       run a trained model (beam search)
attnkit tune [--dtype ...] [--force]     measure this machine's kernel rates for blocksparse

Exit codes: 0 success; 2 a usage error (bad arguments, one line); 1 a runtime error (a missing
or invalid file, a corpus that cannot be built: one line); an internal error (a bug) keeps its
traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

DEFAULT_RUNS = {"translate": "translate-en-de", "summarize": "summarize-debian"}


class UsageError(Exception):
    """The command line asks for something invalid: exit 2 with one line."""


class InputError(Exception):
    """A file or model the command was pointed at is missing or invalid: exit 1 with one line."""


@contextlib.contextmanager
def _usage(name: str) -> Iterator[None]:
    """Report a ``ValueError``/``TypeError`` raised while interpreting argument ``name`` as a
    usage error. Scoped to the call that reads the argument, so bugs elsewhere keep their
    traceback."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise UsageError(f"{name}: {e}") from e


@contextlib.contextmanager
def _input(name: str) -> Iterator[None]:
    """Report a ``ValueError`` raised while reading the file or model given as ``name`` as a
    runtime error."""
    try:
        yield
    except ValueError as e:
        raise InputError(f"{name}: {e}") from e


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer, but got {value}.")


def _decoding(args: argparse.Namespace) -> None:
    """Check ``--beam`` and ``--length-penalty`` (``None``: the run's)."""
    if args.beam is not None and args.beam < 1:
        raise UsageError(f"--beam: expected >= 1, but got {args.beam}.")
    if args.length_penalty is not None and not math.isfinite(args.length_penalty):
        raise UsageError(f"--length-penalty: expected a finite number, but got {args.length_penalty}.")


def _warn(msg: str) -> None:
    print(f"attnkit: warning: {msg}", file=sys.stderr)


def _index_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, but got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, but got {text!r}")
    return values


def _read_text(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


# -- explain ------------------------------------------------------------------------------------
def _explain(args: argparse.Namespace) -> int:
    from .apps.explain import default_head, dense_record, explain, layer_patterns, load_model
    from .viz.flow import lost_mass, rollout
    from .viz.heads import summarize_heads
    from .viz.terminal import (
        color_enabled,
        render_head_summary,
        render_lost_mass,
        render_matrix,
        render_top_k,
    )

    _positive(top_k=args.top_k, dims=args.dims, max_tokens=args.max_tokens)
    text = _read_text(args.text)
    if not text.strip():
        raise UsageError(f"TEXT: expected a non-empty TEXT, but got {text!r}.")
    pattern = None
    if args.pattern is not None:
        from .patterns import parse_pattern

        with _usage("--pattern"):
            pattern = parse_pattern(args.pattern)
    with _input("--model"):
        loaded = load_model(args.model, pattern=pattern)
    ex = explain(text, loaded=loaded, capture_inputs=args.steps)
    rec = ex.record
    if ex.truncated:
        _warn(f"the text has {ex.num_tokens} tokens but {rec.model} reads at most {ex.max_tokens}; "
             f"explaining the first {ex.max_tokens}.")  # fmt: skip
    L, H = len(rec.layers), len(rec.heads)
    for name, value, n in (("--layer", args.layer, L), ("--head", args.head, H)):
        if value is not None and not 0 <= value < n:
            raise UsageError(
                f"{name}: expected 0..{n - 1} ({rec.model} has {L} layers of {H} heads), but got {value}."
            )
    layer, head = default_head(rec)
    chosen = "" if args.layer is None and args.head is None else " (as asked)"
    layer = layer if args.layer is None else args.layer
    head = head if args.head is None else args.head
    color = {"always": True, "never": False, "auto": color_enabled()}[args.color]
    w = rec.weights[layer][0, head]
    print(f"{rec.model}: {L} layers x {H} heads, {len(rec.tokens)} tokens")
    print("Tokens: " + " ".join(f"{i}:{t}" for i, t in enumerate(rec.tokens)))
    print()
    how = chosen or " (the head that looks most at other words; choose with --layer/--head)"
    allowed = rec.captures[layer].allowed[0] if rec.captures else None
    print(render_matrix(w, rec.tokens, rec.tokens, color=color, max_tokens=args.max_tokens, allowed=allowed,
                        title=f"Layer {layer}, head {rec.heads[head]}{how}:"))  # fmt: skip
    print()
    print(render_top_k(w, rec.tokens, rec.tokens, k=args.top_k))
    patterns = layer_patterns(ex.model)
    lost = None
    if patterns is not None and len(rec.heads) == rec.num_heads:
        lost = lost_mass(dense_record(ex), patterns)
        print()
        print(render_lost_mass(lost, rec.heads, title="Attention each head loses to its pattern "
                               "(share of its dense weights outside the pattern):"))  # fmt: skip
    if args.rollout:
        flow = rollout(rec)[0].float()
        print()
        print(render_matrix(flow, rec.tokens, rec.tokens, color=color, max_tokens=args.max_tokens,
                            title="Attention rollout (Abnar & Zuidema 2020): how much of each input token "
                                  "(column) reaches each position (row) at the top, through every layer, "
                                  "heads averaged, residual included:"))  # fmt: skip
    if args.heads:
        print()
        print(render_head_summary(summarize_heads(rec)))
    if args.steps:
        from .viz.steps import head_walkthrough
        from .viz.walkthrough import render

        print()
        print(render(head_walkthrough(ex.model, rec, layer, head, text=text), max_dims=args.dims))
    if args.html:
        from .viz.html import write_html

        path = write_html(rec, args.html, text=text, layer=layer, head=head, lost=lost)
        print(f"\nwrote {path} ({path.stat().st_size / 1e3:,.0f} kB): open it in a browser, works offline")
    if args.png:
        from .viz.plot import plot_record

        path = plot_record(rec, args.png)
        print(f"wrote {path} ({path.stat().st_size / 1e3:,.0f} kB)")
        if args.rollout:
            from .viz.plot import plot_rollout

            path = plot_rollout(rollout(rec)[0], rec.tokens, Path(args.png).with_suffix(".rollout.png"))
            print(f"wrote {path} ({path.stat().st_size / 1e3:,.0f} kB)")
    return 0


# -- demo and patterns --------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from .apps.demo import render, walkthrough

    with _usage("TEXT/--d-model/--d-k"):
        w = walkthrough(args.text, d_model=args.d_model, d_k=args.d_k, seed=args.seed, causal=args.causal)
    print(render(w))
    return 0


def _text_file(name: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{name}: expected a readable UTF-8 text file, but {path!r}: {e}") from None


def _fit(args: argparse.Namespace) -> int:
    from .apps.explain import load_model
    from .apps.fit import fit_model, html_report, save_report, split_texts
    from .fit import default_candidates

    for name, value in (("--keep", args.keep), ("--budget", args.budget)):
        if value is not None and not 0 < value <= 1:
            raise UsageError(f"{name}: expected a share in (0, 1], but got {value}.")
    _positive(max_texts=args.max_texts)
    with _usage("--windows"):
        windows = [int(w) for w in args.windows.split(",")]
        if not windows or min(windows) < 0:
            raise ValueError(f"expected comma-separated window sizes >= 0, but got {args.windows!r}")
    fit_texts, held = split_texts(_text_file("--texts", args.texts))
    if args.heldout is not None:
        held = [t for part in split_texts(_text_file("--heldout", args.heldout)) for t in part]
    fit_texts, held = fit_texts[: args.max_texts], held[: args.max_texts]
    if not fit_texts or len(held) < 2:
        raise UsageError(
            f"--texts: expected paragraphs to fit on and at least 2 held out, but got {len(fit_texts)} "
            f"and {len(held)} (paragraphs are separated by blank lines; every 4th is held out)."
        )
    with _input("MODEL"):
        model, tokenizer, name, max_tokens = load_model(args.model)
    print(f"{name}: fitting on {len(fit_texts)} texts, measuring on {len(held)} held-out texts", flush=True)
    report = fit_model(
        model, tokenizer, name, max_tokens, fit_texts, held, keep=args.keep, budget=args.budget,
        candidates=default_candidates(windows), progress=not args.no_progress,
    )  # fmt: skip
    if args.budget is None:
        print(report.coverage.table(args.keep or 0.95))
    print("\nFitted patterns:")
    for i, p in enumerate(report.fitted):
        print(f"  layer {i}: {p!r}")
    print("\nHeld-out quality against dense attention:")
    print(report.table())
    speed = report.speed
    print(f"\nOne forward pass of {speed['tokens']} tokens (median of 3, this machine):")
    for label, seconds in speed["seconds"].items():
        print(f"  {label:<34} {seconds * 1e3:9.1f} ms")
    for path in save_report(report, Path(args.out)):
        print(f"wrote {path}")
    path = html_report(
        (model, tokenizer, name, max_tokens), report.fitted, held[0], Path(args.out) / "fit.html"
    )
    print(f"wrote {path}: the first held-out text through the fitted model (open it in a browser)")
    if args.save:
        model.set_patterns(report.fitted)
        model.save_pretrained(args.save)
        print(f"saved the model with its fitted patterns to {args.save}")
    return 0


def _patterns(args: argparse.Namespace) -> int:
    from .patterns import parse_pattern

    with _usage("SPEC"):
        pattern = parse_pattern(args.spec)
    n, s = args.n, args.s if args.s is not None else args.n
    _positive(block=args.block, width=args.width)
    with _usage("SPEC/-n/-s/--tile"):
        drawing = pattern.to_string(n, s, block=args.tile, width=args.width)
    print(drawing)
    groups = pattern.groups() if pattern.per_head else [(pattern, (0,))]
    num_heads = sum(len(heads) for _, heads in groups)
    total = num_heads * n * s * (pattern.batch_size or 1)
    visited = sum(len(heads) * p.block_map(n, s, args.block).visited_fraction() for p, heads in groups)
    c = pattern.block_map(n, s, args.block).counts  # a PerHead's: the union of its heads
    heads_note, union_note = (" over all heads", " (union of the heads)") if pattern.per_head else ("", "")
    print(
        f"\nallowed pairs: {pattern.num_allowed(n, s):,} of {total:,} ({100 * pattern.density(n, s):.2f}%)"
        f"{heads_note}\n{args.block}x{args.block} tiles: {c['full']} full, {c['partial']} partial, "
        f"{c['empty']} empty{union_note} -> a block-sparse kernel computes "
        f"{100 * visited / num_heads:.2f}% of the dense work"
    )
    if args.png:
        from .viz.plot import plot_pattern

        path = plot_pattern(pattern, n, s, args.png, block=args.block)
        print(f"wrote {path}")
    return 0


# -- data, train, eval, translate, summarize ----------------------------------------------------
def _data(args: argparse.Namespace) -> int:
    from .data import build_summarization_corpus, build_translation_corpus, cache_root

    root = cache_root(args.cache_dir)
    print(f"building under {root} (set with --cache-dir or ATTNKIT_DATA)")
    with warnings.catch_warnings(record=True) as caught:  # shown as one line each, below
        warnings.simplefilter("always", UserWarning)
        if args.task == "translate":
            with _usage("--sources"):
                sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
                if "help" not in sources:
                    sources = ("help", *sources)
                from .data.libreoffice import SOURCES

                if not set(sources) <= set(SOURCES):
                    raise ValueError(f"expected names from {SOURCES}, but got {args.sources!r}")
            meta = build_translation_corpus(root, args.lang, sources=sources)
            where = root / f"translate-en-{args.lang}"
        else:
            meta = build_summarization_corpus(root)
            where = root / "summarize-debian"
    for w in caught:
        _warn(str(w.message))
    c = meta["counts"]
    print(f"{where}: {meta['unique_pairs']:,} unique pairs -> train {c['train']:,}, valid {c['valid']:,}, "
          f"test {c['test']:,} (dropped: {meta['dropped']})")  # fmt: skip
    for source, n in meta.get("by_source", {}).items():
        if source != "help":
            print(f"  + {source}: {n['catalogs']} catalogs -> train {n['train']:,}, other-test.tsv "
                  f"{n['other_test']:,} (dropped: {n['dropped']})")  # fmt: skip
    return 0


def _run_dir(args: argparse.Namespace, task: str) -> Path:
    from .data import cache_root

    return Path(args.out) if args.out else cache_root(args.cache_dir) / "runs" / DEFAULT_RUNS[task]


def _train(args: argparse.Namespace) -> int:
    import torch

    from .apps.train import Trainer, load_config

    with _input("--config"):
        cfg = load_config(args.config)
    if cfg.task != args.task:
        raise UsageError(
            f"--config: expected a {args.task!r} config, but {args.config!r} has task {cfg.task!r}."
        )
    overrides = {
        k: v
        for k, v in (
            ("max_steps", args.max_steps),
            ("max_minutes", args.max_minutes),
            ("precision", args.precision),
        )
        if v is not None
    }
    with _usage("--max-steps/--max-minutes"):
        cfg = cfg.replace(**overrides) if overrides else cfg
    if args.threads:
        torch.set_num_threads(args.threads)
    out = _run_dir(args, args.task)
    device, started = _data_parallel(args.device)
    try:
        trainer = Trainer(cfg, out, cache=args.cache_dir, progress=not args.no_progress, device=device)
        state = trainer.run(resume=args.resume)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    if trainer.main:
        print(f"{out}: step {state['step']}, best valid loss {state['best_valid']:.3f}, "
              f"{state['elapsed'] / 60:.1f} min of training")  # fmt: skip
    return 130 if state.get("interrupted") else 0


def _data_parallel(device: str) -> tuple[str, bool]:
    """Under ``torchrun`` (``WORLD_SIZE > 1``), join the process group: NCCL on CUDA (each rank
    on GPU ``LOCAL_RANK``), gloo on CPU, with ``ATTNKIT_DIST_TIMEOUT`` seconds (default 300)
    for every collective. Returns this rank's device and whether the group was started here."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    with _usage("ATTNKIT_DIST_TIMEOUT"):
        seconds = float(os.environ.get("ATTNKIT_DIST_TIMEOUT", "300"))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=seconds))
    return device, True


def _eval(args: argparse.Namespace) -> int:
    import json

    from .apps.tasks import evaluate

    if args.test_file is not None:
        from .apps.tasks import read_test_file

        with _input("--test-file"):
            read_test_file(args.test_file)  # a bad file fails before the model loads
    _decoding(args)
    result = evaluate(
        args.run, split=args.split, beam_size=args.beam, limit=args.limit, progress=not args.no_progress,
        device=args.device, test_file=args.test_file, length_penalty=args.length_penalty,
    )  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .apps.tasks import cross_attention, load_task_model
    from .viz.terminal import color_enabled, render_matrix

    with _input("--model"):
        tm = load_task_model(args.model or _run_dir(args, args.command))
    if tm.task["task"] != args.command:
        raise UsageError(
            f"--model: expected a {args.command!r} model, but {str(tm.path)!r} is for {tm.task['task']!r}."
        )
    texts = [ln.strip() for ln in sys.stdin.read().splitlines()] if args.text == "-" else [args.text]
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise UsageError("TEXT: expected some text (or lines on stdin with '-'), but got nothing.")
    _decoding(args)
    _positive(max_tokens=args.max_tokens)
    ids = tm.generate_ids(texts, beam_size=args.beam, length_penalty=args.length_penalty)
    for out in ids:
        print(tm.tokenizer.decode(out))
    if args.show_attention:
        src, tgt, w = cross_attention(tm, texts[0], ids[0])
        color = color_enabled()
        print(file=sys.stderr)
        print(render_matrix(w, tgt, src, color=color, max_tokens=args.max_tokens,
                            title="Cross-attention of the first output (last decoder layer, mean of heads): "
                            "row = output token, column = source token"), file=sys.stderr)  # fmt: skip
        print(
            "Alignment: " + ", ".join(f"{t}->{src[int(w[i].argmax())]}" for i, t in enumerate(tgt)),
            file=sys.stderr,
        )
    return 0


# -- tune ---------------------------------------------------------------------------------------
def _tune(args: argparse.Namespace) -> int:
    import torch

    from .backends import _tuning

    if args.threads is not None:
        _positive(threads=args.threads)
        torch.set_num_threads(args.threads)
    if not _tuning.enabled():
        raise UsageError("ATTNKIT_TUNE=off is set: the built-in rates are used and nothing is measured.")
    print(f"tuning file: {_tuning.tuning_file()}")
    for name in args.dtype:
        dtype = getattr(torch, name)
        key = _tuning.machine_key(dtype)
        if args.force:
            _tuning.forget()
            tuning = _tuning.calibrate(dtype)
            _tuning.store(tuning)
        else:
            tuning = _tuning.current(dtype)
        print(f"\n{key} ({'measured now' if tuning.source == 'measured' else 'from the file'})")
        for direction, layouts in tuning.kernel_rates.items():
            for layout, rates in layouts.items():
                cells = "  ".join(f"{b:>3}: {r:6.1f}" for b, r in rates.items())
                print(f"  {direction:<8} {layout:<6} GFLOP/s by tile  {cells}")
        print(f"  gathered tile cost (copy included) {tuning.gather_copy:.2f}x its kernel time")
        print(f"  dense SDPA with a boolean mask     {tuning.sdpa_mask_rate:.1f} GFLOP/s")
        eager = f"up to {tuning.eager_keys} tokens" if tuning.eager_keys else "never"
        print(f"  training on the eager backend      {eager} (faster than the fused kernel there)")
    return 0


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description="Self-attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser(
        "explain", help="what a pretrained model attends to (default all-MiniLM-L6-v2, offline)"
    )
    ex.add_argument("text", nargs="?", default="The cat sat on the mat.", help="the text ('-' reads stdin)")
    ex.add_argument(
        "--model", default=None, help="a BERT- or Llama-family checkpoint directory (default MiniLM)"
    )
    ex.add_argument(
        "--layer", type=int, default=None, help="layer to show (default: the most focused head's)"
    )
    ex.add_argument("--head", type=int, default=None, help="head to show")
    ex.add_argument("--top-k", type=int, default=3, help="attended tokens listed per token (default 3)")
    ex.add_argument("--heads", action="store_true", help="summarize what every head does")
    ex.add_argument(
        "--steps", action="store_true", help="the chosen head's computation step by step, checked"
    )
    ex.add_argument("--dims", type=int, default=6, help="dimensions shown in --steps tables (default 6)")
    ex.add_argument("--html", metavar="FILE", help="write a self-contained interactive web page")
    ex.add_argument("--png", metavar="FILE", help="write a grid of heatmaps (layers x heads)")
    ex.add_argument("--pattern", default=None, help="run the encoder with this attention pattern")
    ex.add_argument(
        "--rollout", action="store_true", help="attention rollout: how tokens flow through all layers"
    )
    ex.add_argument(
        "--max-tokens", type=int, default=32, help="tokens drawn in the terminal matrix (default 32)"
    )
    ex.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    ex.set_defaults(func=_explain)

    ft = sub.add_parser(
        "fit", help="fit a sparse pattern to each head of a pretrained model and measure what it costs"
    )
    ft.add_argument(
        "model", nargs="?", default=None,
        help="a BERT- or Llama-family checkpoint directory (default all-MiniLM-L6-v2)",
    )  # fmt: skip
    ft.add_argument("--texts", required=True, help="text file; paragraphs separated by blank lines")
    ft.add_argument("--heldout", default=None, help="held-out texts (default: every 4th paragraph)")
    choose = ft.add_mutually_exclusive_group()
    choose.add_argument(
        "--keep", type=float, default=None,
        help="the cheapest pattern keeping this share of each head's attention (default 0.95)",
    )  # fmt: skip
    choose.add_argument(
        "--budget", type=float, default=None,
        help="instead, the pattern keeping the most attention at this density or less",
    )  # fmt: skip
    ft.add_argument("--windows", default="16,32,64,128,256", help="candidate window sizes (default 16..256)")
    ft.add_argument("--max-texts", type=int, default=200, help="at most this many texts per side")
    ft.add_argument("--out", default="fit", help="directory for fit.json and fit.png (default ./fit)")
    ft.add_argument("--save", default=None, metavar="DIR", help="also save the model with its patterns")
    ft.add_argument("--no-progress", action="store_true", help="no progress bars")
    ft.set_defaults(func=_fit)

    demo = sub.add_parser("demo", help="self-attention step by step on a tiny fixed model, with real numbers")
    demo.add_argument("text", nargs="?", default="The cat sat on the mat.")
    demo.add_argument("--causal", action="store_true", help="each token sees only itself and earlier tokens")
    demo.add_argument("--d-model", type=int, default=8, help="width of the token vectors (default 8)")
    demo.add_argument("--d-k", type=int, default=4, help="width of queries/keys/values (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the projection matrices")
    demo.set_defaults(func=_demo)

    pat = sub.add_parser("patterns", help="draw an attention pattern, e.g. 'SlidingWindow(64) & Causal()'")
    pat.add_argument("spec", help='pattern expression, e.g. "SlidingWindow(64) & Causal()"')
    pat.add_argument("-n", type=int, default=512, help="query length N (default 512)")
    pat.add_argument("-s", type=int, default=None, help="key length S (default N)")
    pat.add_argument("--tile", type=int, default=None, help="positions per character (default: fit --width)")
    pat.add_argument("--width", type=int, default=64, help="characters per row (default 64)")
    pat.add_argument("--block", type=int, default=64, help="kernel tile size for the statistics (default 64)")
    pat.add_argument("--png", metavar="FILE", help="also write a picture of the pattern")
    pat.set_defaults(func=_patterns)

    cache_help = "data cache (default $ATTNKIT_DATA or ~/.cache/attnkit)"
    lp_help = "beam search ranks finished outputs by log p / length**LP (default: the run's)"
    data = sub.add_parser("data", help="build a corpus from Debian's archive (no root, nothing installed)")
    data.add_argument("task", choices=("translate", "summarize"))
    data.add_argument("--lang", default="de", choices=("de", "fr", "es"), help="target language (translate)")
    data.add_argument(
        "--sources", default="help,ui,gettext",
        help="translate: comma-separated help (LibreOffice help pages, always), ui (LibreOffice's "
        "interface catalogs), gettext (common programs' catalogs); default help,ui,gettext",
    )  # fmt: skip
    data.add_argument("--cache-dir", default=None, help=cache_help)
    data.set_defaults(func=_data)

    tr = sub.add_parser("train", help="train a translator or summarizer from a JSON config")
    tr.add_argument("task", choices=("translate", "summarize"))
    tr.add_argument("--config", required=True, help="JSON config (see configs/)")
    tr.add_argument("--out", default=None, help="run directory (default CACHE/runs/<task corpus>)")
    tr.add_argument(
        "--resume", action="store_true", help="continue the run in --out exactly where it stopped"
    )
    tr.add_argument("--threads", type=int, default=None, help="torch threads")
    tr.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    tr.add_argument("--max-minutes", type=float, default=None, help="override the config's max_minutes")
    tr.add_argument("--cache-dir", default=None, help=cache_help)
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    tr.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default=None,
        help="override the config's precision: auto measures fp32 and bf16 autocast steps at start-up",
    )  # fmt: skip
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="score a trained model on held-out data (sacreBLEU/chrF or ROUGE)")
    ev.add_argument("run", help="run directory (or its model/ directory)")
    ev.add_argument("--split", default="test", choices=("valid", "test"))
    ev.add_argument(
        "--test-file", default=None, metavar="FILE.tsv",
        help="score on your own pairs instead of a split: source TAB reference, one pair a line",
    )  # fmt: skip
    ev.add_argument("--beam", type=int, default=None, help="beam size (default: the run's)")
    ev.add_argument("--length-penalty", type=float, default=None, help=lp_help)
    ev.add_argument("--limit", type=int, default=None, help="only the first LIMIT examples")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    ev.set_defaults(func=_eval)

    tu = sub.add_parser(
        "tune", help="measure this machine's attention kernels for the block-sparse cost model"
    )
    tu.add_argument(
        "--dtype", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16", "float16"),
        help="dtypes to measure (default float32 bfloat16)",
    )  # fmt: skip
    tu.add_argument("--force", action="store_true", help="measure again even if the file has this machine")
    tu.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    tu.set_defaults(func=_tune)

    for task, what in (("translate", "translate English text"), ("summarize", "summarize a description")):
        g = sub.add_parser(task, help=f"{what} with a trained model ('-': one input per line on stdin)")
        g.add_argument("text", help="the input, or '-' for stdin")
        g.add_argument(
            "--model", default=None, help=f"run or model directory (default CACHE/runs/{DEFAULT_RUNS[task]})"
        )
        g.add_argument("--beam", type=int, default=None, help="beam size (default: the run's)")
        g.add_argument("--length-penalty", type=float, default=None, help=lp_help)
        g.add_argument(
            "--show-attention", action="store_true", help="print the cross-attention of the first output"
        )
        g.add_argument("--max-tokens", type=int, default=32, help="tokens drawn in the attention matrix")
        g.add_argument("--cache-dir", default=None, help=cache_help)
        g.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on malformed arguments
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return args.func(args)
    except UsageError as e:
        print(f"attnkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (InputError, OSError, ImportError, DataError) as e:
        print(f"attnkit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"attnkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
