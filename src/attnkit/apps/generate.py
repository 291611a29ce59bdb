"""``attnkit generate MODEL PROMPT``: continue a prompt with a pretrained decoder, and say how fast.

Loads any decoder :func:`attnkit.models.load` takes (a GGUF file such as SmolLM2 or Gemma 3, or
a Llama/Mistral/Gemma 3 checkpoint directory), encodes the prompt with the model's own tokenizer,
generates with a KV cache (greedy unless asked to sample) and prints the continuation, then the
prefill and decoding speeds in tokens per second.
"""

from __future__ import annotations

import sys
import time

import torch

from ..models.generation import SamplingConfig
from ..models.loading import load
from .errors import UsageError, argument, positive, reading

__all__ = ["run"]


def run(
    model: str,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    show_tokens: bool = False,
) -> int:
    """Print ``prompt``'s continuation (``'-'`` reads the prompt from stdin) and its speed."""
    positive(max_new_tokens=max_new_tokens, threads=threads)
    with argument("--temperature/--top-k/--top-p"):
        SamplingConfig(sample, temperature, top_k, top_p)
    prompt = sys.stdin.read() if prompt == "-" else prompt
    if not prompt.strip():
        raise UsageError(f"PROMPT: expected some text, but got {prompt!r}.")
    if threads is not None:
        torch.set_num_threads(threads)
    with reading("MODEL"):
        loaded = load(model, progress=sys.stderr.isatty())
    if loaded.kind != "decoder":
        raise UsageError(f"MODEL: expected a decoder (a language model), but {loaded.name} is an encoder.")
    lm, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([tok.encode(prompt)])
    if ids.shape[1] + max_new_tokens > loaded.max_tokens:
        raise UsageError(
            f"--max-new-tokens: the prompt ({ids.shape[1]} tokens) and {max_new_tokens} new tokens exceed "
            f"{loaded.name}'s context of {loaded.max_tokens} tokens."
        )
    generator = torch.Generator().manual_seed(seed)
    new: list[int] = []
    shown = ""
    stamps: list[float] = []

    def stream(step: torch.Tensor) -> None:  # print the text as it grows
        nonlocal shown
        stamps.append(time.perf_counter())
        new.append(int(step[0]))
        text = tok.decode(new)
        if text.startswith(shown):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text

    sys.stdout.write(prompt)
    with torch.no_grad():
        t0 = time.perf_counter()
        lm.generate(ids, max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
                    generator=generator, streamer=stream)  # fmt: skip
    print(tok.decode(new)[len(shown) :])
    if show_tokens:
        print("tokens: " + " ".join(f"{i}:{t!r}" for i, t in zip(new, tok.id_to_tokens(new), strict=True)))
    prefill = stamps[0] - t0  # the prompt's forward pass gives the first new token
    decode = stamps[-1] - stamps[0]
    rate = f"{(len(new) - 1) / decode:,.1f} tokens/s" if len(new) > 1 and decode > 0 else "-"
    print(
        f"\n{loaded.name}: prompt of {ids.shape[1]} tokens in {prefill:.2f} s "
        f"({ids.shape[1] / prefill:,.0f} tokens/s); {len(new)} new tokens, {rate} after the first",
        file=sys.stderr,
    )
    return 0
