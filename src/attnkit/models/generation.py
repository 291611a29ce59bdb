"""Generating text: the next token (greedy, temperature, top-k and top-p sampling) and the
decoding loop of decoder-only language models, with a KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingConfig", "generate", "next_token"]


@dataclass(frozen=True)
class SamplingConfig:
    """How :func:`next_token` picks: greedy unless ``do_sample``.

    ``temperature`` divides the logits; ``top_k`` keeps the k most likely tokens; ``top_p``
    keeps the smallest set of most likely tokens whose probability reaches ``p`` (Holtzman et
    al. 2020, https://arxiv.org/abs/1904.09751). Applied in that order, as ``transformers`` does.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"generate: expected temperature > 0, but got temperature={self.temperature}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"generate: expected top_k >= 1 or None, but got top_k={self.top_k}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"generate: expected 0 < top_p <= 1 or None, but got top_p={self.top_p}.")


def filter_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """``logits (B, V)`` after temperature, top-k and top-p; removed tokens get ``-inf``."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first is always kept)
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """The next token per row of ``logits (B, V)``: ``(B,)`` int64."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits, cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int = 32,
    *,
    attention_mask: Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    cache=None,
    streamer: Callable[[Tensor], object] | None = None,
) -> Tensor:
    """The prompt followed by up to ``max_new_tokens`` new tokens of a decoder-only ``model``:
    ``(B, T + new)``.

    ``model`` is any attnkit language model with ``forward(input_ids, attention_mask, *,
    position_ids, cache, logits_to_keep)``, ``new_cache()`` and a ``config`` with ``eos_ids`` and
    ``pad_token_id`` (:class:`~attnkit.models.DecoderLM`, :class:`~attnkit.models.Gemma3LM`).

    Greedy by default; ``do_sample`` with ``temperature``/``top_k``/``top_p`` samples
    (reproducibly with ``generator``). Batched prompts of different lengths are left-padded
    with ``attention_mask`` 0 on the padding. A row stops at an end-of-sequence token
    (``eos_token_id``, default the config's) and is filled with ``pad_token_id`` after;
    generation stops when every row has ended. Runs with a KV cache: the prompt once,
    then one token per step. ``cache``: an empty ``model.new_cache()`` to decode into (to
    inspect it afterwards); default a new one. ``streamer(tokens (B,))`` is called with each
    step's new tokens as soon as they are chosen (to print or time them).
    """
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: expected max_new_tokens >= 0, but got {max_new_tokens!r}.")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"generate: expected input_ids (B, T) with T >= 1, but got {tuple(input_ids.shape)}."
        )
    eos = model.config.eos_ids if eos_token_id is None else tuple(
        eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    )  # fmt: skip
    fallback_pad = eos[0] if eos else 0
    pad = next((p for p in (pad_token_id, model.config.pad_token_id) if p is not None), fallback_pad)
    B = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    was_training = model.training
    model.eval()
    if cache is None:
        cache = model.new_cache()
    elif cache.length:
        raise ValueError(f"generate: expected an empty cache, but it holds {cache.length} positions.")
    # the last token generated is never fed back: the cache holds the prompt and the others
    cache.reserve(input_ids.shape[1] + max(max_new_tokens - 1, 0))
    try:
        # without padding, no mask at all: SDPA then runs unmasked, as for an unpadded prompt
        padded = not bool(mask.all())
        step_mask = mask if padded else None
        logits = model(input_ids, step_mask, position_ids=positions, cache=cache, logits_to_keep=1)[:, -1]
        tokens = [input_ids]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        eos_t = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
        last_pos = positions[:, -1]
        for step in range(max_new_tokens):
            nxt = next_token(logits, sampling, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt[:, None])
            if streamer is not None:
                streamer(nxt)
            done |= torch.isin(nxt, eos_t)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if padded:
                mask = step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last_pos = last_pos + 1
            logits = model(
                nxt[:, None], step_mask, position_ids=last_pos[:, None], cache=cache, logits_to_keep=1
            )
            logits = logits[:, -1]
    finally:
        model.train(was_training)
    return torch.cat(tokens, dim=1)
