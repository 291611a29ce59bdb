"""``attnkit`` command line: thin ``argparse`` subcommands over :mod:`attnkit.apps`.

attnkit explain [TEXT]                   what a pretrained model attends to (default MiniLM)
attnkit fit [MODEL] --texts FILE         fit a sparse pattern per head and measure what it costs
attnkit generate MODEL PROMPT            continue a prompt with a pretrained decoder (GGUF too)
attnkit demo [TEXT] [--causal]           self-attention step by step on a tiny fixed model
attnkit patterns SPEC [--png FILE]       draw a pattern and its block map
attnkit data translate|summarize         build a corpus from Debian's archive
attnkit train translate|summarize --config FILE [--resume]   (data-parallel under torchrun)
attnkit eval RUN [--split test]          sacreBLEU/chrF or ROUGE on held-out data
attnkit translate|summarize TEXT|-       run a trained model (beam search)
attnkit tune [--dtype ...] [--force]     measure this machine's kernel rates for blocksparse

Each subcommand parses its arguments and calls one ``run`` function of an app module, which
does the work and returns the exit code. Exit codes: 0 success; 2 a usage error (bad
arguments, one line); 1 a runtime error (a missing or invalid file, a corpus that cannot be
built: one line); an internal error (a bug) keeps its traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings


# -- one call per command -----------------------------------------------------------------------
def _explain(a: argparse.Namespace) -> int:
    from .apps import explain

    return explain.run(a.text, model=a.model, layer=a.layer, head=a.head, top_k=a.top_k, heads=a.heads,
                       steps=a.steps, dims=a.dims, html=a.html, png=a.png, pattern=a.pattern,
                       rollout=a.rollout, max_tokens=a.max_tokens, color=a.color)  # fmt: skip


def _fit(a: argparse.Namespace) -> int:
    from .apps import fit

    return fit.run(a.model, a.texts, heldout=a.heldout, keep=a.keep, budget=a.budget, windows=a.windows,
                   max_texts=a.max_texts, out=a.out, save=a.save, by=a.by,
                   progress=not a.no_progress)  # fmt: skip


def _demo(a: argparse.Namespace) -> int:
    from .apps import demo

    return demo.run(a.text, d_model=a.d_model, d_k=a.d_k, seed=a.seed, causal=a.causal)


def _patterns(a: argparse.Namespace) -> int:
    from .apps import patterns

    return patterns.run(a.spec, n=a.n, s=a.s, tile=a.tile, width=a.width, block=a.block, png=a.png)


def _data(a: argparse.Namespace) -> int:
    from .apps import data

    return data.run(a.task, lang=a.lang, sources=a.sources, cache_dir=a.cache_dir)


def _train(a: argparse.Namespace) -> int:
    from .apps import train

    return train.run(a.task, a.config, out=a.out, resume=a.resume, threads=a.threads, max_steps=a.max_steps,
                     max_minutes=a.max_minutes, precision=a.precision, cache_dir=a.cache_dir,
                     progress=not a.no_progress, device=a.device)  # fmt: skip


def _eval(a: argparse.Namespace) -> int:
    from .apps import tasks

    return tasks.run_eval(
        a.run, test_file=a.test_file, beam=a.beam, length_penalty=a.length_penalty, split=a.split,
        limit=a.limit, progress=not a.no_progress, device=a.device,
    )  # fmt: skip


def _task(a: argparse.Namespace) -> int:
    from .apps import tasks

    return tasks.run_generate(a.command, a.text, model=a.model, beam=a.beam, length_penalty=a.length_penalty,
                              show_attention=a.show_attention, max_tokens=a.max_tokens,
                              cache_dir=a.cache_dir)  # fmt: skip


def _generate(a: argparse.Namespace) -> int:
    from .apps import generate

    return generate.run(a.model, a.prompt, max_new_tokens=a.max_new_tokens, sample=a.sample,
                        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                        threads=a.threads, show_tokens=a.show_tokens)  # fmt: skip


def _tune(a: argparse.Namespace) -> int:
    from .apps import tune

    return tune.run(a.dtype, force=a.force, threads=a.threads)


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description="Self-attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser(
        "explain", help="what a pretrained model attends to (default all-MiniLM-L6-v2, offline)"
    )
    ex.add_argument("text", nargs="?", default="The cat sat on the mat.", help="the text ('-' reads stdin)")
    ex.add_argument(
        "--model", default=None,
        help="a BERT-, Llama- or Gemma 3 checkpoint directory or a .gguf file (default MiniLM)",
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
    ft.add_argument(
        "--by", choices=("mass", "effect"), default="mass",
        help="choose by attention mass kept (default), or, with --budget, by the model's loss on "
        "the fitting texts (one pass per layer and per weighting tried)",
    )  # fmt: skip
    ft.add_argument("--windows", default="16,32,64,128,256", help="candidate window sizes (default 16..256)")
    ft.add_argument("--max-texts", type=int, default=200, help="at most this many texts per side")
    ft.add_argument("--out", default="fit", help="directory for fit.json and fit.png (default ./fit)")
    ft.add_argument("--save", default=None, metavar="DIR", help="also save the model with its patterns")
    ft.add_argument("--no-progress", action="store_true", help="no progress bars")
    ft.set_defaults(func=_fit)

    gen = sub.add_parser(
        "generate", help="continue a prompt with a pretrained decoder (a GGUF file or a checkpoint directory)"
    )
    gen.add_argument("model", help="a .gguf file (llama, gemma3) or a Llama/Mistral/Gemma 3 directory")
    gen.add_argument("prompt", help="the text to continue ('-' reads stdin)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--sample", action="store_true", help="sample instead of the greedy choice")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the top tokens up to p")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    gen.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    gen.add_argument("--show-tokens", action="store_true", help="also print the new tokens and their ids")
    gen.set_defaults(func=_generate)

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
            "--model", default=None, help="run or model directory (default CACHE/runs/<the task's corpus>)"
        )
        g.add_argument("--beam", type=int, default=None, help="beam size (default: the run's)")
        g.add_argument("--length-penalty", type=float, default=None, help=lp_help)
        g.add_argument(
            "--show-attention", action="store_true", help="print the cross-attention of the first output"
        )
        g.add_argument("--max-tokens", type=int, default=32, help="tokens drawn in the attention matrix")
        g.add_argument("--cache-dir", default=None, help=cache_help)
        g.set_defaults(func=_task)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .apps.errors import InputError, UsageError
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
