"""Do the summaries carry names over? Recall of the reference's names found in the source.

    python bench/summary_names.py CORPUS/test.jsonl RUN_DIR [RUN_DIR ...]   # seconds

A *name* is a word of the reference synopsis that also occurs in the description and looks like
a name or an identifier: it contains a digit ("389", "mips64r6", "z3") or starts with a capital
letter and has at least three characters ("Cockpit", "PHP"). For each run, counts how many of
them its test outputs contain (one line per test pair: ``RUN/model/eval-test-beam4.hyp.txt``
as ``attnkit eval RUN --beam 4`` writes it, or its copy ``model-eval-test-beam4.hyp.txt`` in a
folder under ``bench/results/runs/``), and how many of the outputs' own names the description
does not have (invented ones). This is what a copy mechanism is for, and ROUGE sees it only
diluted among all words. Writes ``bench/results/summary_names.json``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS

WORD = re.compile(r"[A-Za-z0-9][\w.+-]*")


def words(text: str) -> set[str]:
    return {w.rstrip(".") for w in WORD.findall(text)}


def is_name(word: str) -> bool:
    return any(c.isdigit() for c in word) or (word[:1].isupper() and len(word) >= 3)


def score(pairs: list[dict], outputs: list[str]) -> dict:
    if len(outputs) != len(pairs):
        raise ValueError(f"expected {len(pairs)} outputs (one per test pair), got {len(outputs)}")
    wanted = found = produced = invented = 0
    for pair, out in zip(pairs, outputs, strict=True):
        src, hyp = words(pair["src"]), words(out)
        names = {w for w in words(pair["tgt"]) & src if is_name(w)}
        wanted += len(names)
        found += len(names & hyp)
        own = {w for w in hyp if is_name(w)}
        produced += len(own)
        invented += len(own - src)
    return {
        "reference_names_in_source": wanted,
        "carried_over": found,
        "recall_percent": round(100 * found / max(wanted, 1), 1),
        "output_names": produced,
        "not_in_source": invented,
        "invented_percent": round(100 * invented / max(produced, 1), 1),
    }


def outputs_file(run: Path) -> Path:
    """The beam-4 test outputs of a run directory or of its folder under bench/results/runs."""
    for path in (run / "model" / "eval-test-beam4.hyp.txt", run / "model-eval-test-beam4.hyp.txt"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{str(run)!r} has no beam-4 test outputs: run `attnkit eval {run} --beam 4`")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    test = Path(sys.argv[1])
    pairs = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines() if line]
    out = {"test": str(test), "pairs": len(pairs), "runs": {}}
    for run in map(Path, sys.argv[2:]):
        text = outputs_file(run).read_text(encoding="utf-8")
        out["runs"][run.name] = score(pairs, text.removesuffix("\n").split("\n"))
        print(run.name, out["runs"][run.name])
    (RESULTS / "summary_names.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
