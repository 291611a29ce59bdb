"""The HTML report in a real headless Chromium (Debian's package, driven by Playwright).

Skipped where no browser is installed, except in CI, where ``ATTNKIT_REQUIRE_BROWSER=1``
(set by .ci/run, which installs Chromium) turns a missing browser into a failure.
"""

from __future__ import annotations

import os

import pytest

from attnkit.viz.browser import find_chromium
from attnkit.viz.html import write_html

REQUIRED = os.environ.get("ATTNKIT_REQUIRE_BROWSER") == "1"


def _need_browser():
    try:
        import playwright  # noqa: F401
    except ImportError:
        if REQUIRED:
            raise
        pytest.skip("playwright is not installed")
    if find_chromium() is None:
        if REQUIRED:
            pytest.fail("ATTNKIT_REQUIRE_BROWSER=1 but no Chromium was found")
        pytest.skip("no Chromium installed (apt-get install chromium)")


def test_report_renders_offline_and_reacts_to_clicks(tmp_path, cat_explanation):
    _need_browser()
    from attnkit.viz.browser import open_page

    rec = cat_explanation.record
    path = write_html(rec, tmp_path / "report.html", text=cat_explanation.text, layer=5, head=11)
    with open_page(path) as bp:
        page = bp.page
        assert page.evaluate("window.attnkitReady") is not None  # the script ran to the end
        assert bp.console_errors == [] and bp.page_errors == []
        assert bp.external_requests == [] and bp.requests == [bp.url]
        # token elements and the layer/head selectors exist
        assert page.locator("text.tok.q").all_text_contents() == rec.tokens
        assert page.locator("#layer option").count() == 6
        assert page.locator("#head option").count() == 13  # 12 heads + their mean
        assert page.input_value("#layer") == "5" and page.input_value("#head") == "11"
        # clicking "cat" pins it: only its lines remain, and the readout names its top token
        all_lines = page.locator("#lines line").count()
        page.locator("text.tok.q").nth(2).click()
        assert page.get_attribute("#lines-svg", "data-focus") == "2"
        focused = page.locator("#lines line").count()
        assert 0 < focused < all_lines
        assert page.locator("text.tok.q.active").all_text_contents() == ["cat"]
        top = max(range(9), key=lambda j: float(rec.weights[5][0, 11, 2, j]))
        assert f"attends most to \u201c{rec.tokens[top]}\u201d" in page.text_content("#readout")
        # clicking another token moves the highlight; clicking it again releases it
        page.locator("text.tok.q").nth(6).click()
        assert page.locator("text.tok.q.active").all_text_contents() == ["mat"]
        page.locator("text.tok.q").nth(6).click()
        assert page.get_attribute("#lines-svg", "data-focus") == ""
        # a layer change redraws; the model view lists every layer x head and opens one on click
        page.select_option("#layer", "0")
        assert page.text_content("#map-title").startswith("Layer 0")
        page.click("#tab-model")
        assert page.locator("#model-grid .cell").count() == 72
        page.locator('#model-grid .cell[data-l="0"][data-h="2"]').click()
        assert page.is_visible("#view-head") and page.input_value("#head") == "2"
        page.screenshot(path=str(tmp_path / "shot.png"))
        assert bp.console_errors == [] and bp.page_errors == [] and bp.external_requests == []
    assert (tmp_path / "shot.png").read_bytes()[:4] == b"\x89PNG"


def test_report_shows_the_pattern_in_use(tmp_path, minilm_path):
    _need_browser()
    from attnkit.apps.explain import explain
    from attnkit.viz.browser import open_page

    ex = explain("One two three four five six seven eight nine ten eleven twelve.", model_path=minilm_path,
                 pattern="SlidingWindow(2, 2)")  # fmt: skip
    path = write_html(ex.record, tmp_path / "p.html")
    with open_page(path) as bp:
        assert bp.page.is_visible("#pattern-panel")
        assert ex.record.patterns[0] == "SlidingWindow(before=2, after=2)"
        assert ex.record.patterns[0] in bp.page.text_content("#pattern-title")
        assert bp.console_errors == [] and bp.external_requests == []


def test_report_shows_each_heads_pattern_rollout_and_lost_mass(tmp_path, minilm_path):
    _need_browser()
    from attnkit.apps.explain import dense_record, explain, layer_patterns
    from attnkit.viz import lost_mass
    from attnkit.viz.browser import open_page

    spec = "PerHead([SlidingWindow(1, 1)] * 6 + [SlidingWindow(1, 1) | Global((0,))] * 6)"
    ex = explain("One two three four five six seven eight.", model_path=minilm_path, pattern=spec)
    lost = lost_mass(dense_record(ex), layer_patterns(ex.model))
    path = write_html(ex.record, tmp_path / "f.html", layer=0, head=7, lost=lost)
    with open_page(path) as bp:
        page = bp.page
        assert "Global" in page.text_content("#pattern-title")  # head 7 has the sinks
        page.select_option("#head", "0")
        assert "Global" not in page.text_content("#pattern-title")
        page.select_option("#head", "-1")  # the mean of heads has no single pattern
        assert not page.is_visible("#pattern-panel")
        page.click("#tab-flow")
        assert page.is_visible("#rollout-map") and page.is_visible("#lost-table")
        assert page.locator("#lost-table tr").count() == 7  # a header and 6 layers
        first = page.locator("#lost-table tr").nth(1).locator("td").nth(1).text_content()
        assert first == f"{100 * float(lost[0, 0]):.1f}%"
        assert bp.console_errors == [] and bp.page_errors == [] and bp.external_requests == []
