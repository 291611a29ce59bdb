"""Opening a report in a real headless browser (Chromium driven by Playwright).

Used by the tests (the page must render with no console error and no network request), by the
load-time measurement and by the documentation screenshots. Needs ``playwright`` (PyPI) and a
Chromium binary: Debian's ``chromium`` package, or ``$ATTNKIT_CHROMIUM``. Playwright's own
browser download is not used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BrowserPage", "find_chromium", "open_page"]

# Flags for a locked-down machine: no sandbox (root in CI), no GPU, and none of Chromium's own
# background connections (they would show up as network requests and fail offline).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps",
]  # fmt: skip


def find_chromium() -> str | None:
    """Path of a Chromium binary: ``$ATTNKIT_CHROMIUM``, else ``chromium`` on PATH."""
    env = os.environ.get("ATTNKIT_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class BrowserPage:
    """A loaded page and everything it did: console errors, uncaught exceptions, requests."""

    page: object
    url: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    @property
    def external_requests(self) -> list[str]:
        """Requests for anything other than the page itself."""
        return [r for r in self.requests if r != self.url]


@contextlib.contextmanager
def open_page(path: str | os.PathLike, *, width: int = 1280, height: int = 900) -> Iterator[BrowserPage]:
    """Load the HTML file at ``path`` in headless Chromium and yield a :class:`BrowserPage`
    once its scripts have run (``window.attnkitReady`` set, or the load event)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ImportError("opening pages needs playwright: pip install playwright") from None
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError(
            "no Chromium found: install Debian's chromium package or set ATTNKIT_CHROMIUM."
        )
    url = Path(path).resolve().as_uri()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            bp = BrowserPage(page, url)
            page.on("console", lambda m: bp.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: bp.page_errors.append(str(e)))
            page.on("request", lambda r: bp.requests.append(r.url))
            page.goto(url, wait_until="load")
            with contextlib.suppress(Exception):
                page.wait_for_function("window.attnkitReady !== undefined", timeout=10_000)
            yield bp
        finally:
            browser.close()
