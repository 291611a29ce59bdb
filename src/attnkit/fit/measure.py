"""Attention mass each candidate pattern keeps, per layer and head, measured block by block.

For every attention call the model makes, the hook sees ``q (B, H, N, D)``, ``k (B, Hkv, S,
D)``, the layer's own pattern and mask. Query rows are taken a block at a time: the block's
scores against every key, masked by what the layer allows, their log-sum-exp, the weights
``exp(score - lse)``, and, per candidate, the weights summed over the keys the candidate
allows (only over the key tiles its block map says are not empty). Memory is one block of
scores, ``B * H * rows * S``, capped near 2**23 elements whatever the length.

Densities count allowed (query, key) pairs over the full ``N x S`` square, the layer's own
pattern and masks included: a causal model's dense attention has density about 0.5, and a
window candidate on it the share of the square that window-and-causal attention computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._hooks import AttentionCall, register_attention_hook
from ..patterns import EMPTY, Full, Global, Pattern, SlidingWindow, Strided

__all__ = ["Coverage", "coverage", "default_candidates"]

#: Elements of one block of scores (B * H * rows * S): 32 MiB in float32.
BLOCK_ELEMENTS = 1 << 23
#: Key tile of the candidates' block maps when selecting the columns to sum over.
KEY_TILE = 64


def default_candidates(windows: Sequence[int] = (16, 32, 64, 128, 256), sinks: int = 4) -> list[Pattern]:
    """Windows of several sizes (symmetric; a causal layer keeps only their past half), the
    same windows plus the first ``sinks`` tokens (StreamingLLM's attention sinks; Xiao et al.
    2023), a strided pattern per window, and dense attention."""
    out: list[Pattern] = []
    for w in windows:
        local = SlidingWindow(w, w)
        out += [local, local | Global(tuple(range(sinks))), Strided(w)]
    return [*out, Full()]


@dataclass
class Coverage:
    """Attention mass each candidate pattern keeps, per layer and head.

    Attributes:
        layers: Names of the attention layers, in the order they first ran.
        candidates: The candidate patterns.
        mass: ``(L, H, C)``: the share of each head's attention mass that candidate ``c``
            keeps (the weights it allows, summed over the rows that see any key, over the
            number of such rows), over every recorded input.
        density: ``(L, H, C)``: the share of the ``N x S`` pairs that candidate ``c``
            intersected with the layer's own pattern and masks allows, over the same inputs.
        rows: ``(L, H)``: query rows that saw at least one key, which the masses average over.
        own: Per layer, the pattern the model ran it with (None: no pattern).
        own_density: ``(L, H)``: the share of pairs the layer's own pattern and masks allow.
    """

    layers: list[str]
    candidates: list[Pattern]
    mass: Tensor
    density: Tensor
    rows: Tensor
    own: list[Pattern | None]
    own_density: Tensor

    def table(self, keep: float = 0.95) -> str:
        """Per layer, each head's cheapest candidate keeping ``keep`` of its mass, as text."""
        lines = []
        choice = self.cheapest(keep)
        for i, name in enumerate(self.layers):
            cells = [
                f"h{h}:{self.candidates[c]!r} keeps {self.mass[i, h, c]:.2f} at density "
                f"{self.density[i, h, c]:.2f}"
                for h, c in enumerate(choice[i].tolist())
            ]
            lines.append(f"{name}:\n  " + "\n  ".join(cells))
        return "\n".join(lines)

    def cheapest(self, keep: float) -> Tensor:
        """``(L, H)`` index of the lowest-density candidate keeping at least ``keep`` of the mass
        (the highest-mass one where none does)."""
        order = torch.argsort(self.density, dim=-1, stable=True)  # cheapest first, per head
        ok = self.mass.gather(-1, order) >= keep
        first = ok.float().argmax(-1, keepdim=True)
        cheapest = order.gather(-1, first)[..., 0]
        return torch.where(ok.any(-1), cheapest, self.mass.argmax(-1))


