"""Shared fixtures: the packaged all-MiniLM-L6-v2 and tiny random Hugging Face decoders."""

from __future__ import annotations

import torch


def save_tiny_decoder(directory, kind: str = "llama", **overrides):
    """A small randomly initialised ``transformers`` Llama/Mistral saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    base = dict(
        vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    base.update(overrides)
    torch.manual_seed(1234)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**base))
    else:
        model = MistralForCausalLM(MistralConfig(**base))
    model.eval().save_pretrained(directory)
    return model
