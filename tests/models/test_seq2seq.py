"""Seq2Seq: learns to reverse sequences; greedy, beam search, caches, padding, checkpoints."""

from __future__ import annotations

import pytest
import torch

from attnkit.models import Seq2Seq, Seq2SeqConfig

PAD, BOS, EOS, VOCAB = 0, 1, 2, 16


def reverse_batch(n: int, g: torch.Generator, lo: int = 3, hi: int = 10):
    """Sources ``s EOS`` (right-padded) and targets ``BOS reversed(s) EOS``."""
    lengths = torch.randint(lo, hi, (n,), generator=g)
    src = torch.full((n, hi + 1), PAD, dtype=torch.long)
    tgt = torch.full((n, hi + 2), PAD, dtype=torch.long)
    for i, n_i in enumerate(lengths.tolist()):
        s = torch.randint(3, VOCAB, (n_i,), generator=g)
        src[i, :n_i], src[i, n_i] = s, EOS
        tgt[i, 0], tgt[i, 1 : n_i + 1], tgt[i, n_i + 1] = BOS, s.flip(0), EOS
    return src, tgt


def answer(tgt: torch.Tensor) -> list[int]:
    row = tgt.tolist()
    return row[1 : row.index(EOS)]


def small_config(**kw) -> Seq2SeqConfig:
    base = dict(src_vocab_size=VOCAB, dim=64, num_heads=4, ffn_dim=128, encoder_layers=2, decoder_layers=2,
                dropout=0.0, max_len=32)  # fmt: skip
    base.update(kw)
    return Seq2SeqConfig(**base)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = Seq2Seq(small_config())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=600, pct_start=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(600):
        src, tgt = reverse_batch(64, g)
        loss = model.loss(src, tgt, label_smoothing=0.0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


@pytest.fixture(scope="module")
def held_out():
    return reverse_batch(200, torch.Generator().manual_seed(99))


def test_learns_to_reverse(trained, held_out):
    src, tgt = held_out
    got = trained.generate(src)
    accuracy = sum(g == answer(t) for g, t in zip(got, tgt, strict=True)) / len(got)
    assert accuracy >= 0.98


def test_beam_search(trained, held_out):
    src, tgt = held_out
    src, tgt = src[:60], tgt[:60]
    greedy = trained.generate(src)
    assert trained.generate(src, beam_size=1) == greedy
    beam = trained.generate(src, beam_size=4, length_penalty=0.6)
    accuracy = sum(b == answer(t) for b, t in zip(beam, tgt, strict=True)) / len(beam)
    assert accuracy >= 0.95


def _sequence_logprob(model, src, hyp):
    tgt = torch.tensor([[BOS, *hyp, EOS]])
    with torch.no_grad():
        logp = model(src[None], tgt[:, :-1]).log_softmax(-1)
    return logp[0].gather(-1, tgt[0, 1:, None]).sum().item()


def test_beam_search_finds_at_least_the_greedy_score(trained):
    # an untrained model: many near-ties, where beam search must not do worse than greedy
    torch.manual_seed(3)
    model = Seq2Seq(small_config()).eval()
    src, _ = reverse_batch(12, torch.Generator().manual_seed(5))
    greedy = model.generate(src, max_new_tokens=6)
    beam = model.generate(src, beam_size=5, max_new_tokens=6, length_penalty=0.0)
    for i in range(len(src)):
        if len(greedy[i]) < 6 and len(beam[i]) < 6:  # both finished: compare full sequence scores
            assert (
                _sequence_logprob(model, src[i], beam[i])
                >= _sequence_logprob(model, src[i], greedy[i]) - 1e-4
            )


def test_incremental_decoding_equals_full_decode(trained, held_out):
    src, tgt = held_out
    src, tgt = src[:4], tgt[:4]
    with torch.no_grad():
        memory, mask = trained.encode(src)
        full = trained.decode(tgt, memory, mask)
        cache = trained.decoder.new_cache()
        steps = [trained.decode(tgt[:, t : t + 1], memory, mask, cache=cache) for t in range(tgt.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)


def test_padding_does_not_change_results(trained, held_out):
    src, _ = held_out
    batch = trained.generate(src[:8])
    for i in range(8):
        row = src[i : i + 1]
        row = row[:, : int((row != PAD).sum())]  # no padding at all
        assert trained.generate(row) == [batch[i]]


def test_checkpoint_round_trip(trained, tmp_path, held_out):
    trained.save_pretrained(tmp_path)
    again = Seq2Seq.from_pretrained(tmp_path)
    assert again.config == trained.config
    assert again.out_proj.weight is again.tgt_embed.weight is again.src_embed.weight
    src, _ = held_out
    assert again.generate(src[:10], beam_size=3) == trained.generate(src[:10], beam_size=3)


def test_separate_vocabularies_and_learned_positions():
    model = Seq2Seq(small_config(tgt_vocab_size=40, share_embeddings=False, positional="learned")).eval()
    src, tgt = torch.tensor([[5, 6, EOS]]), torch.tensor([[BOS, 30, 31]])
    logits = model(src, tgt)
    assert logits.shape == (1, 3, 40) and model.src_embed is not model.tgt_embed
    assert model.src_embed.num_embeddings == 16 and model.tgt_embed.num_embeddings == 40
    with torch.no_grad():  # the positions are learned parameters the outputs depend on, per side
        model.tgt_pos.weight[2] += torch.randn(64)  # not a constant: LayerNorm would remove that
        moved = model(src, tgt)
        assert torch.allclose(moved[:, :2], logits[:, :2], atol=1e-5)  # causal: earlier steps unchanged
        assert not torch.allclose(moved[:, 2], logits[:, 2], atol=1e-3)
        model.src_pos.weight[0] += torch.randn(64)
        assert not torch.allclose(model(src, tgt), moved)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="share_embeddings"):
        small_config(tgt_vocab_size=40)
    with pytest.raises(ValueError, match="positional"):
        small_config(positional="rotary")
    model = Seq2Seq(small_config())
    with pytest.raises(ValueError, match=r"src ids in \[0, 16\)"):
        model.generate(torch.tensor([[3, 99]]))
    with pytest.raises(ValueError, match="max_len=32"):
        model.generate(torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="beam_size"):
        model.generate(torch.tensor([[3, EOS]]), beam_size=0)
    with pytest.raises(ValueError, match="finite length_penalty, but got nan"):
        model.generate(torch.tensor([[3, EOS]]), beam_size=2, length_penalty=float("nan"))
    with pytest.raises(TypeError, match="length_penalty to be a number, but got str"):
        model.generate(torch.tensor([[3, EOS]]), beam_size=2, length_penalty="0.6")
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="not an attnkit Seq2Seq"):
        Seq2Seq.from_pretrained(tmp_path)


