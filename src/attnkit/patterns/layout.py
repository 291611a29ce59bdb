"""``BlockLayout``: a boolean grid of blocks, the vocabulary of DeepSpeed and OpenAI's kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Grid, Pattern, check_int, rect_states

__all__ = ["BlockLayout"]


@dataclass(frozen=True, repr=False, eq=False)
class BlockLayout(Pattern):
    """Query ``i`` sees key ``j`` when ``layout[i // block, j // block]`` is set.

    The grid is anchored at the top-left corner: it must be
    ``(ceil(N / block), ceil(S / block))``. Compared by identity (it holds a tensor).

    Args:
        layout: 2-D boolean grid (a tensor or nested lists).
        block: Positions per grid cell on both axes.

    Picture, ``BlockLayout([[1, 0, 0], [1, 1, 0], [0, 1, 1]], 2)`` with N=6, S=6::

        ██····
        ██····
        ████··
        ████··
        ··████
        ··████
    """

    layout: torch.Tensor
    block: int

    def __post_init__(self) -> None:
        grid = torch.as_tensor(self.layout).detach().cpu()
        if grid.dim() != 2:
            raise ValueError(f"BlockLayout: expected a 2-D layout, but got layout.shape={tuple(grid.shape)}.")
        if grid.dtype != torch.bool:
            if not ((grid == 0) | (grid == 1)).all():
                raise ValueError(
                    f"BlockLayout: expected a boolean (or 0/1) layout, but got values other "
                    f"than 0 and 1 (dtype={grid.dtype})."
                )
            grid = grid.bool()
        object.__setattr__(self, "layout", grid)
        check_int("BlockLayout", "block", self.block, 1)

    def __repr__(self) -> str:
        rows, cols = self.layout.shape
        return f"BlockLayout(<{rows}x{cols} grid, {int(self.layout.sum())} set>, block={self.block})"

    def check(self, n: int, s: int) -> None:
        want = (-(-n // self.block), -(-s // self.block))
        if tuple(self.layout.shape) != want:
            raise ValueError(
                f"BlockLayout: expected layout.shape == (ceil(N/block), ceil(S/block)) = {want} "
                f"for N={n}, S={s}, block={self.block}, but got {tuple(self.layout.shape)}."
            )

    def mask_mod(self, q_idx, kv_idx, n, s, b=None):
        return self.layout.to(q_idx.device)[q_idx // self.block, kv_idx // self.block]

    def _block_states(self, grid: Grid):
        q0, q1 = grid.q_bounds()
        k0, k1 = grid.k_bounds()
        b = self.block
        return rect_states(self.layout, q0 // b, q1 // b, k0 // b, k1 // b), None
