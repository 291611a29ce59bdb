"""Attention in the terminal: colored weight matrices, top-k lists and head summaries.

Colors are ANSI 256-color backgrounds (a white-to-blue ramp), used only when the stream is a
terminal and ``NO_COLOR`` is not set; without them every cell still shows its weight in percent.
"""

from __future__ import annotations

import os
import sys

from torch import Tensor

from .heads import HeadSummary

__all__ = ["color_enabled", "render_head_summary", "render_matrix", "render_top_k"]

_RAMP = (231, 195, 189, 153, 117, 111, 75, 69, 33, 27, 21, 19)  # light -> dark blue
_RESET = "\x1b[0m"


def color_enabled(stream=None) -> bool:
    """Whether to color output for ``stream`` (default stdout): a TTY, and ``NO_COLOR`` unset."""
    stream = sys.stdout if stream is None else stream
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


def _cell(w: float, color: bool, allowed: bool = True) -> str:
    text = "    · " if not allowed else f"{round(100 * w):>5} "
    if not color:
        return text
    level = min(int(w * len(_RAMP)), len(_RAMP) - 1)
    fg = 30 if level < 6 else 97
    return f"\x1b[48;5;{_RAMP[level]}m\x1b[{fg}m{text}{_RESET}"


def _label(token: str, width: int) -> str:
    token = token.replace("\n", "\\n")
    return token if len(token) <= width else token[: width - 1] + "…"


def render_matrix(
    w: Tensor,
    rows: list[str],
    cols: list[str],
    *,
    color: bool = False,
    max_tokens: int = 32,
    title: str = "",
    allowed: Tensor | None = None,
) -> str:
    """Weights ``(N, S)`` as a table: row = query token, column = key token, cells in percent.

    Only the first ``max_tokens`` rows and columns are drawn (a note says so). ``allowed``
    ``(N, S)`` bool marks positions a pattern hides with "·"."""
    N, S = w.shape
    n, s = min(N, max_tokens), min(S, max_tokens)
    lw = min(max(len(r) for r in rows[:n]) + 5, 18)
    lines = [title] if title else []
    header = " " * lw + "".join(_label(c, 5).rjust(5) + " " for c in cols[:s])
    lines.append(header.rstrip())
    for i in range(n):
        cells = "".join(
            _cell(float(w[i, j]), color, True if allowed is None else bool(allowed[i, j])) for j in range(s)
        )
        lines.append((f"{i:>3} {_label(rows[i], lw - 5):<{lw - 4}}" + cells).rstrip())
    if n < N or s < S:
        lines.append(f"(showing the first {n} of {N} query and {s} of {S} key tokens; see --html for all)")
    lines.append("Row = a token (query), column = a token it may attend to (key); numbers are weights in %, "
                 "each row sums to 100.")  # fmt: skip
    return "\n".join(lines)


def render_top_k(w: Tensor, rows: list[str], cols: list[str], *, k: int = 3) -> str:
    """Each query token's ``k`` most attended key tokens with their weights."""
    k = min(k, w.shape[1])
    vals, idx = w.topk(k, dim=-1)
    width = min(max(len(r) for r in rows), 16)
    lines = [f"Top {k} attended tokens per token:"]
    for i, r in enumerate(rows):
        pairs = ", ".join(
            f"{cols[j]} {100 * float(v):.0f}%" for v, j in zip(vals[i], idx[i].tolist(), strict=True)
        )
        lines.append(f"  {_label(r, width):>{width}} -> {pairs}")
    return "\n".join(lines)


def render_head_summary(summaries: list[HeadSummary], layer_names: list[str] | None = None) -> str:
    """One line per head: layer, head, what it does and the evidence; then counts per label."""
    columns = f"{'layer':>5} {'head':>4}  {'behaviour':<15} {'share':>5} {'spread':>6}  {'most attended':<14}"
    lines = [
        "What each head does (mean weight on each target, from this text's weights):",
        f"  {columns} largest other shares",
    ]
    counts: dict[str, int] = {}
    for s in summaries:
        ranked = [kv for kv in sorted(s.shares.items(), key=lambda kv: -kv[1]) if kv[0] != s.label]
        others = ", ".join(f"{k} {v:.2f}" for k, v in ranked[:2])
        lines.append(f"  {s.layer:>5} {s.head:>4}  {s.label:<15} {s.share:>5.2f} {s.entropy:>6.2f}  "
                     f"{_label(s.focus, 14):<14} {others}")  # fmt: skip
        counts[s.label] = counts.get(s.label, 0) + 1
    lines.append(
        "Heads per behaviour: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    )
    lines.append("share = mean weight a query gives that target; spread = normalized entropy (1 = uniform).")
    return "\n".join(lines)


def render_lost_mass(lost: Tensor, heads: list[int], *, title: str = "") -> str:
    """``lost (L, h)`` shares as a layer x head table in percent."""
    lines = [title] if title else []
    lines.append("        " + "".join(f"{'h' + str(h):>6}" for h in heads) + "    mean")
    for i, row in enumerate(lost.tolist()):
        cells = "".join(f"{100 * x:5.1f}%" for x in row)
        lines.append(f"layer {i:<2}{cells}  {100 * sum(row) / len(row):5.1f}%")
    return "\n".join(lines)
