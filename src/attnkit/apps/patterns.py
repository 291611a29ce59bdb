"""``attnkit patterns``: draw a pattern and say what a block-sparse kernel computes of it."""

from __future__ import annotations

from ..patterns import parse_pattern
from .errors import argument, positive

__all__ = ["run"]


def run(spec: str, *, n: int = 512, s: int | None = None, tile: int | None = None, width: int = 64,
        block: int = 64, png: str | None = None) -> int:  # fmt: skip
    """Print the pattern's terminal art for an ``(n, s)`` matrix, its allowed pairs and its
    ``block``-tile counts (and write a picture to ``png``)."""
    with argument("SPEC"):
        pattern = parse_pattern(spec)
    s = n if s is None else s
    positive(block=block, width=width)
    with argument("SPEC/-n/-s/--tile"):
        drawing = pattern.to_string(n, s, block=tile, width=width)
    print(drawing)
    groups = pattern.groups() if pattern.per_head else [(pattern, (0,))]
    num_heads = sum(len(heads) for _, heads in groups)
    total = num_heads * n * s * (pattern.batch_size or 1)
    visited = sum(len(heads) * p.block_map(n, s, block).visited_fraction() for p, heads in groups)
    c = pattern.block_map(n, s, block).counts  # a PerHead's: the union of its heads
    heads_note, union_note = (" over all heads", " (union of the heads)") if pattern.per_head else ("", "")
    print(
        f"\nallowed pairs: {pattern.num_allowed(n, s):,} of {total:,} ({100 * pattern.density(n, s):.2f}%)"
        f"{heads_note}\n{block}x{block} tiles: {c['full']} full, {c['partial']} partial, "
        f"{c['empty']} empty{union_note} -> a block-sparse kernel computes "
        f"{100 * visited / num_heads:.2f}% of the dense work"
    )
    if png:
        from ..viz.plot import plot_pattern

        path = plot_pattern(pattern, n, s, png, block=block)
        print(f"wrote {path}")
    return 0
