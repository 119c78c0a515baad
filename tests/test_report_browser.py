"""``report.html`` in a real browser: Debian's Chromium driven by Playwright, opened from disk with
every network request refused. Skipped when Playwright or Chromium is missing (CI installs both).

The screenshots go to ``$AUTOUNET_TEST_ARTIFACTS`` (default: pytest's temporary folder, printed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from autounet.reporting import write_html_report
from test_report_html import INJECT_LABEL, injected
from test_reporting import _trained


def wait_until(page, expression: str, timeout_s: float = 10.0) -> None:
    """Poll ``expression`` with ``page.evaluate`` until it is true. Playwright's own
    ``wait_for_function`` polls with an ``eval`` in the page, which the report's Content Security
    Policy (no 'unsafe-eval') refuses whenever the first check is false."""
    import time

    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true after {timeout_s} s: {expression}"
        time.sleep(0.05)


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("AUTOUNET_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def unavailable(reason: str) -> None:
    """Skip, unless CI asked for the browser tests ($AUTOUNET_REQUIRE_BROWSER): then fail."""
    if os.environ.get("AUTOUNET_REQUIRE_BROWSER"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright import sync_api
    except ImportError:
        unavailable("playwright is not installed (pip install playwright)")
    executable = chromium_path()
    if executable is None:
        unavailable("no Chromium at /usr/bin/chromium (apt-get install chromium) or $AUTOUNET_CHROMIUM")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("AUTOUNET_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {folder}")
    return folder


class Page:
    """A page opened from disk, with its console errors, dialogs and refused requests recorded."""

    def __init__(self, browser, path: Path):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

        def route(r):
            url = r.request.url
            if url.startswith(("file:", "data:")):
                return r.continue_()
            self.requests.append(url)
            return r.abort()

        self.page.route("**/*", route)
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_load_state("load")

    def canvas(self, selector: str = "#view") -> str:
        return self.page.eval_on_selector(selector, "c => c.toDataURL()")

    def column(self, index: int) -> list[str]:
        return self.page.eval_on_selector_all(
            "#case-table tbody tr", f"rows => rows.map(r => r.children[{index}].textContent)"
        )

    def open_first_case(self) -> None:
        self.page.locator("#case-table tbody tr").first.click()
        wait_until(self.page, "document.getElementById('slice-label').textContent.startsWith('slice')")


def test_the_page_works_in_chromium_from_disk(browser, artifacts, tmp_path: Path):
    ws, _ = _trained(tmp_path)
    view = Page(browser, write_html_report(ws))
    page = view.page

    # the table: one row per cross-validation case, worst first, sortable by a column
    assert page.locator("#case-table tbody tr").count() == 4
    means = [float(v) for v in view.column(3)]
    assert means == sorted(means)
    page.locator("#case-table th", has_text="case").first.click()
    assert view.column(1) == sorted(view.column(1))
    page.locator("#case-table th", has_text="case").first.click()
    assert view.column(1) == sorted(view.column(1), reverse=True)
    page.locator("#case-table th", has_text="mean Dice").first.click()
    worst = view.column(1)[0]
    assert float(view.column(3)[0]) == min(means)

    # the worst case opens in the viewer; the slider, the keys and the wheel move the slice
    view.open_first_case()
    assert page.locator("#viewer").is_visible() and page.get_attribute("#viewer", "data-case") == worst
    first = view.canvas()  # the slice with the most foreground
    start = int(page.input_value("#slice"))
    page.keyboard.press("ArrowUp")
    assert page.input_value("#slice") == str(start + 1) and view.canvas() != first
    page.keyboard.press("ArrowDown")
    assert page.input_value("#slice") == str(start) and view.canvas() == first
    page.hover("#view")
    page.mouse.wheel(0, -100)
    wait_until(page, f"document.getElementById('slice').value === '{start - 1}'")
    assert view.canvas() != first
    label = page.text_content("#slice-label")
    page.eval_on_selector("#slice", f"s => {{ s.value = '{start}'; s.dispatchEvent(new Event('input')); }}")
    assert view.canvas() == first and page.text_content("#slice-label") != label

    # the overlays toggle, each on its own, and the error view has its own colours
    shown = view.canvas()
    page.select_option("#pred-mode", "off")
    no_prediction = view.canvas()
    assert no_prediction != shown
    page.select_option("#truth-mode", "off")
    bare = view.canvas()
    assert bare != no_prediction
    page.select_option("#truth-mode", "filled")
    assert view.canvas() != bare
    page.select_option("#truth-mode", "off")
    page.check("#errors")
    assert view.canvas() != bare
    page.uncheck("#errors")
    page.select_option("#axis", "1")
    assert view.canvas() != bare  # another axis, another picture
    page.select_option("#pred-mode", "filled")
    page.select_option("#truth-mode", "outline")

    # the training curves: a legend click hides a fold in every panel
    curves = view.canvas("#curve-panels canvas")
    page.locator("#curve-legend button").nth(1).click()
    assert "off" in page.get_attribute("#curve-legend button >> nth=1", "class")
    assert view.canvas("#curve-panels canvas") != curves

    page.locator("#cases").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "report_html.png"), full_page=True)
    assert (artifacts / "report_html.png").stat().st_size > 10_000
    assert view.errors == [] and view.requests == [] and view.dialogs == []
    page.close()


def test_names_from_the_data_stay_text_in_the_browser(browser, artifacts, tmp_path: Path):
    ws = injected(tmp_path)
    view = Page(browser, write_html_report(ws))
    page = view.page
    view.open_first_case()
    assert INJECT_LABEL in page.text_content("#viewer-legend")
    assert page.locator("img").count() == 0  # the label name made no element
    cases = view.column(1)
    assert "x</script><script>alert(2)</script>" in cases and len(cases) == 4
    page.screenshot(path=str(artifacts / "report_html_injection.png"), full_page=True)
    assert view.errors == [] and view.dialogs == [] and view.requests == []
    page.close()
