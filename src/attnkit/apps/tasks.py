"""Using a trained translator or summarizer: batch inference, evaluation, alignments.

A model directory is what ``attnkit train`` writes under ``RUN/model``: the
:class:`~attnkit.models.Seq2Seq` checkpoint, ``tokenizer.json`` and ``task.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .._files import atomic_write
from ..data import load_pairs
from ..models import Seq2Seq, Tokenizer
from ..models._io import read_json
from ..viz.record import record
from .errors import UsageError, positive, reading
from .train import default_run_dir, source_batch

__all__ = [
    "TaskModel",
    "cross_attention",
    "evaluate",
    "in_length_order",
    "lead_baseline",
    "load_task_model",
    "run_eval",
    "run_generate",
    "score",
]


@dataclass
class TaskModel:
    model: Seq2Seq
    tokenizer: Tokenizer
    task: dict
    path: Path

    @property
    def length_penalty(self) -> float:
        """The run's beam-search length penalty (``length_penalty`` of its config)."""
        return float(self.task.get("length_penalty", 1.0))

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Right-padded source ids ``(B, S)`` with ``eos``, truncated to the trained length."""
        device = next(self.model.parameters()).device
        return source_batch(self.tokenizer, texts, self.task["max_src_tokens"]).to(device)

    def generate_ids(
        self,
        texts: list[str],
        *,
        beam_size: int | None = None,
        length_penalty: float | None = None,
        batch_size: int = 32,
        progress=None,
    ) -> list[list[int]]:
        """Output token ids for ``texts`` in order, decoded in length-sorted batches; ``progress``
        is called with the number of texts done after each batch. ``beam_size`` and
        ``length_penalty`` default to the run's (see :meth:`Seq2Seq.generate`)."""
        beam = self.task.get("beam_size", 4) if beam_size is None else beam_size
        lp = self.length_penalty if length_penalty is None else length_penalty

        def run(batch: list[str]) -> list[list[int]]:
            return self.model.generate(
                self.encode(batch), beam_size=beam, length_penalty=lp,
                max_new_tokens=self.task.get("max_tgt_tokens", 128),
            )  # fmt: skip

        return in_length_order(texts, run, batch_size=batch_size, progress=progress)

    def generate(self, texts: list[str], **kwargs) -> list[str]:
        """Output texts for ``texts`` (see :meth:`generate_ids` for the arguments)."""
        return [self.tokenizer.decode(ids) for ids in self.generate_ids(texts, **kwargs)]


def in_length_order(
    texts: list[str], run: Callable[[list[str]], list], *, batch_size: int = 32, progress=None
) -> list:
    """``run`` over ``texts`` in batches of similar length (little padding), results returned
    in the original order; ``progress(n)`` after each batch."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, result in zip(idx, run([texts[i] for i in idx]), strict=True):
            out[i] = result
        if progress is not None:
            progress(len(idx))
    return out


def load_task_model(path: str | Path, *, device: str | torch.device = "cpu") -> TaskModel:
    """Load ``RUN/model`` (or ``RUN``, whose ``model/`` is used) onto ``device``."""
    p = Path(path).expanduser()
    if (p / "model" / "task.json").is_file():
        p = p / "model"
    if not (p / "task.json").is_file():
        raise FileNotFoundError(
            f"expected a trained model directory (with task.json, written by `attnkit train`), but "
            f"{str(p)!r} has none."
        )
    return TaskModel(Seq2Seq.from_pretrained(p).to(device), Tokenizer(p), read_json(p / "task.json"), p)


def score(task: str, hyps: list[str], refs: list[str]) -> dict:
    """sacreBLEU + chrF (translation) or ROUGE-1/2/L F1 (summarization), in percent."""
    if task == "translate":
        import sacrebleu

        bleu = sacrebleu.metrics.BLEU()
        chrf = sacrebleu.metrics.CHRF()
        b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
        return {
            "bleu": round(b.score, 2),
            "chrf": round(c.score, 2),
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()),
        }
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for h, r in zip(hyps, refs, strict=True):
        for k, s in scorer.score(r, h).items():
            totals[k] += s.fmeasure
    n = max(len(hyps), 1)
    return {k: round(100 * v / n, 2) for k, v in totals.items()} | {
        "rouge_signature": "rouge-score, F1, stemmer"
    }


def lead_baseline(texts: list[str], words: int = 10) -> list[str]:
    """The first ``words`` words of each text: the summarization baseline."""
    return [" ".join(t.split()[:words]) for t in texts]


def read_test_file(path: str | Path) -> list[tuple[str, str]]:
    """``(source, reference)`` pairs of a test file: ``source<TAB>reference``, one pair a line,
    UTF-8; blank lines are skipped.

    Raises:
        FileNotFoundError: There is no such file.
        ValueError: A line is not two non-empty fields separated by one tab (the message names
            the file and line), or the file has no pair.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"expected a test file (source<TAB>reference, one pair a line), but {str(p)!r} does not exist."
        )
    pairs = []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise ValueError(
                f"{p}:{number}: expected 'source<TAB>reference' (two non-empty fields, one tab), but "
                f"got {len(fields) - 1} tabs in {line[:60]!r}."
            )
        pairs.append((fields[0].strip(), fields[1].strip()))
    if not pairs:
        raise ValueError(f"{p}: expected at least one 'source<TAB>reference' line, but the file has none.")
    return pairs


