"""attnkit's Seq2Seq against ``torch.nn.Transformer`` at equal budget, on en→de translation.

    python bench/apps.py [--steps 600] [--threads N] [--resume]

Both models have the same architecture (pre-norm, d 256, 4 heads, FFN 1024, 3+3 layers,
ReLU, dropout 0.1, sinusoidal positions scaled embeddings, one shared embedding table tied to
the output), the same tokenizer (8k BPE trained on the training split), the same optimizer,
schedule, label smoothing and clipping, and see **the same batches in the same order**: each
step trains attnkit on a batch, then ``torch.nn.Transformer`` on the same batch, so machine
noise hits both alike. Afterwards both decode the first ``--test`` held-out sentences greedily
(the baseline has no KV cache, so decoding speed is not compared) and are scored with
sacreBLEU and chrF.

Reported: training tokens per second of each (real source + target tokens / step time),
their ratio, validation loss and BLEU/chrF. The state is checkpointed every 50 steps
(``bench/results/tmp/apps-state.pt``); ``--resume`` continues. Writes
``bench/results/apps.json`` and ``docs/bench/apps.md``. Needs the corpus
(``attnkit data translate``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, RESULTS, env_line, environment, save
from attnkit.apps.tasks import in_length_order, score
from attnkit.apps.train import (
    TrainConfig,
    collate,
    encode_pairs,
    make_optimizer,
    resolve_corpus,
    source_batch,
    token_batches,
    train_step,
    valid_loss,
)
from attnkit.data import cache_root, load_pairs, train_tokenizer
from attnkit.models import Seq2Seq, Tokenizer
from attnkit.models._io import atomic_write
from attnkit.nn import SinusoidalPositionalEncoding

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "translate-en-de-cpu.json"
STATE = RESULTS / "tmp" / "apps-state.pt"


class TorchTransformerSeq2Seq(nn.Module):
    """The baseline: the same model as :class:`attnkit.models.Seq2Seq` with the encoder and
    decoder stacks of ``torch.nn.Transformer``."""

    def __init__(self, c) -> None:
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.src_vocab_size, c.dim, padding_idx=c.pad_id)
        self.pos = SinusoidalPositionalEncoding(c.dim, c.max_len)
        self.dropout = nn.Dropout(c.dropout)
        self.transformer = nn.Transformer(
            c.dim, c.num_heads, c.encoder_layers, c.decoder_layers, c.ffn_dim, c.dropout,
            activation="relu", batch_first=True, norm_first=c.norm_first,
        )  # fmt: skip
        self.out_proj = nn.Linear(c.dim, c.src_vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=c.dim**-0.5)
        with torch.no_grad():
            self.embed.weight[c.pad_id].zero_()
        self.out_proj.weight = self.embed.weight

    def _in(self, ids: Tensor) -> Tensor:
        return self.dropout(self.pos(self.embed(ids) * math.sqrt(self.config.dim)))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        pad = self.config.pad_id
        T = tgt_in.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = hidden, as torch expects
        h = self.transformer(
            self._in(src), self._in(tgt_in), tgt_mask=causal, tgt_is_causal=True,
            src_key_padding_mask=src == pad, tgt_key_padding_mask=tgt_in == pad,
            memory_key_padding_mask=src == pad,
        )  # fmt: skip
        return self.out_proj(h)

    loss = Seq2Seq.loss  # the same objective: it only calls self(src, tgt_in) and reads the pad id

    @torch.no_grad()
    def generate(self, src: Tensor, *, max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding, re-running the decoder on the whole prefix each step."""
        self.eval()
        c = self.config
        memory = self.transformer.encoder(self._in(src), src_key_padding_mask=src == c.pad_id)
        ys = torch.full((src.shape[0], 1), c.bos_id, dtype=torch.long)
        done = torch.zeros(src.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            T = ys.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool).triu(1)
            h = self.transformer.decoder(
                self._in(ys),
                memory,
                tgt_mask=causal,
                tgt_is_causal=True,
                memory_key_padding_mask=src == c.pad_id,
            )
            nxt = self.out_proj(h[:, -1]).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, c.pad_id), nxt)
            ys = torch.cat([ys, nxt[:, None]], 1)
            done |= nxt == c.eos_id
            if bool(done.all()):
                break
        rows = ys[:, 1:].tolist()  # cut at eos (the padding after it goes too)
        return [row[: row.index(c.eos_id)] if c.eos_id in row else row for row in rows]