# -- copy attention (pointer-generator) ---------------------------------------------------------
def test_copy_attention_is_the_gated_mixture_of_softmax_and_cross_attention():
    torch.manual_seed(0)
    model = Seq2Seq(small_config(copy_attention=True)).double().eval()
    src, tgt = reverse_batch(5, torch.Generator().manual_seed(2))
    assert any(len(set(r[r > EOS].tolist())) < int((r > EOS).sum()) for r in src)  # repeated ids
    got = model(src, tgt[:, :-1])
    # by hand, densely, from the pieces: the decoder's last-layer cross weights and the gate
    memory, mask = model.encode(src)
    x = model.tgt_pos(model.tgt_embed(tgt[:, :-1]) * model.config.dim**0.5)
    h, weights = model.decoder(x, memory, memory_key_mask=mask, need_weights=True)
    attn = weights[-1][1].mean(1)  # (B, T, S)
    p_gen = torch.sigmoid(model.copy_gate(torch.cat([h, attn @ memory, x], -1)))
    copy = torch.zeros(*attn.shape[:2], VOCAB, dtype=torch.float64)
    for b in range(src.shape[0]):
        for s in range(src.shape[1]):
            copy[b, :, src[b, s]] += attn[b, :, s]
    want = p_gen * model.out_proj(h).softmax(-1) + (1 - p_gen) * copy
    assert torch.allclose(got.exp(), want, atol=1e-12)
    assert torch.allclose(got.exp().sum(-1), torch.ones((), dtype=torch.float64), atol=1e-12)
    assert copy[..., PAD].abs().max() == 0  # padding keys are never copied
    # and the gradients: of the tokens the mixture gives some mass, weighted at random
    w = torch.rand(got.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = [torch.autograd.grad((f * w).sum(), list(model.parameters())) for f in (got, want.log())]
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-9)


