"""FlexAttention block masks and mask rules made from attnkit patterns.

:func:`block_mask` builds FlexAttention's ``BlockMask`` directly from the pattern's
:meth:`~attnkit.patterns.Pattern.block_map` (full tiles run without a mask, partial ones with
the element rule), so no ``N x S`` evaluation and no compile step are spent on the mask.
:func:`mask_mod` is the element rule in FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``
form. It reads precomputed tables (tile states and the partial tiles' element masks) and never
calls back into Python pattern code, so FlexAttention can trace and compile it for any
pattern, compositions and per-batch patterns included.

The ``flex`` backend runs on these masks; users reach them as :mod:`attnkit.integrations.flex`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..patterns import FULL, PARTIAL, Pattern

__all__ = ["block_mask", "block_mask_bytes", "mask_mod"]


def mask_mod(pattern: Pattern, n: int, s: int, *, block: int = 128, device=None) -> Callable:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` equal to ``pattern`` on ``(n, s)``.

    Args:
        pattern: Any attnkit pattern.
        n: Query length ``N``; s: key length ``S``.
        block: Tile size of the lookup tables (memory: one int8 per tile plus ``block**2``
            booleans per partial tile).
        device: Device of the tables (that of the attention inputs).

    A :class:`~attnkit.patterns.PerHead` pattern reads ``h``: each head gets its own rule.
    """
    if pattern.per_head:
        return _per_head_rule(pattern, n, s, block, device)
    bm = pattern.block_map(n, s, block)
    states = bm.states
    partial = (states == PARTIAL).nonzero()
    tile_id = torch.full(states.shape, -1, dtype=torch.int64)
    tile_id[partial[:, 0], partial[:, 1]] = torch.arange(partial.shape[0])
    if partial.shape[0]:
        masks, _ = pattern.tile_masks(n, s, (block, block), partial[:, 0], partial[:, 1])
    else:
        masks = torch.zeros((1, block, block), dtype=torch.bool)
    if pattern.batch_size is None:
        masks = masks[None]  # a batch dimension of one, read by every b
    states, tile_id, masks = (t.to(device) for t in (states, tile_id, masks))
    per_batch = pattern.batch_size is not None
    # the lengths as tensors, not Python ints: torch.compile guards on captured ints, so every
    # new length would compile the kernel again; tensors are inputs of the one graph
    last_q = torch.tensor(n - 1, device=device)
    last_k = torch.tensor(s - 1, device=device)

    def rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        inside = (q_idx <= last_q) & (kv_idx <= last_k)
        qi, ki = torch.minimum(q_idx, last_q), torch.minimum(kv_idx, last_k)
        state = states[qi // block, ki // block]
        tid = tile_id[qi // block, ki // block].clamp(min=0)
        elem = masks[b if per_batch else 0, tid, qi % block, ki % block]
        return inside & ((state == FULL) | ((state == PARTIAL) & elem))

    rule.__name__ = f"attnkit_{type(pattern).__name__.lower()}"
    return rule


def _per_head_rule(pattern, n: int, s: int, block: int, device) -> Callable:
    groups = pattern.groups()
    rules = [mask_mod(p, n, s, block=block, device=device) for p, _ in groups]
    head_group = torch.empty(pattern.num_heads, dtype=torch.int64)
    for g, (_, heads) in enumerate(groups):
        head_group[list(heads)] = g
    head_group = head_group.to(device)

    def rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        group = head_group[h]
        out = rules[0](b, h, q_idx, kv_idx)
        for g in range(1, len(rules)):
            out = torch.where(group == g, rules[g](b, h, q_idx, kv_idx), out)
        return out

    rule.__name__ = "attnkit_perhead"
    return rule


def block_mask(
    pattern: Pattern,
    n: int,
    s: int | None = None,
    *,
    block: int = 128,
    num_heads: int | None = None,
    device=None,
):
    """FlexAttention ``BlockMask`` for ``pattern`` on an ``(n, s)`` attention, built from its block map.

    Args:
        pattern: Any attnkit pattern (per-batch patterns give one mask per batch item).
        n, s: Query and key lengths (``s`` defaults to ``n``).
        block: FlexAttention's ``BLOCK_SIZE`` (128 by default, as FlexAttention's).
        num_heads: Heads of the mask (``None``: one, broadcast to every head; a
            :class:`~attnkit.patterns.PerHead` pattern has one per head).
        device: Device of the mask.

    Raises:
        ImportError: This torch has no FlexAttention.
    """
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as e:  # pragma: no cover - depends on the torch build
        raise ImportError("FlexAttention block masks need torch >= 2.5 with FlexAttention") from e
    s = n if s is None else s
    if pattern.per_head:
        if num_heads not in (None, pattern.num_heads):
            raise ValueError(
                f"block_mask(): expected num_heads=None or {pattern.num_heads} for {pattern!r}, "
                f"but got num_heads={num_heads}."
            )
        H = pattern.num_heads
        maps = {p: p.block_map(n, s, block).states for p, _ in pattern.groups()}
        states = torch.stack([maps[p] for p in pattern.heads]).to(device)  # (H, nq, nk)
    else:
        H = num_heads or 1
        states = pattern.block_map(n, s, block).states.to(device)[None]  # (1, nq, nk)
    partial, full = states == PARTIAL, states == FULL

    def blocks(sel: Tensor) -> tuple[Tensor, Tensor]:
        count = sel.sum(-1, dtype=torch.int32)
        # each row lists its selected tile columns first (stable: in increasing order)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count, order

    (kv_num, kv_idx), (full_num, full_idx) = blocks(partial), blocks(full)
    B = pattern.batch_size or 1

    def shaped(t: Tensor) -> Tensor:  # (1 or H, ...) -> (B, H, ...)
        return t.expand(B, H, *t.shape[1:]).contiguous()

    return BlockMask.from_kv_blocks(
        shaped(kv_num),
        shaped(kv_idx),
        shaped(full_num),
        shaped(full_idx),
        BLOCK_SIZE=block,
        mask_mod=mask_mod(pattern, n, s, block=block, device=device),
        seq_lengths=(n, s),
    )


def block_mask_bytes(mask) -> int:
    """Bytes a ``BlockMask`` holds: its block tables and the tables its ``mask_mod`` reads (what
    a cache of masks must count; ``sys.getsizeof`` sees only the Python object)."""
    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, Tensor) and id(t) not in seen:
            seen[id(t)] = t.numel() * t.element_size()

    for value in vars(mask).values():
        add(value)
        if isinstance(value, (tuple, list)):
            for v in value:
                add(v)
    stack, visited = [getattr(mask, "mask_mod", None)], set()
    while stack:
        fn = stack.pop()
        if id(fn) in visited:
            continue
        visited.add(id(fn))
        for cell in getattr(fn, "__closure__", None) or ():
            value = cell.cell_contents
            add(value)
            if callable(value):
                stack.append(value)
            elif isinstance(value, (list, tuple)):
                stack.extend(v for v in value if callable(v))
    return sum(seen.values())
