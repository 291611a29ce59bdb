"""Regenerate the pictures in docs/images from the real commands (needs Chromium + playwright).

    python scripts/screenshots.py

* explain-terminal.png: `attnkit explain "The cat sat on the mat." --color always`, its ANSI
  colors turned into HTML and photographed in headless Chromium;
* explain-html-head.png / explain-html-model.png: the `--html` report, head view with "sat"
  clicked, and model view;
* explain-heatmaps.png: `--png`; pattern-window-causal.png: `attnkit patterns ... --png`.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from attnkit.viz.browser import open_page

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
TEXT = "The cat sat on the mat."


def xterm256(index: int) -> str:
    """The RGB colour of an xterm 256-colour palette index (the cube and the grey ramp)."""
    if index >= 232:
        v = 8 + 10 * (index - 232)
        return f"rgb({v},{v},{v})"
    levels = [0, 95, 135, 175, 215, 255]
    i = index - 16
    return f"rgb({levels[i // 36]},{levels[i // 6 % 6]},{levels[i % 6]})"


def ansi_to_html(text: str) -> str:
    out, style = [], {}
    for part in re.split(r"(\x1b\[[0-9;]*m)", text):
        m = re.fullmatch(r"\x1b\[([0-9;]*)m", part)
        if not m:
            css = ";".join(f"{k}:{v}" for k, v in style.items())
            out.append(f'<span style="{css}">{html.escape(part)}</span>' if css else html.escape(part))
            continue
        codes = m.group(1).split(";")
        if codes == ["0"]:
            style = {}
        elif codes[:2] == ["48", "5"]:
            style["background"] = xterm256(int(codes[2]))
        elif codes == ["30"]:
            style["color"] = "#000"
        elif codes == ["97"]:
            style["color"] = "#fff"
    return "".join(out)


def run(*args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "attnkit.cli", *args], capture_output=True, text=True, check=True
    )
    return res.stdout


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        term = Path(tmp) / "terminal.html"
        body = ansi_to_html(run("explain", TEXT, "--color", "always"))
        term.write_text(
            "<!DOCTYPE html><meta charset='utf-8'><body style='margin:0;background:#1e1e1e'>"
            "<pre style='margin:0;padding:14px 18px;color:#e6e6e6;font:13px/1.35 DejaVu Sans Mono,monospace;"
            f'display:inline-block\'>$ attnkit explain "{html.escape(TEXT)}"\n{body}</pre>'
        )
        with open_page(term, width=900, height=600) as bp:
            bp.page.locator("pre").screenshot(path=str(IMAGES / "explain-terminal.png"))
        report = Path(tmp) / "report.html"
        run("explain", TEXT, "--html", str(report), "--png", str(IMAGES / "explain-heatmaps.png"))
        with open_page(report, width=1100, height=560) as bp:
            bp.page.locator("text.tok.q").nth(3).click()
            bp.page.screenshot(path=str(IMAGES / "explain-html-head.png"))
            bp.page.click("#tab-model")
            bp.page.screenshot(path=str(IMAGES / "explain-html-model.png"), full_page=True)
    run(
        "patterns",
        "SlidingWindow(64) & Causal()",
        "-n",
        "512",
        "--png",
        str(IMAGES / "pattern-window-causal.png"),
    )
    for p in sorted(IMAGES.glob("*.png")):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
