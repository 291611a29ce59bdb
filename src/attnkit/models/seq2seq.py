"""``Seq2Seq``: the encoder-decoder Transformer (Vaswani et al. 2017) on attnkit.

The encoder reads the source with self-attention (any attnkit pattern, so long inputs can run
block-sparse); the decoder writes the target with causal self-attention and cross-attention to
the encoder's output. Decoding is greedy or beam search with a length penalty, batched, with a
KV cache per layer (the cross-attention keys and values are computed once per source).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import (
    Decoder,
    DecoderCache,
    DecoderLayer,
    Dropout,
    Encoder,
    EncoderLayer,
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    cross_entropy,
    make_norm,
)
from ..nn.layers import ACTIVATIONS
from ..patterns import Pattern, parse_pattern
from ._io import ModelConfig, checkpoint_dir, load_state, load_weights, own_config, save_checkpoint

__all__ = ["Seq2Seq", "Seq2SeqConfig"]


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig(ModelConfig):
    """Shape of a :class:`Seq2Seq`.

    ``tgt_vocab_size`` None means one vocabulary for both sides; ``share_embeddings`` then
    uses one embedding table for source and target, and ``tie_output`` ties the output
    projection to the target embedding (Press & Wolf 2017). ``encoder_pattern`` is an attnkit
    pattern expression for the encoder's self-attention (e.g. ``"SlidingWindow(128, 128)"``).

    ``copy_attention`` makes the model a pointer-generator (See et al. 2017): each step's
    next-token distribution mixes the vocabulary softmax with a copy distribution over the
    source tokens, weighted by a learned gate. The copy distribution is the last decoder
    layer's cross-attention weights, averaged over heads and scattered onto the source ids, so
    names and identifiers can be carried over even when the vocabulary softmax has not learnt
    them. It needs one vocabulary for both sides.
    """

    src_vocab_size: int = 8000
    tgt_vocab_size: int | None = None
    dim: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None
    ffn_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: str = "relu"
    norm: str = "layer"
    norm_first: bool = True
    positional: str = "sinusoidal"
    max_len: int = 1024
    share_embeddings: bool = True
    tie_output: bool = True
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    encoder_pattern: str | None = None
    copy_attention: bool = False

    def validate(self) -> None:
        self._positive(
            "src_vocab_size", "dim", "num_heads", "ffn_dim", "encoder_layers", "decoder_layers", "max_len"
        )
        if self.tgt_vocab_size is not None:
            self._positive("tgt_vocab_size")
        self._require("dim", self.dim % self.num_heads == 0, f"divisible by num_heads={self.num_heads}")
        self._require("dropout", 0 <= self.dropout < 1, "in [0, 1)")
        self._require("attention_dropout", 0 <= self.attention_dropout < 1, "in [0, 1)")
        self._require("activation", self.activation in ACTIVATIONS, f"one of {ACTIVATIONS}")
        self._require("norm", self.norm in ("layer", "rms"), "'layer' or 'rms'")
        self._require("positional", self.positional in ("sinusoidal", "learned"), "'sinusoidal' or 'learned'")
        self._require(
            "share_embeddings",
            not self.share_embeddings or self.tgt_vocab_size in (None, self.src_vocab_size),
            "False when the source and target vocabularies differ",
        )
        for name in ("pad_id", "bos_id", "eos_id"):
            self._require(
                name, 0 <= getattr(self, name) < min(self.src_vocab_size, self.target_vocab), "a token id"
            )
        if self.encoder_pattern is not None:
            parse_pattern(self.encoder_pattern)
        self._require(
            "copy_attention",
            not self.copy_attention or self.tgt_vocab_size in (None, self.src_vocab_size),
            "False when the source and target vocabularies differ (copying maps source ids to target ids)",
        )

    @property
    def target_vocab(self) -> int:
        return self.src_vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size


class Seq2Seq(nn.Module):
    """Encoder-decoder Transformer for translation and summarization.

    Args:
        config: A :class:`Seq2SeqConfig`.
        backend: attnkit backend for every attention.

    Shape:
        ``forward(src (B, S), tgt_in (B, T))`` -> logits ``(B, T, V_tgt)`` (with
        ``copy_attention``, log-probabilities; see :meth:`decode`). Padding is
        ``config.pad_id`` on both sides; ``tgt_in`` starts with ``bos_id``.

    Example:
        >>> model = Seq2Seq(Seq2SeqConfig(src_vocab_size=20, dim=32, num_heads=4, ffn_dim=64,
        ...                               encoder_layers=1, decoder_layers=1))
        >>> model.generate(torch.tensor([[5, 6, 7, 2]]), beam_size=3, max_new_tokens=5)
        [[...]]
    """

    model_name = "Seq2Seq"

    def __init__(self, config: Seq2SeqConfig, *, backend: str = "auto") -> None:
        super().__init__()
        c = self.config = config
        self.src_embed = nn.Embedding(c.src_vocab_size, c.dim, padding_idx=c.pad_id)
        self.tgt_embed = self.src_embed if c.share_embeddings else nn.Embedding(
            c.target_vocab, c.dim, padding_idx=c.pad_id
        )  # fmt: skip
        if c.positional == "sinusoidal":
            self.src_pos = self.tgt_pos = SinusoidalPositionalEncoding(c.dim, c.max_len)
        else:
            self.src_pos = LearnedPositionalEmbedding(c.max_len, c.dim)
            self.tgt_pos = LearnedPositionalEmbedding(c.max_len, c.dim)
        self.dropout = Dropout(c.dropout)
        common = dict(
            num_kv_heads=c.num_kv_heads, activation=c.activation, norm=c.norm, norm_first=c.norm_first,
            dropout=c.dropout, attention_dropout=c.attention_dropout, backend=backend,
        )  # fmt: skip
        final = (lambda: make_norm(c.norm, c.dim)) if c.norm_first else (lambda: None)
        enc_pattern = None if c.encoder_pattern is None else parse_pattern(c.encoder_pattern)
        self.encoder = Encoder(
            EncoderLayer(c.dim, c.num_heads, c.ffn_dim, pattern=enc_pattern, **common),
            c.encoder_layers,
            final(),
        )
        self.decoder = Decoder(
            DecoderLayer(c.dim, c.num_heads, c.ffn_dim, **common), c.decoder_layers, final()
        )
        self.out_proj = nn.Linear(c.dim, c.target_vocab, bias=False)
        # p_gen from the decoder state, the copy context and the decoder input (See et al. 2017)
        self.copy_gate = nn.Linear(3 * c.dim, 1) if c.copy_attention else None
        self._init_weights()
        if c.tie_output:
            self.out_proj.weight = self.tgt_embed.weight

    def _init_weights(self) -> None:
        for emb in {id(m): m for m in (self.src_embed, self.tgt_embed)}.values():
            nn.init.normal_(emb.weight, std=self.config.dim**-0.5)
            with torch.no_grad():
                emb.weight[self.config.pad_id].zero_()
        if isinstance(self.src_pos, LearnedPositionalEmbedding):
            for pos in (self.src_pos, self.tgt_pos):
                nn.init.normal_(pos.weight, std=0.02)
        nn.init.normal_(self.out_proj.weight, std=self.config.dim**-0.5)

    # -- pieces ------------------------------------------------------------------------------
    def _check_ids(self, name: str, ids: Tensor, vocab: int) -> None:
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(
                f"Seq2Seq: expected {name} int64 of shape (B, L), but got {ids.dtype} {tuple(ids.shape)}."
            )
        if ids.shape[1] > self.config.max_len:
            raise ValueError(
                f"Seq2Seq: expected {name} of at most max_len={self.config.max_len} tokens, but got "
                f"{ids.shape[1]}."
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(
                f"Seq2Seq: expected {name} ids in [0, {vocab}), but got [{int(ids.min())}, {int(ids.max())}]."
            )

    def encode(self, src: Tensor, *, pattern: Pattern | None = None) -> tuple[Tensor, Tensor]:
        """``memory (B, S, C)`` and the source key mask ``(B, S)`` (True = real token)."""
        self._check_ids("src", src, self.config.src_vocab_size)
        src_key_mask = src != self.config.pad_id
        x = self.dropout(self.src_pos(self.src_embed(src) * math.sqrt(self.config.dim)))
        return self.encoder(x, key_mask=src_key_mask, pattern=pattern), src_key_mask

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        src_key_mask: Tensor,
        *,
        cache: DecoderCache | None = None,
        src: Tensor | None = None,
    ) -> Tensor:
        """Scores ``(B, T, V)`` of the next tokens after each of ``tgt_in``'s positions, whose
        ``log_softmax`` is the next-token log-distribution: logits, or with
        ``copy_attention`` the log-probabilities of the generate/copy mixture (then ``src
        (B, S)``, the source ids, is required). With a ``cache``, ``tgt_in`` holds only the new
        positions."""
        if self.copy_gate is not None and (src is None or src.shape != src_key_mask.shape):
            raise ValueError(
                f"Seq2Seq.decode: copy_attention needs src, the source ids of shape "
                f"{tuple(src_key_mask.shape)}, but got {None if src is None else tuple(src.shape)}."
            )
        h, x, cross = self._decoder_states(tgt_in, memory, src_key_mask, cache)
        if cross is None:
            return self.out_proj(h)
        return self._mix(self.out_proj(h), h, x, memory, cross, src)

    def _decoder_states(
        self, tgt_in: Tensor, memory: Tensor, src_key_mask: Tensor, cache: DecoderCache | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The decoder's output ``h (B, T, C)``, its input ``x`` (embedded ``tgt_in``) and,
        with ``copy_attention``, the last layer's cross-attention weights ``(B, H, T, S)``."""
        offset = 0 if cache is None else cache.length
        x = self.dropout(self.tgt_pos(self.tgt_embed(tgt_in) * math.sqrt(self.config.dim), offset=offset))
        if self.copy_gate is None:
            return self.decoder(x, memory, memory_key_mask=src_key_mask, cache=cache), x, None
        h, weights = self.decoder(
            x, memory, memory_key_mask=src_key_mask, cache=cache, need_weights="cross", weights_layers=[-1]
        )
        return h, x, weights[-1][1]

    def _copy_gate(
        self, h: Tensor, x: Tensor, memory: Tensor, cross: Tensor, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """The copy distribution over source positions and the gate: ``cross (B, H, T, S)``
        are the last layer's cross-attention weights, whose head mean ``attn (B, T, S)`` is
        what each step copies from each source position (padding keys have weight 0); the
        gate ``(B, T, 1)`` is ``logit(p_gen)``, from the decoder state, the copy context and
        the decoder input (See et al. 2017). Both in ``dtype``."""
        attn = cross.to(dtype).mean(1)
        context = (attn @ memory.to(dtype)).to(h.dtype)  # (B, T, C)
        gate = self.copy_gate(torch.cat([h, context, x.to(h.dtype)], -1)).to(dtype)
        return attn, gate

    @staticmethod
    def _source_mass(attn: Tensor, src: Tensor, vocab: int) -> Tensor:
        """``(B, T, S)``: the copy probability of the id at each source position, the weight
        ``attn (B, T, S)`` puts on all positions holding that id (a repeated id adds up its
        positions).

        Two ways, chosen by size: a product with the ``(B, S, S)`` matrix of equal ids costs
        ``S * S`` per row whatever ``T`` is (training: many steps at once), adding up per id
        in a ``(B, T, vocab)`` buffer costs ``T * vocab`` (decoding: one step at a time)."""
        B, T, S = attn.shape
        if T * vocab >= S * S:
            return attn @ (src[:, :, None] == src[:, None, :]).to(attn.dtype)
        idx = src[:, None, :].expand(-1, T, -1)
        return attn.new_zeros(B, T, vocab).scatter_add_(-1, idx, attn).gather(-1, idx)

    @staticmethod
    def _first_occurrence(src: Tensor) -> Tensor:
        """``(B, S)`` bool: whether each source position holds the first copy of its id in
        the row (so that a per-id correction is applied once)."""
        ids, order = src.sort(dim=-1, stable=True)
        first_sorted = torch.ones_like(ids, dtype=torch.bool)
        first_sorted[:, 1:] = ids[:, 1:] != ids[:, :-1]
        return torch.empty_like(first_sorted).scatter_(-1, order, first_sorted)

    @staticmethod
    def _mix_at(log_gen: Tensor, gate: Tensor, mass: Tensor) -> Tensor:
        """``log(p_gen * p_vocab + (1 - p_gen) * copy)`` from ``log_gen = log(p_gen *
        p_vocab)`` and the copy mass, elementwise. The clamp keeps the log finite (and its
        gradient zero) where nothing is copied."""
        return torch.logaddexp(log_gen, F.logsigmoid(-gate) + mass.clamp_min(1e-30).log())

    def _source_fix(self, gen: Tensor, gate: Tensor, attn: Tensor, src: Tensor, vocab: int) -> Tensor:
        """``(B, T, S)``: what the copy adds to ``gen = log(p_gen * p_vocab)`` at each source
        position's id (the mixture's log minus ``gen``), once per id: zero at repeats."""
        fix = self._mix_at(gen, gate, self._source_mass(attn, src, vocab)) - gen
        return fix * self._first_occurrence(src)[:, None, :]

    def _mix(
        self, logits: Tensor, h: Tensor, x: Tensor, memory: Tensor, cross: Tensor, src: Tensor
    ) -> Tensor:
        """``log(p_gen * softmax(logits) + (1 - p_gen) * copy)`` over the whole vocabulary,
        in float32 at least, where ``copy`` is the head mean of the last layer's
        cross-attention weights ``cross (B, H, T, S)`` summed per source id of ``src``.

        ``copy`` is zero except at the source's ids, so the mixture is the generator's
        log-probabilities, corrected at those ids only: the log and ``logaddexp`` of the
        mixture run on ``(B, T, S)``, not on the whole ``(B, T, V)`` vocabulary."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        attn, gate = self._copy_gate(h, x, memory, cross, dtype)
        out = F.logsigmoid(gate) + logits.to(dtype).log_softmax(-1)  # generate: log(p_gen * softmax)
        idx = src[:, None, :].expand(-1, attn.shape[1], -1)  # (B, T, S)
        return out.scatter_add(
            -1, idx, self._source_fix(out.gather(-1, idx), gate, attn, src, logits.shape[-1])
        )

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        self._check_ids("tgt_in", tgt_in, self.config.target_vocab)
        memory, src_key_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_key_mask, src=src)

    def loss(
        self, src: Tensor, tgt: Tensor, *, label_smoothing: float = 0.0, reduction: str = "mean"
    ) -> Tensor:
        """Token cross-entropy of ``tgt (B, T)`` (``bos ... eos`` then padding): the decoder
        reads ``tgt[:, :-1]`` and predicts ``tgt[:, 1:]``; padding is ignored. ``reduction``:
        ``"mean"`` over the predicted tokens, or their ``"sum"`` (data-parallel training
        divides by the whole batch's token count). ``label_smoothing`` as in
        :func:`torch.nn.functional.cross_entropy`.

        With ``copy_attention`` the loss is the same number as the cross-entropy of
        :meth:`forward`'s mixture, computed without building that ``(B, T, V)`` mixture: only
        the logits' log-normalizer, sum and values at the gold and source ids are needed."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Seq2Seq.loss: expected reduction 'mean' or 'sum', but got {reduction!r}.")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"Seq2Seq.loss: expected label_smoothing in [0, 1], but got {label_smoothing}.")
        self._check_ids("tgt", tgt[:, 1:], self.config.target_vocab)
        if self.copy_gate is None:
            return self._cross_entropy(src, tgt, label_smoothing, reduction)
        return self._copy_loss(src, tgt, label_smoothing, reduction)

    def _cross_entropy(self, src: Tensor, tgt: Tensor, label_smoothing: float, reduction: str) -> Tensor:
        """:meth:`loss` without copy attention: the output projection and
        :func:`attnkit.nn.cross_entropy` on the predicted (not padding) positions only, in
        float32 at least; the same number as ``F.cross_entropy`` of :meth:`forward`'s scores
        with ``ignore_index=pad_id``."""
        tgt_in, gold = tgt[:, :-1], tgt[:, 1:]
        self._check_ids("tgt_in", tgt_in, self.config.target_vocab)
        memory, src_key_mask = self.encode(src)
        h = self._decoder_states(tgt_in, memory, src_key_mask)[0]
        keep = gold != self.config.pad_id
        scores = self.out_proj(h[keep])  # (n, V): one row per predicted token
        total = cross_entropy(scores, gold[keep], label_smoothing=label_smoothing, reduction="sum")
        return total if reduction == "sum" else total / keep.sum()

    def _copy_loss(self, src: Tensor, tgt: Tensor, label_smoothing: float, reduction: str) -> Tensor:
        """:meth:`loss` for the pointer-generator. With ``lse`` the logits' log-normalizer,
        ``log p(v) = log p_gen + logit_v - lse`` for every id ``v`` outside the source, and
        the mixture of :meth:`_mix_at` at the source's ids. So the gold token's
        log-probability needs only its logit and copy mass, and label smoothing's
        ``sum_v log p(v)`` is ``V log p_gen + sum_v logit_v - V lse`` plus the corrections at
        the source's distinct ids."""
        tgt_in, gold = tgt[:, :-1], tgt[:, 1:]
        self._check_ids("tgt_in", tgt_in, self.config.target_vocab)
        memory, src_key_mask = self.encode(src)
        h, x, cross = self._decoder_states(tgt_in, memory, src_key_mask)
        logits = self.out_proj(h)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        attn, gate = self._copy_gate(h, x, memory, cross, dtype)
        logits = logits.to(dtype)
        lse = logits.logsumexp(-1, keepdim=True)  # (B, T, 1)
        log_gen = F.logsigmoid(gate) - lse  # add a logit to get log(p_gen * p_vocab)
        gold_mass = (attn * (src[:, None, :] == gold[..., None])).sum(-1, keepdim=True)  # (B, T, 1)
        gold_lp = self._mix_at(log_gen + logits.gather(-1, gold[..., None]), gate, gold_mass).squeeze(-1)
        keep = gold != self.config.pad_id
        token_loss = -gold_lp
        if label_smoothing > 0:
            idx = src[:, None, :].expand(-1, gold.shape[1], -1)  # (B, T, S)
            V = logits.shape[-1]
            fix = self._source_fix(log_gen + logits.gather(-1, idx), gate, attn, src, V).sum(-1)  # (B, T)
            sum_lp = V * log_gen.squeeze(-1) + logits.sum(-1) + fix
            token_loss = (1 - label_smoothing) * token_loss - label_smoothing / V * sum_lp
        total = token_loss.masked_fill(~keep, 0.0).sum()
        return total if reduction == "sum" else total / keep.sum()

    # -- decoding ----------------------------------------------------------------------------
    def _max_new(self, src: Tensor, max_new_tokens: int | None) -> int:
        if max_new_tokens is None:
            max_new_tokens = 2 * src.shape[1] + 10
        if max_new_tokens < 1:
            raise ValueError(f"Seq2Seq.generate: expected max_new_tokens >= 1, but got {max_new_tokens}.")
        return min(max_new_tokens, self.config.max_len - 1)

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        *,
        beam_size: int = 1,
        max_new_tokens: int | None = None,
        length_penalty: float = 1.0,
        pattern: Pattern | None = None,
    ) -> list[list[int]]:
        """Target token ids per source row, without ``bos``/``eos``.

        ``beam_size == 1`` decodes greedily; otherwise beam search keeps ``beam_size``
        hypotheses per row and ranks finished ones by ``log p / length ** length_penalty``
        (Wu et al. 2016 normalize likewise). A row is done when ``beam_size`` hypotheses have
        ended with ``eos`` among the top candidates, or at ``max_new_tokens`` (default
        ``2 * S + 10``).
        """
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"Seq2Seq.generate: expected beam_size >= 1, but got {beam_size!r}.")
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
            kind = type(length_penalty).__name__
            raise TypeError(f"Seq2Seq.generate: expected length_penalty to be a number, but got {kind}.")
        if not math.isfinite(length_penalty):
            raise ValueError(
                f"Seq2Seq.generate: expected a finite length_penalty, but got {length_penalty!r}."
            )
        was_training = self.training
        self.eval()
        try:
            if beam_size == 1:
                return self._greedy(src, self._max_new(src, max_new_tokens), pattern)
            return self._beam(src, beam_size, self._max_new(src, max_new_tokens), length_penalty, pattern)
        finally:
            self.train(was_training)

    def _greedy(self, src: Tensor, max_new: int, pattern: Pattern | None) -> list[list[int]]:
        c = self.config
        memory, src_key_mask = self.encode(src, pattern=pattern)
        B = src.shape[0]
        cache = self.decoder.new_cache()
        tok = torch.full((B, 1), c.bos_id, dtype=torch.long, device=src.device)
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        for _ in range(max_new):
            logits = self.decode(tok, memory, src_key_mask, cache=cache, src=src)[:, -1]
            nxt = logits.float().log_softmax(-1).argmax(-1)
            for b in (~done).nonzero().flatten().tolist():
                if int(nxt[b]) == c.eos_id:
                    done[b] = True
                else:
                    out[b].append(int(nxt[b]))
            if bool(done.all()):
                break
            tok = nxt[:, None]
        return out

    def _beam(self, src: Tensor, K: int, max_new: int, lp: float, pattern: Pattern | None) -> list[list[int]]:
        c = self.config
        B = src.shape[0]
        memory, src_key_mask = self.encode(src, pattern=pattern)
        memory, src_key_mask = memory.repeat_interleave(K, 0), src_key_mask.repeat_interleave(K, 0)
        beam_src = src.repeat_interleave(K, 0)
        cache = self.decoder.new_cache()
        seqs = torch.full((B * K, 1), c.bos_id, dtype=torch.long, device=src.device)
        scores = torch.full((B, K), float("-inf"), device=src.device)
        scores[:, 0] = 0.0  # one live beam per row at the start: the others are copies
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new):
            logp = self.decode(seqs[:, -1:], memory, src_key_mask, cache=cache, src=beam_src)[:, -1]
            logp = logp.float().log_softmax(-1)
            V = logp.shape[-1]
            cand = (scores.reshape(B * K, 1) + logp).reshape(B, K * V)
            top_scores, top_idx = cand.topk(2 * K, dim=-1)
            top_beam, top_tok = top_idx // V, top_idx % V
            new_scores = torch.full((B, K), float("-inf"), device=src.device)
            new_beam = torch.zeros((B, K), dtype=torch.long, device=src.device)
            new_tok = torch.full((B, K), c.pad_id, dtype=torch.long, device=src.device)
            ts, tb, tt = top_scores.tolist(), top_beam.tolist(), top_tok.tolist()
            for b in range(B):
                if done[b]:
                    continue
                j = 0
                for r in range(2 * K):
                    if ts[b][r] == float("-inf"):
                        break
                    if tt[b][r] == c.eos_id:
                        if r < K:  # an ending counts only if it ranks among the K best
                            hyp = seqs[b * K + tb[b][r], 1:].tolist()
                            finished[b].append((ts[b][r] / (step + 1) ** lp, hyp))
                    else:
                        new_scores[b, j], new_beam[b, j], new_tok[b, j] = ts[b][r], tb[b][r], tt[b][r]
                        j += 1
                    if j == K:
                        break
                done[b] = len(finished[b]) >= K
            if all(done):
                break
            order = (torch.arange(B, device=src.device)[:, None] * K + new_beam).reshape(-1)
            cache.reorder(order)
            seqs = torch.cat([seqs[order], new_tok.reshape(-1, 1)], dim=1)
            scores = new_scores
        for b in range(B):  # rows that hit max_new_tokens: their live beams compete as they are
            if not done[b]:
                length = seqs.shape[1] - 1
                for k in range(K):
                    s = float(scores[b, k])
                    if s > float("-inf"):
                        finished[b].append((s / max(length, 1) ** lp, seqs[b * K + k, 1:].tolist()))
        return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]

    # -- checkpoints ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, backend: str = "auto") -> Seq2Seq:
        """Load an attnkit ``Seq2Seq`` checkpoint written by :meth:`save_pretrained`."""
        directory = checkpoint_dir(path)
        own = own_config(directory, cls.model_name)
        if own is None:
            raise ValueError(
                f"Seq2Seq.from_pretrained: {str(directory)!r} is not an attnkit Seq2Seq checkpoint."
            )
        model = cls(Seq2SeqConfig.from_dict(own), backend=backend)
        state = load_weights(directory)
        _tie(model, state)
        load_state(model, state, str(directory))
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (shared tensors stored once), atomically."""
        state = self.state_dict()
        for name in _tied_names(self):
            state.pop(name)
        return save_checkpoint(path, self.model_name, self.config, state)


def _tied_names(model: Seq2Seq) -> list[str]:
    names = []
    if model.config.share_embeddings:
        names.append("tgt_embed.weight")
    if model.config.tie_output:
        names.append("out_proj.weight")
    return names


def _tie(model: Seq2Seq, state: dict[str, Tensor]) -> None:
    if model.config.share_embeddings:
        state["tgt_embed.weight"] = state["src_embed.weight"]
    if model.config.tie_output:
        state["out_proj.weight"] = state["tgt_embed.weight"]
