"""Regenerate (or check) the pattern pictures in docstrings from the patterns themselves.

A picture is a docstring paragraph ``Picture, ``SPEC`` with N=n, S=s::`` followed by an
indented block of rows drawn by ``parse_pattern(SPEC).to_string(n, s, block=1)``.

    python tools/pattern_pictures.py          # rewrite the pictures in src/attnkit/patterns
    python tools/pattern_pictures.py --check  # exit 1 if any picture is stale
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from attnkit.patterns import parse_pattern

HEADER = re.compile(r"^(?P<indent> *)Picture, ``(?P<spec>.+?)`` with N=(?P<n>\d+), S=(?P<s>\d+)::$")
ROOT = Path(__file__).resolve().parents[1] / "src" / "attnkit" / "patterns"


def render(spec: str, n: int, s: int) -> list[str]:
    return parse_pattern(spec).to_string(n, s, block=1).splitlines()[1:]


def pictures(text: str):
    """Yield ``(spec, n, s, first_row_line, rows)`` for every picture in ``text``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = HEADER.match(line)
        if not m:
            continue
        start = i + 2  # a blank line follows the header
        end = start
        while end < len(lines) and lines[end].strip() and set(lines[end].strip()) <= set("█·░"):
            end += 1
        yield m["spec"], int(m["n"]), int(m["s"]), start, [r.strip() for r in lines[start:end]]


def update(path: Path) -> bool:
    lines = path.read_text().splitlines()
    changed = False
    for spec, n, s, start, rows in reversed(list(pictures("\n".join(lines)))):
        want = render(spec, n, s)
        if rows != want:
            indent = re.match(r" *", lines[start - 2]).group(0) + "    "
            lines[start : start + len(rows)] = [indent + r for r in want]
            changed = True
    if changed:
        path.write_text("\n".join(lines) + "\n")
    return changed


def main(argv: list[str]) -> int:
    stale = []
    for path in sorted(ROOT.glob("*.py")):
        if "--check" in argv:
            text = path.read_text()
            if any(rows != render(sp, n, s) for sp, n, s, _, rows in pictures(text)):
                stale.append(path.name)
        elif update(path):
            print(f"updated {path.name}")
    if stale:
        print("stale pictures in: " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
