"""``MultiHeadAttention``: ``Concat(head_1, ..., head_H) W^O`` on attnkit's backends.

Each head ``h`` attends with its own projections, ``head_h = attention(x W_h^Q, c W_h^K,
c W_h^V)``, where ``c`` is ``x`` itself (self-attention) or another sequence (cross-attention,
a decoder attending to its encoder). With ``num_kv_heads < num_heads`` groups of query heads
share one key/value head (GQA; MQA when ``num_kv_heads == 1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._hooks import AttentionCall, call_attention_hooks, hooks_active
from ..functional import attention
from ..patterns import Pattern
from ._rows import row_blocks
from .kv_cache import KVCache
from .positional import RotaryEmbedding

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention(nn.Module):
    """Multi-head attention with GQA/MQA, patterns, masks and a KV cache.

    Args:
        embed_dim: Model width ``C`` of the queries and of the output.
        num_heads: Query heads ``H``.
        num_kv_heads: Key/value heads ``Hkv`` (must divide ``H``); default ``H``.
        context_dim: Width of the context that keys and values are made from
            (cross-attention); default ``embed_dim``.
        head_dim: Per-head width ``D``; default ``embed_dim // num_heads``.
        bias: Whether the four projections have biases.
        dropout: Dropout on the attention weights while training.
        batch_first: Accepted only as True (what torch's ``batch_first=True`` means): every
            attnkit module reads ``(B, N, C)``. ``False``, torch's default ``(L, N, E)``
            layout, is refused with a ``ValueError``: transpose such inputs with
            ``x.transpose(0, 1)``.
        pattern: Default :class:`~attnkit.patterns.Pattern` (e.g. ``Causal()``), replaceable
            per call.
        backend: Attention backend, ``"auto"`` by default.
        rotary: A :class:`~attnkit.nn.RotaryEmbedding` applied to queries and keys of
            self-attention (keys are cached rotated, as Llama-family models do).
        qk_norm: A factory ``qk_norm(head_dim) -> nn.Module`` making ``q_norm`` and ``k_norm``,
            applied to each head's queries and keys after the projections and before the
            rotary embedding (QK-norm: Gemma 3, OLMo 2, Qwen 3); None for none.
        scale: The scores' scale; default ``head_dim ** -0.5``.
        device, dtype: Factory arguments of the parameters.

    With :func:`attnkit.distributed.set_context_parallel`, ``x`` and ``context`` are this
    rank's shards of the sequences and attention runs through
    :func:`attnkit.distributed.context_parallel_attention` (positions count globally; no KV
    cache, weights, ``key_mask`` or attention dropout then: padding is a ``KeyPadding``
    pattern).

    Shape:
        - ``x``: ``(B, N, C)`` (batch first; torch's module defaults to ``(N, B, C)``).
        - ``context``: ``(B, S, context_dim)``; ``None`` for self-attention.
        - output: ``(B, N, C)``; weights ``(B, H, N, S)`` per head when requested.

    It loads ``torch.nn.MultiheadAttention`` state dicts (``load_state_dict`` translates the
    packed ``in_proj_weight``) and :meth:`from_torch` builds one from such a module, with the
    same outputs on the same inputs.

    Example:
        >>> mha = MultiHeadAttention(64, 8, num_kv_heads=2, pattern=patterns.Causal())
        >>> mha(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    #: A :class:`attnkit.distributed.ContextParallel` (set by ``set_context_parallel``) or None.
    context_parallel = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        context_dim: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool | None = None,
        pattern: Pattern | None = None,
        backend: str = "auto",
        rotary: RotaryEmbedding | None = None,
        qk_norm: Callable[[int], nn.Module] | None = None,
        scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MultiHeadAttention: expected {name} >= 1, but got {name}={value!r}.")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"MultiHeadAttention: expected num_heads to be a multiple of num_kv_heads, but got "
                f"num_heads={num_heads}, num_kv_heads={num_kv_heads}."
            )
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"MultiHeadAttention: expected embed_dim divisible by num_heads, but got "
                    f"embed_dim={embed_dim}, num_heads={num_heads} (head dim would be "
                    f"{embed_dim / num_heads:.2f}); pass head_dim= to choose it."
                )
            head_dim = embed_dim // num_heads
        if batch_first is not None and batch_first is not True:
            raise ValueError(
                "MultiHeadAttention: expected batch_first=True or None, but got "
                f"batch_first={batch_first!r}. attnkit modules read (B, N, C) inputs (torch's "
                "nn.MultiheadAttention defaults to (L, N, E)); pass x.transpose(0, 1) for "
                "sequence-first tensors."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiHeadAttention: expected 0 <= dropout < 1, but got dropout={dropout}.")
        if pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"MultiHeadAttention: expected a Pattern, but got {type(pattern).__name__}.")
        context_dim = embed_dim if context_dim is None else context_dim
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim, self.context_dim = head_dim, context_dim
        self.dropout = dropout
        self.pattern, self.backend = pattern, backend
        if rotary is not None and not isinstance(rotary, RotaryEmbedding):
            raise TypeError(
                f"MultiHeadAttention: expected a RotaryEmbedding, but got {type(rotary).__name__}."
            )
        self.rotary = rotary
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(context_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(context_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)
        self.q_norm = None if qk_norm is None else qk_norm(head_dim)
        self.k_norm = None if qk_norm is None else qk_norm(head_dim)
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"MultiHeadAttention: expected a finite scale > 0 or None, but got scale={scale!r}."
            )
        self.scale = scale
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(_translate_torch_state_dict, with_module=True)

    def reset_parameters(self) -> None:
        """Xavier-uniform projections and zero biases, as ``torch.nn.MultiheadAttention``."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        pattern: Pattern | None = None,
        return_weights: bool = False,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        last_rows: int | None = None,
        **unknown: object,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``x`` to itself or to ``context``.

        Args:
            x: Queries' input ``(B, N, C)``.
            context: Keys' and values' input ``(B, S, context_dim)`` for cross-attention;
                ``None`` for self-attention.
            mask: Bool (``True`` = may attend) or float (added to the scores) tensor
                broadcastable to ``(B, H, N, S)``, e.g. ``(N, S)``.
            key_mask: ``(B, S)`` bool, ``True`` for real keys that may be attended (the
                complement of torch's ``key_padding_mask``, which attnkit refuses by name:
                pass ``key_mask=~key_padding_mask``).
            pattern: Replaces the module's default pattern for this call.
            return_weights: Also return the per-head weights ``(B, H, N, S)`` (runs the
                ``reference`` backend).
            cache: A :class:`KVCache`. Self-attention appends this call's keys and values
                and attends over everything cached (use a bottom-right ``Causal()`` pattern
                so step-by-step decoding equals the full forward). Cross-attention computes
                the context's keys and values on the first call and reuses them after
                (``context`` may then be ``None``).
            positions: Integer positions ``(N,)`` or ``(B, N)`` of ``x``'s tokens for the rotary
                embedding; default ``L, ..., L + N - 1`` where ``L`` is the cache's length
                (0 without a cache). Left-padded batches pass their own.
            last_rows: Self-attention only: compute the output of the last ``last_rows``
                positions of ``x`` alone. Keys and values still come from every position
                (and go into the cache); only those rows' queries attend, as the last
                positions of a cache would, and only they are projected out. A decoder's last
                layer needs no more when only the last logits are wanted.

        Returns:
            ``out (B, N, C)`` (``(B, last_rows, C)``), or ``(out, weights)`` if ``return_weights``.

        torch's keywords that mean something else here are refused by name with the
        replacement: ``key_padding_mask``/``attn_mask`` (the opposite boolean meaning; see
        docs/masks.md), ``need_weights`` (torch's defaults to True and averages the heads;
        attnkit returns per-head weights with ``return_weights=True``), ``is_causal`` (pass
        ``pattern=Causal()``), ``average_attn_weights``.
        """
        reject_unknown_keywords(type(self).__name__, unknown)
        self._check_input("x", x, self.embed_dim)
        cp = self.context_parallel
        if cp is not None:
            self._check_context_parallel(cache, return_weights, key_mask)
        if last_rows is not None:
            self._check_last_rows(last_rows, x, context, cp)
        blocks = None
        widest = max(self.num_heads, self.num_kv_heads) * self.head_dim
        if context is None and cp is None and not (cache is not None and cache.static):
            blocks = row_blocks(x.shape[1], widest, x.element_size() * x.shape[0])
        if blocks is not None:  # a long self-attention input without autograd: in blocks of rows
            q, k, v = self._project_rows(x, blocks, positions, cache, last_rows)
            if cache is not None:
                k, v = cache.update(k, v)
        else:
            q, k, v = self._project(x, context, cache, positions, cp, last_rows)
        attn_mask = _merge_masks(mask, key_mask, batch=x.shape[0], s=k.shape[2])
        if last_rows is not None:  # the last queries attend, as the newest tokens of a cache do
            if attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] > 1:
                attn_mask = attn_mask[..., -last_rows:, :]
            if blocks is not None:
                blocks = row_blocks(last_rows, widest, x.element_size() * x.shape[0])
        pattern = self.pattern if pattern is None else pattern
        if cp is not None:
            out, weights = cp.attention(q, k, v, pattern=pattern, mask=attn_mask, scale=self.scale), None
        else:
            result = attention(
                q, k, v, pattern=pattern, mask=attn_mask, scale=self.scale,
                dropout_p=self.dropout if self.training else 0.0,
                return_weights=return_weights, backend=self.backend,
            )  # fmt: skip
            out, weights = result if return_weights else (result, None)
        if hooks_active():
            call = AttentionCall(self, q, k, v, out, pattern, attn_mask, self.scale, x, context)
            call_attention_hooks(call)
        if blocks is None:
            out = self.out_proj(out.transpose(1, 2).flatten(2))  # (B, N, H * Dv)
        else:
            heads = out
            out = x.new_empty(x.shape[0], heads.shape[2], self.out_proj.out_features)
            for sl in blocks:
                out[:, sl] = self.out_proj(heads[:, :, sl].transpose(1, 2).flatten(2))
        return (out, weights) if return_weights else out

    def _project(
        self, x: Tensor, context: Tensor | None, cache: KVCache | None, positions: Tensor | None, cp,
        q_rows: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Queries ``(B, H, N, D)`` (of the last ``q_rows`` rows of ``x`` only, none for 0),
        keys and values ``(B, Hkv, S, D)`` (the cache's, when there is one), normed and rotated."""
        q_from = 0 if q_rows is None else x.shape[1] - q_rows
        q = _split_heads(self.q_proj(x[:, q_from:]), self.num_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if cache is not None and cache.static:  # cross-attention, later steps: reuse
            return q, cache.keys, cache.values
        source = x if context is None else context
        if context is not None:
            self._check_input("context", context, self.context_dim, batch=x.shape[0])
        k = _split_heads(self.k_proj(source), self.num_kv_heads)
        v = _split_heads(self.v_proj(source), self.num_kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.rotary is not None and context is None:
            if positions is None and cp is not None:
                positions = cp.positions(x.shape[1], x.device)
            elif positions is None:
                positions = _default_positions(x, cache)
            q, k = self.rotary(q, positions[..., q_from:]), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.update(k, v) if context is None else cache.fill(k, v)
        return q, k, v

    def _project_rows(
        self, x: Tensor, blocks: list[slice], positions: Tensor | None, cache: KVCache | None,
        q_rows: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Self-attention's queries ``(B, H, N, D)`` (of the last ``q_rows`` rows only), keys
        and values ``(B, Hkv, N, D)`` made block of rows by block (each block projected, normed,
        rotated and written into the results), so that no step allocates an ``N``-row
        temporary (see ``_rows``). The cache is left to the caller."""
        B, N, _ = x.shape
        q_from = 0 if q_rows is None else N - q_rows
        q = x.new_empty(B, self.num_heads, N - q_from, self.head_dim)
        k = x.new_empty(B, self.num_kv_heads, N, self.head_dim)
        v = x.new_empty(B, self.num_kv_heads, N, self.head_dim)
        if self.rotary is not None and positions is None:
            positions = _default_positions(x, cache)
        for sl in blocks:
            at = None if positions is None else positions[..., sl]
            wanted = max(0, sl.stop - max(sl.start, q_from))  # the block's rows among the queries
            q_block, k[:, :, sl], v[:, :, sl] = self._project(x[:, sl], None, None, at, None, wanted)
            if wanted:
                q[:, :, sl.stop - wanted - q_from : sl.stop - q_from] = q_block
        return q, k, v

    def _check_context_parallel(self, cache, return_weights: bool, key_mask) -> None:
        for bad, what in (
            (cache is not None, "a KV cache (decode on one rank)"),
            (return_weights, "return_weights=True"),
            (key_mask is not None, "key_mask (pass patterns.KeyPadding(lengths) as the pattern)"),
            (self.training and self.dropout > 0, f"attention dropout (dropout={self.dropout}) in training"),
        ):
            if bad:
                raise ValueError(f"MultiHeadAttention: context parallelism does not support {what}.")

    def _check_last_rows(self, last_rows: object, x: Tensor, context: Tensor | None, cp) -> None:
        if isinstance(last_rows, bool) or not isinstance(last_rows, int) or not 1 <= last_rows <= x.shape[1]:
            raise ValueError(
                f"MultiHeadAttention: expected last_rows to be an int in [1, N={x.shape[1]}], but got "
                f"{last_rows!r}."
            )
        for bad, what in ((context is not None, "cross-attention"), (cp is not None, "context parallelism")):
            if bad:
                raise ValueError(
                    f"MultiHeadAttention: last_rows is for self-attention on one process, not {what}."
                )

    def _check_input(self, name: str, t: Tensor, width: int, batch: int | None = None) -> None:
        if t.dim() != 3 or t.shape[-1] != width:
            raise ValueError(
                f"MultiHeadAttention: expected {name} of shape (B, N, C) with C={width}, but got "
                f"{name}.shape={tuple(t.shape)}."
            )
        if batch is not None and t.shape[0] != batch:
            raise ValueError(
                f"MultiHeadAttention: expected context with batch size B={batch}, but got {t.shape[0]}."
            )

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, **kwargs) -> MultiHeadAttention:
        """Build from a ``torch.nn.MultiheadAttention`` with the same weights and outputs.

        ``kwargs`` (``pattern``, ``backend``) go to the constructor. The result reads
        ``(B, N, C)`` whatever ``module.batch_first`` says: a module that was called with
        ``(L, N, E)`` tensors is called here with ``x.transpose(0, 1)``.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"from_torch: expected nn.MultiheadAttention, but got {type(module).__name__}.")
        if module.bias_k is not None or module.add_zero_attn:
            raise NotImplementedError("from_torch: add_bias_kv and add_zero_attn are not supported.")
        if module.kdim != module.vdim:
            raise NotImplementedError(
                f"from_torch: keys and values come from one context here, so kdim must equal vdim, "
                f"but got kdim={module.kdim}, vdim={module.vdim}."
            )
        ref = module.out_proj.weight
        mha = cls(
            module.embed_dim, module.num_heads, context_dim=module.kdim,
            bias=module.in_proj_bias is not None, dropout=module.dropout,
            device=ref.device, dtype=ref.dtype, **kwargs,
        )  # fmt: skip
        mha.load_state_dict(module.state_dict())
        return mha

    def extra_repr(self) -> str:
        parts = [f"{self.embed_dim}, num_heads={self.num_heads}"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"num_kv_heads={self.num_kv_heads}")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.pattern is not None:
            parts.append(f"pattern={self.pattern!r}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


def _default_positions(x: Tensor, cache: KVCache | None) -> Tensor:
    """Rotary positions ``L, ..., L + N - 1`` of ``x (B, N, C)``, ``L`` the cache's length."""
    offset = 0 if cache is None else cache.length
    return torch.arange(offset, offset + x.shape[1], device=x.device)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """``(B, N, heads * D)`` -> ``(B, heads, N, D)`` (a view; einops' rearrange costs more per
    call than a whole decode step's attention on small models)."""
    B, N, _ = t.shape
    return t.view(B, N, heads, t.shape[-1] // heads).transpose(1, 2)


def _merge_masks(mask: Tensor | None, key_mask: Tensor | None, *, batch: int, s: int) -> Tensor | None:
    """One ``attention()`` mask from an attention mask and a ``(B, S)`` key mask."""
    if key_mask is None:
        return mask
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (batch, s):
        raise ValueError(
            f"MultiHeadAttention: expected key_mask to be bool of shape (B, S)={(batch, s)} "
            f"(True = a real key that may be attended), but got {key_mask.dtype} {tuple(key_mask.shape)}."
        )
    keep = key_mask[:, None, None, :]  # (B, 1, 1, S)
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


#: torch's mask keywords, whose boolean meaning ("True = ignore") is the opposite of attnkit's
#: ("True = may attend"). Refused by name, so that code moved over from torch fails loudly
#: instead of attending to padding only.
_TORCH_MASK_KEYWORDS = {
    "key_padding_mask": "key_mask",
    "src_key_padding_mask": "key_mask",
    "tgt_key_padding_mask": "key_mask",
    "memory_key_padding_mask": "memory_key_mask",
    "attn_mask": "mask",
    "src_mask": "mask",
    "tgt_mask": "mask",
    "memory_mask": "mask",
}

#: torch's other keywords whose meaning differs here, with what to pass instead.
_TORCH_KEYWORDS = {
    "need_weights": "torch's need_weights defaults to True and averages the heads; pass "
    "return_weights=True for per-head weights (B, H, N, S) (mean over dim 1 for torch's)",
    "average_attn_weights": "attnkit returns per-head weights (return_weights=True); average them "
    "over dim 1 for torch's",
    "is_causal": "torch's is_causal is a hint that a mask is causal (aligned top-left); pass "
    "pattern=Causal() (aligned bottom-right, as a KV-cache decode needs; Causal(align='top_left') "
    "for torch's alignment when N != S)",
}


def reject_unknown_keywords(owner: str, unknown: dict[str, object]) -> None:
    """Raise ``TypeError`` for keywords a ``forward`` does not take; torch's keywords get a
    message saying what replaces them (for masks: that the boolean meaning flips)."""
    if not unknown:
        return
    name = next(iter(unknown))
    if name in _TORCH_KEYWORDS:
        raise TypeError(f"{owner}.forward() does not take torch's {name!r}: {_TORCH_KEYWORDS[name]}.")
    ours = _TORCH_MASK_KEYWORDS.get(name)
    if ours is None:
        raise TypeError(f"{owner}.forward() got an unexpected keyword argument {name!r}.")
    raise TypeError(
        f"{owner}.forward() does not take torch's {name!r}: pass {ours}= instead, where a boolean "
        f"True means the key may be attended (torch's True means ignore it, so "
        f"{ours}=~{name} for a boolean torch mask). See docs/masks.md."
    )


def _translate_torch_state_dict(module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` hook: accept ``torch.nn.MultiheadAttention``'s parameter names."""
    packed = state_dict.pop(prefix + "in_proj_weight", None)
    if packed is not None:
        q, k, v = packed.chunk(3, dim=0)
    else:
        q, k, v = (state_dict.pop(prefix + f"{n}_proj_weight", None) for n in "qkv")
    if q is None:
        return  # already attnkit names
    for name, w in zip("qkv", (q, k, v), strict=True):
        state_dict[f"{prefix}{name}_proj.weight"] = w
    packed_bias = state_dict.pop(prefix + "in_proj_bias", None)
    if packed_bias is not None:
        for name, b in zip("qkv", packed_bias.chunk(3), strict=True):
            state_dict[f"{prefix}{name}_proj.bias"] = b
    if prefix + "bias_k" in state_dict:
        raise NotImplementedError("MultiHeadAttention: add_bias_kv state dicts are not supported.")