class _Sums:
    """Running sums of one attention layer over every call and input."""

    def __init__(self, name: str, num_heads: int, num_candidates: int, own: Pattern | None) -> None:
        self.name, self.own = name, own
        self.kept = torch.zeros(num_heads, num_candidates, dtype=torch.float64)
        self.allowed = torch.zeros(num_heads, num_candidates, dtype=torch.float64)
        self.own_allowed = torch.zeros(num_heads, dtype=torch.float64)
        self.rows = torch.zeros(num_heads, dtype=torch.float64)
        self.pairs = 0.0


def coverage(
    model: nn.Module,
    inputs: Iterable,
    candidates: Sequence[Pattern],
    *,
    forward: Callable[[nn.Module, object], object] | None = None,
) -> Coverage:
    """Run ``model`` on each of ``inputs`` and measure the attention mass each candidate keeps.

    Args:
        model: An attnkit model, or a Hugging Face model on the attnkit integration.
        inputs: What the model is called with, one batch per item (e.g. token id tensors).
        candidates: Patterns to score (see :func:`default_candidates`); one pattern for every
            head (not :class:`~attnkit.patterns.PerHead`).
        forward: ``forward(model, batch)``; default ``model(batch)``.

    Returns:
        A :class:`Coverage` over every layer and head.

    Raises:
        ValueError: No candidate, a per-head candidate, no input, or a model whose layers never
            call attnkit attention.
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("coverage(): expected at least one candidate pattern, but got none.")
    for i, c in enumerate(candidates):
        if not isinstance(c, Pattern) or c.per_head:
            raise ValueError(
                f"coverage(): expected candidates[{i}] to be one Pattern for every head, but got {c!r}."
            )
    run = forward or (lambda m, batch: m(batch))
    names = {id(m): n for n, m in model.named_modules()}
    sums: dict[int, _Sums] = {}
    order: list[int] = []

    def observe(call: AttentionCall) -> None:
        key = id(call.module)
        if key not in names:
            return  # another model's attention
        if key not in sums:
            name = names[key] or type(call.module).__name__
            sums[key] = _Sums(name, call.q.shape[1], len(candidates), call.pattern)
            order.append(key)
        _add_call(sums[key], call, candidates)

    batches = 0
    handle = register_attention_hook(observe)
    try:
        with torch.no_grad():
            for batch in inputs:
                run(model, batch)
                batches += 1
    finally:
        handle.remove()
    if not batches:
        raise ValueError("coverage(): expected at least one input batch, but got none.")
    if not sums:
        raise ValueError("coverage(): the model ran no attnkit attention layer.")
    heads = {sums[k].kept.shape[0] for k in order}
    if len(heads) > 1:
        raise ValueError(
            f"coverage(): expected every attention layer to have the same heads, but got {heads}."
        )
    layers = [sums[k] for k in order]
    rows = torch.stack([s.rows for s in layers])
    return Coverage(
        layers=[s.name for s in layers],
        candidates=candidates,
        mass=(torch.stack([s.kept for s in layers]) / rows.clamp(min=1)[..., None]).float(),
        density=torch.stack([s.allowed / max(s.pairs, 1.0) for s in layers]).float(),
        rows=rows,
        own=[s.own for s in layers],
        own_density=torch.stack([s.own_allowed / max(s.pairs, 1.0) for s in layers]).float(),
    )


def _add_call(acc: _Sums, call: AttentionCall, candidates: Sequence[Pattern]) -> None:
    """Add one attention call's kept mass, rows and allowed pairs to ``acc``."""
    q, k = call.q.detach(), call.k.detach()
    B, H, N, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dev = q.device
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D**-0.5 if call.scale is None else call.scale
    k = k.to(ct).repeat_interleave(H // Hkv, dim=1)  # (B, H, S, D)
    q = q.to(ct)
    rows = max(1, min(N, BLOCK_ELEMENTS // max(B * H * S, 1)))
    acc.pairs += float(B * N * S)
    maps = {c: c.block_map(N, S, (rows, KEY_TILE)).states for c in candidates if c.batch_size is None}

    def add(sums: Tensor, c: int | None, value: Tensor) -> None:  # value (B|1, H, n, m) -> per head
        total = value.sum((0, 2, 3), dtype=torch.float64).cpu()
        if c is None:
            sums += total
        else:
            sums[:, c] += total

    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        allowed = _own_allowed(call, r0, r1, H, N, S, dev)  # (B|1, H|1, n, S) bool
        scores = torch.matmul(q[:, :, r0:r1], k.transpose(-1, -2)) * scale  # (B, H, n, S)
        bias = _mask_rows(call.mask, r0, r1, N)
        if bias is not None and bias.dtype != torch.bool:
            scores = scores + bias.to(ct)
            allowed = allowed & (bias > torch.finfo(bias.dtype).min / 2)  # -inf or "min" masking
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        live = torch.isfinite(lse)  # (B, H, n, 1): rows that see a key
        probs = torch.exp(scores - lse.masked_fill(~live, 0.0)).masked_fill(~live, 0.0)
        allowed = allowed.expand(B, H, r1 - r0, S)
        add(acc.rows, None, live)
        add(acc.own_allowed, None, allowed)
        qi = torch.arange(r0, r1, device=dev).view(-1, 1)
        for c, cand in enumerate(candidates):
            if isinstance(cand, Full):  # keeps every allowed weight: the row's whole mass
                add(acc.kept, c, live)
                add(acc.allowed, c, allowed)
                continue
            cols = _columns(maps.get(cand), r0 // rows, S)
            if cols is None:
                rule = cand.evaluate(qi, torch.arange(S, device=dev).view(1, -1), N, S)
                inside = rule.view(-1, 1, r1 - r0, S) & allowed
                add(acc.kept, c, probs * inside)
            else:
                cols = cols.to(dev)
                rule = cand.evaluate(qi, cols.view(1, -1), N, S)  # (n, m) or (B, n, m)
                inside = rule.view(-1, 1, r1 - r0, cols.numel()) & allowed[..., cols]
                add(acc.kept, c, probs[..., cols] * inside)
            add(acc.allowed, c, inside)


def _columns(states: Tensor | None, row_block: int, S: int) -> Tensor | None:
    """Key indices in the tiles of ``row_block`` that a candidate's block map does not call
    empty; None (every key) when there is no map or when most tiles are live."""
    if states is None:
        return None
    live = (states[row_block] != EMPTY).nonzero().flatten()
    if live.numel() * 2 > states.shape[1]:
        return None
    cols = (live.view(-1, 1) * KEY_TILE + torch.arange(KEY_TILE)).flatten()
    return cols[cols < S]


def _own_allowed(call: AttentionCall, r0: int, r1: int, H: int, N: int, S: int, dev) -> Tensor:
    """What the layer's pattern and boolean mask let rows ``r0:r1`` see, broadcastable to
    ``(B, H, r1 - r0, S)``."""
    qi, kj = torch.arange(r0, r1, device=dev).view(-1, 1), torch.arange(S, device=dev).view(1, -1)
    allowed = torch.ones(1, 1, r1 - r0, S, dtype=torch.bool, device=dev)
    p = call.pattern
    if p is not None and p.per_head:
        per = {g: g.evaluate(qi, kj, N, S) for g, _ in p.groups()}
        shape = torch.broadcast_shapes(*(t.shape[:-2] for t in per.values()))
        heads = [per[g].expand(*shape, r1 - r0, S) for g in p.heads]
        allowed = torch.stack(heads, dim=-3).view(-1, H, r1 - r0, S)  # (B|1, H, n, S)
    elif p is not None:
        allowed = p.evaluate(qi, kj, N, S).view(-1, 1, r1 - r0, S)
    mask = _mask_rows(call.mask, r0, r1, N)
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    return allowed


def _mask_rows(mask: Tensor | None, r0: int, r1: int, N: int) -> Tensor | None:
    """Rows ``r0:r1`` of a mask broadcastable to ``(B, H, N, S)``, as a 4-d tensor."""
    if mask is None:
        return None
    m = mask.detach().reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return m[:, :, r0:r1] if m.shape[2] == N and N > 1 else m
