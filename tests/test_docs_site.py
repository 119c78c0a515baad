"""The documentation site (``mkdocs.yml``, ``docs/``): ``mkdocs build --strict`` passes, the
generated command-line reference names every command and option of ``build_parser()``, the API
reference is generated from the docstrings, the README stays a short front page, and the built
landing page and a tutorial render in Chromium.

Skipped without MkDocs (``pip install -e ".[docs]"``), except when ``$AUTOUNET_REQUIRE_DOCS`` is
set (CI sets it): then a missing package fails. Screenshots go to ``$AUTOUNET_TEST_ARTIFACTS``."""

from __future__ import annotations

import argparse
import functools
import html
import importlib.util
import os
import re
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from autounet.cli import build_parser
from test_report_browser import artifacts, browser  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = ["first-dataset", "brats", "sparse-labels", "fine-tuning"]
SECTIONS = ["Tutorials", "How-to", "Reference", "Explanation"]


def docs_unavailable(reason: str) -> None:
    """Skip, unless CI asked for the docs ($AUTOUNET_REQUIRE_DOCS): then fail."""
    if os.environ.get("AUTOUNET_REQUIRE_DOCS"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            docs_unavailable(f"{module} is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def text_of(markup: str) -> str:
    """The visible text of an HTML fragment, whitespace joined."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


def squashed(text: str) -> str:
    """Text without whitespace and `code` marks, to compare a help text with a page's text."""
    return re.sub(r"\s+", "", text.replace("`", ""))


def sections_by_id(page: str) -> dict[str, str]:
    """Each ``<h2 id=...>`` of a page with the HTML up to the next ``<h2``."""
    parts = re.split(r'(?=<h2 id=")', page)
    return {re.match(r'<h2 id="([^"]+)"', p).group(1): p for p in parts if p.startswith('<h2 id="')}


def commands() -> dict[str, argparse.ArgumentParser]:
    """The commands ``autounet --help`` lists, found independently of the hook."""
    parser = build_parser()
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.help != argparse.SUPPRESS:
                    found[choice.dest] = action.choices[choice.dest]
    return found


def test_every_command_and_option_is_in_the_generated_cli_reference(site: Path):
    sections = sections_by_id((site / "reference" / "cli" / "index.html").read_text())
    listed = commands()
    assert len(listed) >= 16
    for name, parser in listed.items():
        assert name in sections, f"no section for `autounet {name}` in the CLI reference"
        section = sections[name]
        text = text_of(section)
        assert f"autounet {name}" in text
        if parser.description:
            assert squashed(parser.description) in squashed(text), name
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.help == argparse.SUPPRESS:  # a hidden deprecated spelling stays out
                for option in action.option_strings:
                    assert f"<code>{html.escape(option)}" not in section, f"{name}: hidden {option} is listed"
                continue
            names = action.option_strings or [action.metavar or action.dest]
            for option in names:
                assert f"<code>{html.escape(str(option))}" in section, f"{name}: {option} is missing"
            if action.help and "%" not in action.help:
                assert squashed(action.help) in squashed(text), f"{name}: the help of {names[0]} is missing"
            for choice in action.choices or []:
                assert f"<code>{html.escape(str(choice))}</code>" in section, f"{name}: choice {choice} is missing"
            if isinstance(action.default, (int, float, str)) and not isinstance(action.default, bool):
                if action.nargs != 0 and action.default not in (argparse.SUPPRESS, ""):
                    assert f"<code>{html.escape(str(action.default))}</code>" in section, (name, names[0])


def load_hook():
    spec = importlib.util.spec_from_file_location("cli_reference", REPO / "docs" / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_hook_keeps_what_help_shows_and_leaves_out_what_it_hides():
    """The generator on a parser with an alias, a hidden command and option, a group, choices,
    %(default)s and a nested command: the page shows what ``--help`` shows, and only that."""
    parser = argparse.ArgumentParser(prog="autounet")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("go", aliases=["g"], help="do it", description="Does | it *now*.")
    p.add_argument("path", metavar="PATH", help="where")
    p.add_argument("--mode", choices=["a", "b"], default="a", help="how (default %(default)s)")
    p.add_argument("--old-mode", dest="mode", help=argparse.SUPPRESS)
    group = p.add_argument_group("cluster things")
    group.add_argument("--size", nargs=3, type=int, metavar=("Z", "Y", "X"), help="a 3-D size")
    sub.add_parser("secret", help=argparse.SUPPRESS)
    nested = sub.add_parser("tool", help="tools").add_subparsers(dest="tool")
    nested.add_parser("fix", help="fix a thing").add_argument("--now", action="store_true", help="at once")

    page = load_hook().render(parser)
    headings = [line for line in page.splitlines() if line.startswith("#")]
    assert [h.split("{")[0].strip() for h in headings if h.startswith("## ")] == [
        "## `autounet go`",
        "## `autounet tool`",
    ]
    assert "### `autounet tool fix` {#tool-fix}" in page and "`--now`" in page
    assert "`autounet g`" not in page and "secret" not in page and "--old-mode" not in page
    assert "| `--mode {a,b}` | how (default a). Choices: `a`, `b`. | `a` |" in page
    assert "`--size Z Y X`" in page and "### Cluster things {#go-cluster-things}" in page
    assert "Does | it \\*now\\*." in page  # Markdown marks of help texts are shown, not applied


def test_the_api_reference_is_generated_from_the_docstrings(site: Path):
    import autounet.api as api

    page = (site / "reference" / "api" / "index.html").read_text()
    functions = [n for n in api.__all__ if callable(getattr(api, n)) and getattr(api, n).__module__ == "autounet.api"]
    assert "plan" in functions and "predict" in functions
    for name in functions:
        assert f'id="autounet.api.{name}"' in page, f"autounet.api.{name} is not documented"
    first_line = api.plan.__doc__.strip().splitlines()[0]
    assert text_of(first_line) in text_of(page)
    assert 'id="autounet.inference.predictor.Predictor"' in page
    assert not re.search(r":(class|mod|func|meth):<code>", page), (
        "a Sphinx role is shown raw (docs/hooks/docstring_roles.py)"
    )


def test_the_site_has_the_four_sections_and_the_moved_documents(site: Path):
    landing = text_of((site / "index.html").read_text())
    for section in SECTIONS:
        assert section in landing
    for page in ["formats", "model_json", "architecture"] + [f"tutorials/{t}" for t in TUTORIALS]:
        assert (site / page / "index.html").is_file(), page
    # the moved documents are the files of docs/, unchanged: their tables reach the site
    architecture = text_of((site / "architecture" / "index.html").read_text())
    assert "which package owns what" in architecture and "selection_document" in architecture
    assert (site / "report_html.png").is_file() and (site / "finetune_hippocampus.png").is_file()


def test_the_readme_is_a_short_front_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    # the two set-up commands are those of the site's landing page
    landing = (REPO / "docs" / "index.md").read_text()
    setup = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(setup) == 2 and "autounet demo" in setup[0] and "pytest" in setup[1]
    assert all(line in landing for line in setup)
    # every link into docs/ names a page or picture that is there
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 8
    for link in links:
        assert (REPO / link).is_file(), f"README links to {link}, which does not exist"


@pytest.fixture(scope="module")
def served(site: Path):
    """The built site over HTTP on localhost (its search runs in a web worker, which file:// forbids)."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        pass


def open_page(browser, url: str, base: str):  # noqa: F811 (the fixture)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    outside: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def route(r):
        if r.request.url.startswith((base, "data:", "blob:")):
            return r.continue_()
        outside.append(r.request.url)
        return r.abort()

    page.route("**/*", route)
    response = page.goto(url)
    page.wait_for_load_state("networkidle")
    assert response is not None and response.ok, url
    return page, errors, outside


def heading(page) -> str:
    """The page's first heading without its permalink mark."""
    return page.locator("article h1").first.inner_text().replace("\u00b6", "").strip()


def test_the_landing_page_and_a_tutorial_render_in_chromium(site, served, browser, artifacts):  # noqa: F811
    page, errors, outside = open_page(browser, served + "/", served)
    assert page.title().startswith("autounet")
    assert heading(page) == "autounet"
    tabs = page.locator(".md-tabs__link").all_inner_texts()
    for section in SECTIONS:
        assert any(section in t for t in tabs), (section, tabs)
    assert page.locator(".md-search__input").count() == 1
    page.screenshot(path=str(artifacts / "docs_landing.png"), full_page=True)
    assert errors == [] and outside == [], (errors, outside)

    # one tutorial, reached through the navigation as a reader would
    page.locator(".md-tabs__link", has_text="Tutorials").first.click()
    page.wait_for_load_state("networkidle")
    assert "/tutorials/" in page.url
    page.goto(served + "/tutorials/first-dataset/")
    page.wait_for_load_state("networkidle")
    title = heading(page)
    assert title and page.title().startswith(title)
    nav = page.locator(".md-nav--primary").first.inner_text()
    for tutorial in ("Your first dataset", "BraTS", "Sparse labels", "Fine-tuning"):
        assert tutorial in nav
    page.screenshot(path=str(artifacts / "docs_tutorial.png"), full_page=False)

    # the generated CLI reference, and the search index the site ships
    page.goto(served + "/reference/cli/")
    page.wait_for_load_state("networkidle")
    assert page.locator("article h2#predict").count() == 1
    page.screenshot(path=str(artifacts / "docs_cli_reference.png"), full_page=False)
    page.locator(".md-search__input").click()
    page.wait_for_function(  # the search worker has read the index
        "document.querySelector('.md-search-result__meta').textContent.includes('Type to start')", timeout=30000
    )
    page.keyboard.type("DICOM")
    page.wait_for_selector(".md-search-result__item", timeout=15000)
    assert errors == [] and outside == [], (errors, outside)
    page.close()
