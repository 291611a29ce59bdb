"""Positional information: sinusoidal and learned embeddings, rotary embeddings (RoPE), ALiBi.

Attention itself is blind to order: permuting the keys permutes nothing in the output. These
modules put position back in, in the four ways checkpoints use:

* :class:`SinusoidalPositionalEncoding` adds fixed sines and cosines to the token embeddings
  (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762);
* :class:`LearnedPositionalEmbedding` adds a trained vector per position (BERT, GPT-2);
* :class:`RotaryEmbedding` rotates queries and keys by position-dependent angles, so their dot
  product depends on the distance only (Su et al. 2021, https://arxiv.org/abs/2104.09864);
  Llama-family checkpoints use the "half" layout, rotating dimension ``i`` with ``i + D/2``;
* :class:`ALiBi` adds ``-slope_h * distance`` to the scores, a bias per head
  (Press et al. 2022, https://arxiv.org/abs/2108.12409).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ALiBi", "LearnedPositionalEmbedding", "RotaryEmbedding", "SinusoidalPositionalEncoding"]


def _positions(positions: Tensor | None, offset: int, length: int, device) -> Tensor:
    """``positions`` as given, or ``offset, ..., offset + length - 1``."""
    if positions is not None:
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise TypeError(f"expected integer positions, but got positions.dtype={positions.dtype}.")
        return positions
    return torch.arange(offset, offset + length, device=device)


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sines and cosines: ``PE[p, 2i] = sin(p / 10000^(2i/C))``, ``PE[p, 2i+1] = cos(...)``.

    Args:
        dim: Model width ``C`` (even).
        max_len: Positions precomputed; longer inputs extend the table on the fly.
        base: The ``10000`` above.

    Shape:
        ``forward(x (B, N, C), offset=0)`` returns ``x + PE[offset : offset + N]``.
    """

    def __init__(self, dim: int, max_len: int = 4096, base: float = 10000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"SinusoidalPositionalEncoding: expected an even dim >= 2, but got dim={dim}.")
        self.dim, self.base = dim, base
        self.register_buffer("table", self._table(max_len), persistent=False)

    def _table(self, length: int) -> Tensor:
        pos = torch.arange(length, dtype=torch.float64)[:, None]
        freq = self.base ** (-torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)
        table = torch.empty(length, self.dim, dtype=torch.float64)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)
        return table.float()

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        pos = _positions(positions, offset, x.shape[-2], x.device)
        need = int(pos.max()) + 1 if pos.numel() else 0
        if need > self.table.shape[0]:
            self.table = self._table(max(need, 2 * self.table.shape[0])).to(self.table.device)
        return x + self.table[pos].to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}"