def evaluate(
    path: str | Path,
    *,
    split: str = "test",
    beam_size: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    test_file: str | Path | None = None,
    length_penalty: float | None = None,
) -> dict:
    """Decode ``split`` of the model's corpus (or the pairs of ``test_file``, see
    :func:`read_test_file`) and score it; writes ``eval-{split}-beam{K}.json`` and
    ``eval-{split}-beam{K}.hyp.txt`` next to the model (``split`` is ``file-{name}`` for a
    test file; a ``length_penalty`` other than the run's adds ``-lp{value}`` to the names).
    ``beam_size`` and ``length_penalty`` default to the run's."""
    tm = load_task_model(path, device=device)
    lp = tm.length_penalty if length_penalty is None else length_penalty
    if test_file is not None:
        pairs = read_test_file(test_file)[:limit]
        split = f"file-{Path(test_file).stem}"
        srcs, refs = [s for s, _ in pairs], [r for _, r in pairs]
    else:
        pairs = load_pairs(tm.task["corpus"], split)[:limit]
        if not pairs:
            raise ValueError(f"eval: split {split!r} of {tm.task['corpus']!r} is empty.")
        srcs, refs = [p.src for p in pairs], [p.tgt for p in pairs]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(srcs), desc=f"decode {split}", unit="ex", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        hyps = tm.generate(
            srcs, beam_size=beam_size, length_penalty=lp, progress=None if bar is None else bar.update
        )
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    beam = tm.task.get("beam_size", 4) if beam_size is None else beam_size
    result = {"task": tm.task["task"], "split": split, "examples": len(pairs), "beam_size": beam,
              "length_penalty": lp,
              **({"test_file": str(test_file)} if test_file is not None else {}),
              "decode_seconds": round(seconds, 1), "model": str(tm.path), "step": tm.task.get("step"),
              **score(tm.task["task"], hyps, refs)}  # fmt: skip
    if tm.task["task"] == "summarize":
        result["lead10_baseline"] = score("summarize", lead_baseline(srcs), refs)
    text = json.dumps(result, indent=2) + "\n"
    stem = f"eval-{split}-beam{beam}" + ("" if lp == tm.length_penalty else f"-lp{lp:g}")
    atomic_write(tm.path / f"{stem}.json", lambda p: p.write_text(text, encoding="utf-8"))
    lines = "".join(h.replace("\n", " ") + "\n" for h in hyps)
    atomic_write(tm.path / f"{stem}.hyp.txt", lambda p: p.write_text(lines, encoding="utf-8"))
    return result


