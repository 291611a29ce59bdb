"""A DecoderLM and a BertEncoder run on a sharded sequence equal the single-process models,
forward and backward (parameter gradients summed over ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from attnkit.distributed import ContextParallel, set_context_parallel
from attnkit.models import BertConfig, BertEncoder, DecoderLM, DecoderLMConfig

from ._spawn import run_ranks, values

T = 23  # tokens: divisible by neither 2 nor 3


def _models():
    torch.manual_seed(0)
    lm = DecoderLM(DecoderLMConfig(
        vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=48, sliding_window=6,
    ))  # fmt: skip
    bert = BertEncoder(BertConfig(
        vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
        max_position_embeddings=32, max_seq_length=32, dropout=0.0, attention_dropout=0.0,
        pattern="SlidingWindow(3, 3) | Global((0,))",
    ))  # fmt: skip
    return {"lm": lm.eval(), "bert": bert.eval()}


def _run(model, ids, weight):
    out = model(ids)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(rank: int, world: int, layout: str, method: str) -> dict:
    ids = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(1))
    errors = {}
    for name, model in _models().items():
        width = 50 if name == "lm" else 32
        weight = torch.randn(2, T, width, generator=torch.Generator().manual_seed(2))
        want, want_grads = _run(model, ids, weight)
        model.zero_grad()
        cp = ContextParallel(layout=layout, method=method)
        set_context_parallel(model, cp)
        got, grads = _run(model, cp.shard(ids), cp.shard(weight))
        errors[name] = (got - cp.shard(want)).abs().max().item()
        worst = 0.0
        for key, g in grads.items():
            dist.all_reduce(g)  # each rank holds its tokens' share of every parameter's gradient
            worst = max(
                worst, (g - want_grads[key]).abs().max().item() / (1 + want_grads[key].abs().max().item())
            )
        errors[name + " grads"] = worst
    return errors


@pytest.mark.parametrize(("world", "layout", "method"), [(2, "zigzag", "ring"), (3, "contiguous", "auto")])
def test_models_on_a_sharded_sequence_equal_one_process(world, layout, method):
    for errors in values(run_ranks(_compare, world, layout, method)):
        assert set(errors) == {"lm", "lm grads", "bert", "bert grads"}
        assert all(err <= 1e-5 for err in errors.values()), errors


def test_context_parallel_refuses_what_it_cannot_shard():
    model = _models()["lm"]
    set_context_parallel(model, ContextParallel())
    with pytest.raises(ValueError, match="neither cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=model.new_cache())
    with pytest.raises(TypeError, match="expected a ContextParallel"):
        set_context_parallel(model, "ring")
    with pytest.raises(ValueError, match="has no attnkit attention modules"):
        set_context_parallel(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match=r"method in \('auto', 'ring', 'all_to_all'\)"):
        ContextParallel(method="ulysses")