def decode_all(model, tok: Tokenizer, texts: list[str], cfg: TrainConfig) -> list[str]:
    """Greedy outputs of ``texts`` in order, in length-sorted batches."""

    def run(batch: list[str]) -> list[str]:
        src = source_batch(tok, batch, cfg.max_src_tokens)
        if isinstance(model, Seq2Seq):
            hyps = model.generate(src, beam_size=1, max_new_tokens=cfg.max_tgt_tokens)
        else:
            hyps = model.generate(src, max_new_tokens=cfg.max_tgt_tokens)
        return [tok.decode(h) for h in hyps]

    return in_length_order(texts, run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps of each model (default 600)")
    ap.add_argument("--test", type=int, default=500, help="held-out sentences decoded (default 500)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from attnkit.apps.train import load_config

    cfg = load_config(CONFIG)
    corpus = resolve_corpus(cfg.corpus, cache_root(args.cache_dir))
    train = load_pairs(corpus, "train")
    tok_path = RESULTS / "tmp" / "apps-tokenizer.json"
    if not tok_path.is_file():
        train_tokenizer((x for p in train for x in (p.src, p.tgt)), tok_path, vocab_size=cfg.vocab_size)
    tok = Tokenizer(tok_path)
    data = encode_pairs(tok, train, cfg, drop_long=True)
    lengths = [(len(s), len(t)) for s, t in data]
    valid = encode_pairs(tok, load_pairs(corpus, "valid")[: cfg.valid_pairs], cfg, drop_long=False)
    mcfg = cfg.model_config(tok.vocab_size)
    torch.manual_seed(cfg.seed)
    models = {"attnkit": Seq2Seq(mcfg), "torch.nn.Transformer": TorchTransformerSeq2Seq(mcfg)}
    opts = {k: make_optimizer(m, cfg) for k, m in models.items()}
    st = {"step": 0, "epoch": 0, "position": 0, "times": {k: [] for k in models}, "tokens": []}
    if args.resume and STATE.is_file():
        blob = torch.load(STATE, weights_only=False)
        for k in models:
            models[k].load_state_dict(blob["models"][k])
            opts[k].load_state_dict(blob["opts"][k])
        torch.set_rng_state(blob["rng"])
        st = blob["state"]
        print(f"resumed at step {st['step']}")
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=st["step"], desc="train both", unit="step", dynamic_ncols=True)
    while st["step"] < args.steps:
        batches = token_batches(lengths, cfg.batch_tokens, cfg.seed, st["epoch"], cfg.batch_sort)
        if st["position"] >= len(batches):
            st["epoch"], st["position"] = st["epoch"] + 1, 0
            continue
        batch = collate([data[i] for i in batches[st["position"]]])
        for name, model in models.items():
            t0 = time.perf_counter()
            train_step(model, opts[name], batch, cfg, st["step"] + 1)
            st["times"][name].append(time.perf_counter() - t0)
        st["tokens"].append(batch.tokens)
        st["step"] += 1
        st["position"] += 1
        tps = {k: sum(st["tokens"]) / sum(v) for k, v in st["times"].items()}
        bar.update(1)
        bar.set_postfix({k.split(".")[-1]: f"{v:,.0f} tok/s" for k, v in tps.items()}, refresh=False)
        if st["step"] % 50 == 0 or st["step"] == args.steps:
            blob = {
                "models": {k: m.state_dict() for k, m in models.items()},
                "opts": {k: o.state_dict() for k, o in opts.items()},
                "rng": torch.get_rng_state(),
                "state": st,
            }
            atomic_write(STATE, lambda p, b=blob: torch.save(b, p))
    bar.close()

    test = load_pairs(corpus, "test")[: args.test]
    results = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        hyps = decode_all(model, tok, [p.src for p in test], cfg)
        ratios = st["times"][name]
        results[name] = {
            "train_tokens_per_s": sum(st["tokens"]) / sum(ratios),
            "median_step_s": statistics.median(ratios),
            "valid_loss": valid_loss(model, valid, cfg),
            "decode_s": time.perf_counter() - t0,
            **score("translate", hyps, [p.tgt for p in test]),
            "samples": [
                {"src": p.src, "ref": p.tgt, "hyp": h} for p, h in list(zip(test, hyps, strict=True))[:5]
            ],
        }
    a, b = results["attnkit"], results["torch.nn.Transformer"]
    per_step = [
        x / y for x, y in zip(st["times"]["torch.nn.Transformer"], st["times"]["attnkit"], strict=True)
    ]
    env = environment()
    payload = {
        "env": env, "steps": st["step"], "train_tokens": sum(st["tokens"]), "test_sentences": len(test),
        "config": str(CONFIG.relative_to(ROOT)), "results": results,
        "speed_ratio": a["train_tokens_per_s"] / b["train_tokens_per_s"],
        "median_step_time_ratio": statistics.median(per_step),
        "bleu_difference": a["bleu"] - b["bleu"],
    }  # fmt: skip
    path = save("apps", payload)
    lines = [
        "# attnkit Seq2Seq vs torch.nn.Transformer (en→de, equal budget)",
        "",
        f"`python bench/apps.py --steps {args.steps}` on {env_line(env)}. "
        f"{st['step']} steps of the same batches for both ({sum(st['tokens']):,} real tokens), "
        f"greedy decoding of the first {len(test)} test sentences. Results: `{path.relative_to(ROOT)}`.",
        "",
        "| model | train tokens/s | median step | valid loss | BLEU | chrF |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['train_tokens_per_s']:,.0f} | {r['median_step_s']:.2f} s | "
                     f"{r['valid_loss']:.3f} | {r['bleu']:.1f} | {r['chrf']:.1f} |")  # fmt: skip
    lines += [
        "",
        f"attnkit / torch.nn.Transformer training throughput: **{payload['speed_ratio']:.3f}×** "
        f"(median per-step ratio {payload['median_step_time_ratio']:.3f}×); "
        f"BLEU difference {payload['bleu_difference']:+.1f}.",
        "",
        f"BLEU signature: `{a['bleu_signature']}`",
    ]
    (DOCS / "apps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