def test_copy_attention_gradients_are_finite_with_label_smoothing():
    # tokens absent from the source have copy probability 0: the log must stay finite
    torch.manual_seed(0)
    model = Seq2Seq(small_config(copy_attention=True))
    with torch.no_grad():
        model.copy_gate.bias.fill_(-30.0)  # almost all copy
    src, tgt = reverse_batch(8, torch.Generator().manual_seed(4))
    loss = model.loss(src, tgt, label_smoothing=0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.copy_gate.weight.grad.abs().sum() > 0


def assert_loss_is_cross_entropy_of_forward(model, src, tgt, label_smoothing, reduction):
    """``model.loss`` equals ``F.cross_entropy`` of ``model(src, tgt_in)``'s scores (padding
    ignored), in float64, and so do their gradients."""
    got = model.loss(src, tgt, label_smoothing=label_smoothing, reduction=reduction)
    want = torch.nn.functional.cross_entropy(
        model(src, tgt[:, :-1]).flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD,
        label_smoothing=label_smoothing, reduction=reduction,
    )  # fmt: skip
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    grads = [torch.autograd.grad(f, list(model.parameters())) for f in (got, want)]
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_is_the_cross_entropy_of_forward(label_smoothing, reduction):
    """Without copy attention the loss (scored on the predicted positions only) equals
    F.cross_entropy of forward's scores with padding ignored, in float64, forward and backward;
    also for a single predicted token."""
    torch.manual_seed(0)
    model = Seq2Seq(small_config()).double()
    src, tgt = reverse_batch(6, torch.Generator().manual_seed(5), lo=1)
    assert bool((tgt[:, 1:] == PAD).any())
    for s, t in ((src, tgt), (src[:1], tgt[:1, :2])):
        assert_loss_is_cross_entropy_of_forward(model, s, t, label_smoothing, reduction)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_copy_attention_loss_is_the_cross_entropy_of_the_mixture(label_smoothing, reduction):
    """The loss computed without the (B, T, V) mixture equals F.cross_entropy of forward's
    mixture, in float64, forward and backward: repeated source ids, padding in sources and
    targets, targets longer than sources, gold tokens absent from the source."""
    torch.manual_seed(0)
    model = Seq2Seq(small_config(copy_attention=True)).double()
    with torch.no_grad():
        model.copy_gate.bias.fill_(-1.0)  # copy carries weight
    src, tgt = reverse_batch(6, torch.Generator().manual_seed(5), lo=1)
    tgt = torch.cat([tgt, torch.randint(3, VOCAB, (6, 4), generator=torch.Generator().manual_seed(1))], 1)
    tgt[0, -3:] = PAD  # a padded row among full ones
    assert tgt.shape[1] != src.shape[1] and bool((src == PAD).any())
    assert any(len(set(r[r > EOS].tolist())) < int((r > EOS).sum()) for r in src)  # repeated ids
    not_copyable = [
        int(t) not in s.tolist() for s, r in zip(src, tgt, strict=True) for t in r[1:] if t != PAD
    ]
    assert any(not_copyable)
    assert_loss_is_cross_entropy_of_forward(model, src, tgt, label_smoothing, reduction)  # the mixture's


def test_copy_attention_loss_on_one_target_token_and_bad_arguments():
    torch.manual_seed(0)
    model = Seq2Seq(small_config(copy_attention=True)).double()
    src = torch.tensor([[5, 6, 5, EOS]])
    tgt = torch.tensor([[BOS, 5]])  # one predicted token, copyable twice over
    want = torch.nn.functional.cross_entropy(model(src, tgt[:, :1])[0], tgt[0, 1:], label_smoothing=0.2)
    assert torch.allclose(model.loss(src, tgt, label_smoothing=0.2), want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum', but got 'none'"):
        model.loss(src, tgt, reduction="none")
    for m in (model, Seq2Seq(small_config())):  # with and without copy attention
        with pytest.raises(ValueError, match=r"tgt ids in \[0, 16\), but got \[99, 99\]"):
            m.loss(src, torch.tensor([[BOS, 99]]))
        with pytest.raises(ValueError, match=r"label_smoothing in \[0, 1\], but got 1.5"):
            m.loss(src, tgt, label_smoothing=1.5)


def test_copy_attention_decodes_with_its_cache_and_round_trips(tmp_path):
    torch.manual_seed(1)
    model = Seq2Seq(small_config(copy_attention=True)).eval()
    src, tgt = reverse_batch(4, torch.Generator().manual_seed(6))
    with torch.no_grad():
        memory, mask = model.encode(src)
        full = model.decode(tgt, memory, mask, src=src)
        cache = model.decoder.new_cache()
        steps = [
            model.decode(tgt[:, t : t + 1], memory, mask, cache=cache, src=src) for t in range(tgt.shape[1])
        ]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = Seq2Seq.from_pretrained(tmp_path)
    assert again.config.copy_attention
    assert again.generate(src, beam_size=3) == model.generate(src, beam_size=3)
    with pytest.raises(ValueError, match="copy_attention needs src"):
        model.decode(tgt, memory, mask)
    with pytest.raises(ValueError, match="copy_attention"):
        small_config(copy_attention=True, tgt_vocab_size=40, share_embeddings=False)


def test_copy_attention_carries_unseen_tokens_over():
    """Copying sources made of tokens the decoder never produced in training: the
    pointer-generator carries many of them over, the softmax alone none (it never saw them as
    targets)."""
    V, seen = 64, 32  # training sources use ids [3, 32); held-out ones use [32, 64)

    def batch(n, g, lo_id, hi_id):
        src = torch.randint(lo_id, hi_id, (n, 6), generator=g)
        src = torch.cat([src, torch.full((n, 1), EOS)], 1)
        return src, torch.cat([torch.full((n, 1), BOS), src], 1)

    accuracy = {}
    for copy in (False, True):
        torch.manual_seed(0)
        model = Seq2Seq(small_config(src_vocab_size=V, copy_attention=copy))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(120):
            src, tgt = batch(32, g, 3, seen)
            loss = model.loss(src, tgt)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for name, lo, hi in (("seen", 3, seen), ("unseen", seen, V)):
            src, tgt = batch(50, torch.Generator().manual_seed(9), lo, hi)
            got = model.generate(src, max_new_tokens=8)
            # token accuracy, position by position (a short output misses the rest)
            hits = sum(
                a == b
                for g, t in zip(got, tgt, strict=True)
                for a, b in zip(g, t[1:-1].tolist(), strict=False)
            )
            accuracy[copy, name] = hits / tgt[:, 1:-1].numel()
    assert accuracy[True, "seen"] >= 0.95 and accuracy[False, "seen"] >= 0.8  # both learnt the task
    assert accuracy[True, "unseen"] >= 0.3
    assert accuracy[False, "unseen"] <= 0.05