class LearnedPositionalEmbedding(nn.Embedding):
    """A trained vector per position, ``max_len`` of them.

    Shape:
        ``forward(x (B, N, C), offset=0)`` returns ``x + E[offset : offset + N]``.
    """

    def __init__(self, max_len: int, dim: int, **kwargs) -> None:
        super().__init__(max_len, dim, **kwargs)

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:  # type: ignore[override]
        pos = _positions(positions, offset, x.shape[-2], x.device)
        if pos.numel() and int(pos.max()) >= self.num_embeddings:
            raise ValueError(
                f"LearnedPositionalEmbedding: expected positions < max_len={self.num_embeddings}, but got "
                f"position {int(pos.max())}."
            )
        return x + super().forward(pos).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) of queries and keys.

    Pairs of dimensions are rotated by ``p * theta_i`` with ``theta_i = base^(-2i/D)``.
    ``layout="half"`` pairs dimension ``i`` with ``i + D/2`` (Llama, Mistral, Qwen and GPT-NeoX
    checkpoints); ``layout="interleaved"`` pairs ``2i`` with ``2i + 1`` (the RoFormer paper,
    GPT-J). Angles are computed in float32 as Hugging Face ``transformers`` does, then cast.

    Args:
        head_dim: ``D`` (even), or the rotated part of it (``rotary_dim <= D``, the rest is
            left as is).
        base: ``theta`` (``rope_theta``), 10000 by default.
        layout: ``"half"`` or ``"interleaved"``.
        scaling: Optional context extension, as in ``transformers`` configs:
            ``{"rope_type": "linear", "factor": f}`` (positions divided by ``f``) or
            ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}`` (Llama 3.1's frequency-dependent scaling).

    Shape:
        ``forward(x (B, H, N, D), positions)`` with ``positions`` ``(N,)`` or ``(B, N)``
        integers; returns the rotated ``x``, same shape and dtype.
    """

    def __init__(
        self, head_dim: int, base: float = 10000.0, *, layout: str = "half", scaling: dict | None = None
    ) -> None:
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"RotaryEmbedding: expected an even head_dim >= 2, but got head_dim={head_dim}.")
        if layout not in ("half", "interleaved"):
            raise ValueError(f"RotaryEmbedding: expected layout 'half' or 'interleaved', but got {layout!r}.")
        self.head_dim, self.base, self.layout = head_dim, float(base), layout
        self.scaling = dict(scaling) if scaling else None
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Compute the frequency table (also after ``to_empty`` from the meta device)."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = _scale_frequencies(1.0 / (self.base**exponent), self.scaling)
        if self.inv_freq.is_meta:
            self.inv_freq = inv_freq
        else:
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        self._last: tuple | None = None

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of shape ``positions.shape + (D,)`` in float32, in this layout."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        if self.layout == "half":
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = freqs.repeat_interleave(2, dim=-1)
        return emb.cos(), emb.sin()

    def _tables(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos`` and the signed ``sin`` that :meth:`forward` multiplies by, cast to ``dtype``
        and shaped to broadcast against ``(B, H, N, D)``.

        The last result is kept for the same ``positions`` tensor (same object, unmodified) and
        dtype, so the layers of a model that share this module and its positions (queries and
        keys, every layer, one decoding step) compute them once.
        """
        last = self._last
        if last is not None and last[0] is positions and last[1] == positions._version and last[2] == dtype:
            return last[3]
        cos, sin = self.angles(positions)
        # rotate(x) * sin == roll(x) * signed_sin: the sign moves into the table (negation is
        # exact), so each call does one roll instead of split, negate and concatenate
        half = self.head_dim // 2
        if self.layout == "half":
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        else:
            sin = torch.stack((-sin[..., 0::2], sin[..., 1::2]), dim=-1).flatten(-2)
        if positions.dim() == 2:  # (B, N) -> (B, 1, N, D): one position row per batch item
            cos, sin = cos[:, None], sin[:, None]
        result = (cos.to(dtype), sin.to(dtype))
        self._last = (positions, positions._version, dtype, result)
        return result

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        if x.shape[-1] < self.head_dim:
            raise ValueError(
                f"RotaryEmbedding: expected x.shape[-1] >= head_dim={self.head_dim}, but got {x.shape[-1]}."
            )
        cos, sin = self._tables(positions, x.dtype)
        if x.shape[-1] == self.head_dim:
            return torch.addcmul(x * cos, self._partner(x), sin)  # one pass fewer than mul + add
        rot, rest = x[..., : self.head_dim], x[..., self.head_dim :]
        return torch.cat((torch.addcmul(rot * cos, self._partner(rot), sin), rest), dim=-1)

    def _partner(self, x: Tensor) -> Tensor:
        """Each dimension's rotation partner: ``i + D/2`` (half) or ``i ^ 1`` (interleaved)."""
        if self.layout == "half":
            return x.roll(self.head_dim // 2, dims=-1)
        return x.view(*x.shape[:-1], -1, 2).flip(-1).flatten(-2)

    def extra_repr(self) -> str:
        scaling = f", scaling={self.scaling}" if self.scaling else ""
        return f"{self.head_dim}, base={self.base:g}, layout={self.layout!r}{scaling}"


def _scale_frequencies(inv_freq: Tensor, scaling: dict | None) -> Tensor:
    """Context-extension rescaling of RoPE frequencies (``rope_type`` linear or llama3)."""
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(
        f"RotaryEmbedding: expected scaling rope_type 'default', 'linear' or 'llama3', but got {kind!r}."
    )


class ALiBi(nn.Module):
    """Attention with linear biases: ``score(p, j) -= slope_h * |p - j|``.

    Slopes follow Press et al.: for ``H`` a power of two, ``2^(-8h/H)`` for ``h = 1..H``;
    otherwise those of the next lower power of two, then every other slope of the next
    higher one.

    Args:
        num_heads: ``H``.
        symmetric: Penalize distance both ways (encoders); if False, only past keys are
            expected (use with a causal pattern) and the bias is ``-slope * (p - j)``.

    Shape:
        ``forward(n, s)`` returns the additive bias ``(1, H, N, S)`` (queries aligned
        bottom-right, as with a KV cache), to pass as ``mask=`` to attention.
    """

    def __init__(self, num_heads: int, *, symmetric: bool = True) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"ALiBi: expected num_heads >= 1, but got num_heads={num_heads}.")
        self.num_heads, self.symmetric = num_heads, symmetric
        self.register_buffer("slopes", self.compute_slopes(num_heads), persistent=False)

    @staticmethod
    def compute_slopes(num_heads: int) -> Tensor:
        """The per-head slopes ``(H,)``."""

        def powers(n: int) -> list[float]:
            start = 2.0 ** (-8.0 / n)
            return [start ** (i + 1) for i in range(n)]

        low = 2 ** (num_heads.bit_length() - 1)
        slopes = powers(low)
        if low < num_heads:
            slopes += powers(2 * low)[0::2][: num_heads - low]
        return torch.tensor(slopes, dtype=torch.float32)

    def forward(self, n: int, s: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
        p = torch.arange(n, device=self.slopes.device)[:, None] + (s - n)
        dist = (p - torch.arange(s, device=self.slopes.device)[None, :]).to(torch.float32)
        dist = dist.abs() if self.symmetric else dist
        return (-self.slopes[:, None, None] * dist)[None].to(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_heads}, symmetric={self.symmetric}"
