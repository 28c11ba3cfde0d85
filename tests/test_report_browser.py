"""The HTML report in headless Chromium, at 1400 and 800 px: no script errors, sortable and filterable
tables, the per-concept picker, every section drawn (screenshots), and the page without script and in print.

Needs a Chromium binary (Debian: ``apt-get install chromium``) and the ``playwright`` package (the
``dev`` extra; its own browser download is never used). Set ``CONCEPTLENS_SCREENSHOTS=DIR`` to keep
the screenshots for a look.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptlens.report import SECTIONS, write_report
from conceptlens.report.anchors import concept_anchor
from tests.test_report import CONCEPTS, add_controls, build_results

CHROMIUM = next((path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium); the browser checks are skipped"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing: pip install -e '.[dev]'")

#: Chromium flags (playwright adds --headless and a fresh temporary profile itself).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
WIDTHS = (1400, 800)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "results"
    add_controls(build_results(out))
    return write_report(out)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


def _open(browser, report: Path, width: int, script: bool = True):
    """A page of ``report`` at ``width`` px, with the console errors and uncaught exceptions it logs."""
    context = browser.new_context(viewport={"width": width, "height": 900}, java_script_enabled=script)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    return page, errors


def _column(page, table: str, index: int) -> list[str]:
    """The sort keys (``data-sort``, else the text) of column ``index`` of the visible rows of ``table`` (a CSS selector)."""
    return page.eval_on_selector_all(f"{table} tbody tr:not([hidden])",
                                     f"rows => rows.map(r => r.cells[{index}].getAttribute('data-sort') ?? r.cells[{index}].textContent.trim())")


@pytest.mark.parametrize("width", WIDTHS)
def test_loads_without_errors_and_every_section_is_drawn(browser, report, tmp_path, width):
    page, errors = _open(browser, report, width)
    assert page.evaluate("document.documentElement.className") == "js"
    folder = Path(os.environ.get("CONCEPTLENS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    for sid, _ in SECTIONS:
        section = page.locator(f"section#{sid}")
        box = section.bounding_box()
        assert box is not None and box["height"] > 60, sid
        assert box["x"] + box["width"] <= width + 1, sid  # nothing pushes the page wider than the window
        shot = section.screenshot(path=str(folder / f"{width}_{sid}.png"))
        with Image.open(io.BytesIO(shot)) as image:
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 10 and len(np.unique(pixels)) > 20, sid  # not blank
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    assert errors == []


@pytest.mark.parametrize("width", WIDTHS)
def test_sorting_a_table_reorders_its_rows(browser, report, width):
    page, errors = _open(browser, report, width)
    table = "section#tcav table.sortable"
    headers = page.eval_on_selector_all(f"{table} thead th", "cells => cells.map(c => c.textContent.trim())")
    column = headers.index("p")
    before = [float(v) for v in _column(page, table, column)]
    page.locator(f"{table} thead th").nth(column).click()
    ascending = [float(v) for v in _column(page, table, column)]
    assert ascending == sorted(before) and ascending != before
    page.locator(f"{table} thead th").nth(column).click()
    assert [float(v) for v in _column(page, table, column)] == sorted(before, reverse=True)
    concept = headers.index("concept")
    page.locator(f"{table} thead th").nth(concept).click()  # text column: alphabetical
    assert _column(page, table, concept) == sorted(_column(page, table, concept))
    assert errors == []


@pytest.mark.parametrize("width", WIDTHS)
def test_the_filter_hides_rows(browser, report, width):
    page, errors = _open(browser, report, width)
    table = "section#tcav table.filterable"
    assert len(_column(page, table, 0)) == 8
    box = page.locator("section#tcav .filter-bar input")
    box.fill("wheel layer2")  # every word must appear in the row
    assert _column(page, table, 0) == ["wheel"]
    assert page.locator("section#tcav .filter-bar span").text_content() == "1 of 8 rows"
    box.fill("wheel")
    assert _column(page, table, 0) == ["wheel"] * 4
    box.fill("")
    assert len(_column(page, table, 0)) == 8
    assert errors == []


@pytest.mark.parametrize("width", WIDTHS)
def test_the_concept_picker_switches_the_block(browser, report, width):
    page, errors = _open(browser, report, width)
    visible = lambda: [c for c in CONCEPTS if page.locator(f"#{concept_anchor(c)}").is_visible()]
    assert visible() == [CONCEPTS[0]]
    page.select_option("#concept-view select", concept_anchor("wheel"))
    assert visible() == ["wheel"]
    page.locator(f'section#findings a[href="#{concept_anchor("road")}"]').first.click()  # a finding's link opens its concept
    page.wait_for_function(f"document.getElementById('{concept_anchor('road')}').classList.contains('active')")
    assert visible() == ["road"] and page.input_value("#concept-view select") == concept_anchor("road")
    page.locator(f'#concept-view .concept-index a[href="#{concept_anchor("car")}"]').click()
    page.wait_for_function(f"document.getElementById('{concept_anchor('car')}').classList.contains('active')")
    assert visible() == ["car"]
    assert errors == []


def test_without_script_and_in_print_everything_shows(browser, report):
    page, errors = _open(browser, report, 1400, script=False)
    assert all(page.locator(f"#{concept_anchor(c)}").is_visible() for c in CONCEPTS)
    assert page.locator(".filter-bar").count() == 0 and not page.locator("#concept-view select").is_visible()
    page, errors = _open(browser, report, 1400)
    page.locator("section#tcav .filter-bar input").fill("wheel")
    page.emulate_media(media="print")
    assert all(page.locator(f"#{concept_anchor(c)}").is_visible() for c in CONCEPTS)
    assert len(page.eval_on_selector_all("section#tcav tbody tr", "rows => rows.filter(r => r.offsetParent !== null).map(r => r)")) == 8
    assert errors == []