@torch.no_grad()
def cross_attention(
    tm: TaskModel, text: str, out_ids: list[int]
) -> tuple[list[str], list[str], torch.Tensor]:
    """Source tokens, output tokens and the decoder's cross-attention ``(T, S)`` averaged over
    the last layer's heads, for the output ids ``out_ids`` (from :meth:`TaskModel.generate_ids`)
    as the model's output for ``text``."""
    c = tm.model.config
    src = tm.encode([text])
    tgt_in = torch.tensor([[c.bos_id, *out_ids]])
    tm.model.eval()
    with record(tm.model) as rec:
        tm.model(src, tgt_in)
    last_cross = [n for n in rec.layers if "cross" in n][-1]
    weights = rec.layer(last_cross)[0].mean(0)  # (T+1, S): row t is the step that wrote token t
    src_tokens = tm.tokenizer.id_to_tokens(src[0])
    out_tokens = tm.tokenizer.id_to_tokens([*out_ids, c.eos_id])
    return src_tokens, out_tokens, weights


def check_decoding(beam: int | None, length_penalty: float | None) -> None:
    """``--beam`` at least 1 and a finite ``--length-penalty`` (None: the run's)."""
    if beam is not None and beam < 1:
        raise UsageError(f"--beam: expected >= 1, but got {beam}.")
    if length_penalty is not None and not math.isfinite(length_penalty):
        raise UsageError(f"--length-penalty: expected a finite number, but got {length_penalty}.")


def run_eval(run: str, *, test_file: str | None = None, beam: int | None = None,
             length_penalty: float | None = None, **options) -> int:  # fmt: skip
    """``attnkit eval``: score ``run`` (see :func:`evaluate` for ``options``) and print the
    result as JSON."""
    if test_file is not None:
        with reading("--test-file"):
            read_test_file(test_file)  # a bad file fails before the model loads
    check_decoding(beam, length_penalty)
    result = evaluate(run, test_file=test_file, beam_size=beam, length_penalty=length_penalty, **options)
    print(json.dumps(result, indent=2))
    return 0


def run_generate(
    task: str,
    text: str,
    *,
    model: str | None = None,
    beam: int | None = None,
    length_penalty: float | None = None,
    show_attention: bool = False,
    max_tokens: int = 32,
    cache_dir: str | None = None,
) -> int:
    """``attnkit translate|summarize``: run a trained model on ``text`` (``'-'``: one input per
    line of stdin) and print the outputs; with ``show_attention`` the first output's
    cross-attention goes to stderr."""
    import sys

    from ..viz.terminal import color_enabled, render_matrix

    with reading("--model"):
        tm = load_task_model(model or default_run_dir(task, cache_dir))
    if tm.task["task"] != task:
        raise UsageError(
            f"--model: expected a {task!r} model, but {str(tm.path)!r} is for {tm.task['task']!r}."
        )
    texts = [ln.strip() for ln in sys.stdin.read().splitlines()] if text == "-" else [text]
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise UsageError("TEXT: expected some text (or lines on stdin with '-'), but got nothing.")
    check_decoding(beam, length_penalty)
    positive(max_tokens=max_tokens)
    ids = tm.generate_ids(texts, beam_size=beam, length_penalty=length_penalty)
    for out in ids:
        print(tm.tokenizer.decode(out))
    if show_attention:
        src, tgt, w = cross_attention(tm, texts[0], ids[0])
        print(file=sys.stderr)
        print(render_matrix(w, tgt, src, color=color_enabled(), max_tokens=max_tokens,
                            title="Cross-attention of the first output (last decoder layer, mean of heads): "
                            "row = output token, column = source token"), file=sys.stderr)  # fmt: skip
        print("Alignment: " + ", ".join(f"{t}->{src[int(w[i].argmax())]}" for i, t in enumerate(tgt)),
              file=sys.stderr)  # fmt: skip
    return 0
