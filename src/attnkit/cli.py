"""``attnkit`` command line: thin ``argparse`` subcommands over :mod:`attnkit.apps`.

attnkit demo [TEXT] [--causal]          self-attention step by step, with real numbers
attnkit patterns SPEC [-n N] [-s S]     draw a pattern and its block map
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .apps.demo import render, walkthrough

    w = walkthrough(args.text, d_model=args.d_model, d_k=args.d_k, seed=args.seed, causal=args.causal)
    print(render(w))
    return 0


def _patterns(args: argparse.Namespace) -> int:
    from .patterns import parse_pattern

    pattern = parse_pattern(args.spec)
    n, s = args.n, args.s if args.s is not None else args.n
    print(pattern.to_string(n, s, block=args.tile, width=args.width))
    bm = pattern.block_map(n, s, args.block)
    c = bm.counts
    print(
        f"\nallowed pairs: {pattern.num_allowed(n, s):,} of {n * s:,} ({100 * pattern.density(n, s):.2f}%)"
        f"\n{args.block}x{args.block} tiles: {c['full']} full, {c['partial']} partial, {c['empty']} empty"
        f" -> a block-sparse kernel computes {100 * bm.visited_fraction():.2f}% of the dense work"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description="Self-attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="self-attention step by step on a sentence, with real numbers")
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
    pat.set_defaults(func=_patterns)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"attnkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
