"""Pictures with matplotlib (the ``viz`` extra): a grid of attention heatmaps, and patterns."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._files import atomic_write
from ..patterns import Pattern
from .record import AttentionRecord

__all__ = ["plot_pattern", "plot_record"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("PNG output needs matplotlib: pip install 'attnkit[viz]'.") from None
    return plt


def _save(fig, path: str | os.PathLike, dpi: int) -> Path:
    plt = _pyplot()
    try:
        atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return Path(path)


def plot_record(
    rec: AttentionRecord,
    path: str | os.PathLike,
    *,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    batch: int = 0,
    dpi: int = 110,
) -> Path:
    """Heatmaps of the recorded weights, one per (layer, head): rows are layers, columns heads.
    Token labels are drawn when there are at most 40 tokens. ``layers``/``heads`` index the
    record's lists."""
    plt = _pyplot()
    layers = list(range(len(rec.weights))) if layers is None else layers
    heads = list(range(len(rec.heads))) if heads is None else heads
    for name, vals, n in (("layer", layers, len(rec.weights)), ("head", heads, len(rec.heads))):
        bad = [v for v in vals if not 0 <= v < n]
        if bad or not vals:
            raise ValueError(f"plot_record: expected {name} indices in [0, {n}), but got {vals}.")
    N, S = rec.weights[layers[0]].shape[-2:]
    labels = N <= 40 and S <= 40 and rec.tokens is not None
    cell = 2.2 if labels else 1.4
    size = (cell * len(heads) + 0.6, cell * len(layers) + 0.6)
    fig, axes = plt.subplots(len(layers), len(heads), figsize=size, squeeze=False)
    for r, li in enumerate(layers):
        for c, hi in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(
                rec.weights[li][batch, hi].numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if labels and c == 0:
                ax.set_yticks(range(N), rec.tokens, fontsize=5)
            if labels and r == len(layers) - 1:
                ax.set_xticks(range(S), rec.key_tokens or rec.tokens, fontsize=5, rotation=90)
            if r == 0:
                ax.set_title(f"head {rec.heads[hi]}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {li}", fontsize=8)
    fig.suptitle(f"{rec.model}: attention weights (row = query, column = key)", fontsize=10)
    return _save(fig, path, dpi)


def plot_pattern(pattern: Pattern, n: int, s: int | None = None, path: str | os.PathLike = "pattern.png", *,
                 block: int | None = None, dpi: int = 110) -> Path:  # fmt: skip
    """What each query may see under ``pattern`` (dark = allowed), for ``n`` queries and ``s``
    keys; with ``block``, the kernel's tile grid is drawn over it."""
    plt = _pyplot()
    s = n if s is None else s
    dense = pattern.to_dense(n, s).to(torch.uint8).numpy()
    fig, ax = plt.subplots(figsize=(5, 5 * n / s if s else 5))
    ax.imshow(dense, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    density = 100 * pattern.density(n, s)
    ax.set_title(f"{pattern!r}\nN={n}, S={s}: {density:.1f}% of pairs allowed", fontsize=9)
    if block:
        for x in range(block, s, block):
            ax.axvline(x - 0.5, color="tab:red", lw=0.3, alpha=0.5)
        for y in range(block, n, block):
            ax.axhline(y - 0.5, color="tab:red", lw=0.3, alpha=0.5)
    return _save(fig, path, dpi)
