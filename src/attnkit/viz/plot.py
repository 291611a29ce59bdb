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
    if pattern.per_head:  # one picture per distinct pattern, side by side
        groups = pattern.groups()
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 4 * n / s), squeeze=False)
        for ax, (p, heads) in zip(axes[0], groups, strict=True):
            ax.imshow(p.to_dense(n, s).reshape(-1, n, s)[0].to(torch.uint8).numpy(), cmap="Greys",
                      vmin=0, vmax=1, interpolation="nearest", aspect="auto")  # fmt: skip
            ax.set_title(f"heads {', '.join(map(str, heads))}\n{p!r}", fontsize=8)
            ax.set_xlabel("key position")
        axes[0][0].set_ylabel("query position")
        return _save(fig, path, dpi)
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


def plot_fit(report, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Heat map of a fit (:class:`attnkit.apps.fit.FitReport`): layers x heads, coloured by the
    density of each head's chosen pattern, labelled with the pattern."""
    plt = _pyplot()
    cov = report.coverage
    density = torch.tensor([[float(cov.density[i, h, c]) for h, c in enumerate(row)]
                            for i, row in enumerate(report.choice)])  # fmt: skip
    L, H = density.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * H, 0.9 + 0.55 * L))
    image = ax.imshow(density.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(report.choice):
        for h, c in enumerate(row):
            ax.text(h, i, _short(cov.candidates[c]), ha="center", va="center", fontsize=7,
                    color="white" if density[i, h] < 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(H), [f"h{h}" for h in range(H)])
    ax.set_yticks(range(L), [f"layer {i}" for i in range(L)])
    ax.set_title(f"{report.model}: the pattern fitted to each head (colour: its density)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, label="density")
    return _save(fig, path, dpi)


def _short(p: Pattern) -> str:
    """A few characters for a pattern: w64 (window), w64+s4 (window and first tokens), st64
    (strided), full; the repr's start otherwise."""
    from ..patterns import Full, Global, Or, SlidingWindow, Strided

    if isinstance(p, Full):
        return "full"
    if isinstance(p, SlidingWindow):
        return f"w{p.before}"
    if isinstance(p, Strided):
        return f"st{p.stride}"
    parts = p.parts if isinstance(p, Or) else ()
    if len(parts) == 2 and isinstance(parts[0], SlidingWindow) and isinstance(parts[1], Global):
        return f"w{parts[0].before}+s{len(parts[1].indices)}"
    return repr(p)[:8]


def plot_rollout(flow, tokens: list[str], path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Attention rollout ``(N, N)`` (see :func:`attnkit.viz.rollout`) as a labelled heat map."""
    plt = _pyplot()
    n = flow.shape[0]
    size = min(12, 2 + 0.3 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(flow.float().numpy(), cmap="viridis", vmin=0, aspect="auto")
    ax.set_xticks(range(n), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(n), tokens, fontsize=7)
    ax.set_xlabel("input token")
    ax.set_ylabel("position at the top layer")
    ax.set_title("Attention rollout (Abnar & Zuidema 2020)", fontsize=9)
    return _save(fig, path, dpi)
