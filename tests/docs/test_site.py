"""The documentation site in a real browser: built with `mkdocs build --strict` into a temporary folder, served on
127.0.0.1 by http.server, loaded in Debian's Chromium (/usr/bin/chromium) through Playwright. The navigation, a
Markdown table and the architecture page's mermaid picture render; no page logs an error or asks any host but
127.0.0.1 for anything (mermaid comes from the site itself: docs/hooks.py).

Needs mkdocs and playwright (pyproject's `docs` extra) and /usr/bin/chromium (apt-get install chromium; Playwright's
own browser download is never used). Without one of them the tests skip, saying which, unless
CAITDEPLOY_REQUIRE_BROWSER=1, as the nox `docs` session sets: then they fail. Run there:
`.nox/docs/bin/python -m pytest -p no:cacheprovider --noconftest -o addopts= tests/docs/test_site.py`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Route

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REQUIRE = "CAITDEPLOY_REQUIRE_BROWSER"
HOST = "127.0.0.1"
LOCAL_SCHEMES = ("data", "blob", "about")  # URLs the browser answers itself
TIMEOUT_MS = 30_000
TABLE_PAGES = ("guides/families.md", "benchmarks.md")  # tried first when looking for a page with a table
# Material renders each mermaid picture into a *closed* shadow root; opened here so the test can see the <svg>
OPEN_SHADOW_ROOTS = """
const attach = Element.prototype.attachShadow;
Element.prototype.attachShadow = function (init) { return attach.call(this, { ...init, mode: "open" }); };
"""
MERMAID_DONE = """() => {
  const found = [...document.querySelectorAll(".mermaid")];
  return found.length > 0 && found.every((e) => e.shadowRoot && e.shadowRoot.querySelector("svg"));
}"""


def _require() -> None:
    """Skip (fail under CAITDEPLOY_REQUIRE_BROWSER=1) when mkdocs, playwright or Chromium is missing."""
    missing = [f"{m} is not importable" for m in ("mkdocs", "playwright") if importlib.util.find_spec(m) is None]
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} is missing (apt-get install chromium)")
    if not missing:
        return
    why = "the site's browser test: " + "; ".join(missing)
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{why} ({REQUIRE}=1)", pytrace=False)
    pytest.skip(why)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as `mkdocs build --strict` makes it, with the mkdocs of this interpreter."""
    _require()
    out = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"mkdocs build failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    return out


@pytest.fixture(scope="module")
def base_url(site: Path) -> Iterator[str]:
    """http://127.0.0.1:PORT/ serving `site` from a thread, on a free port."""
    server = ThreadingHTTPServer((HOST, 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, name="site-server", daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(site: Path) -> Iterator[Browser]:
    """Debian's headless Chromium, driven by Playwright (no browser of Playwright's own)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _local(url: str) -> bool:
    """Served by the test's server, or by the browser itself (data:, blob:, about:)."""
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or parts.hostname == HOST


@dataclass
class Visit:
    """One page opened in a fresh browser context, with everything it requested and every error it reported."""

    page: Page
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def foreign(self) -> list[str]:
        """The requests for anything not on 127.0.0.1 (aborted before they left)."""
        return [u for u in self.requests if not _local(u)]

    def assert_clean(self) -> None:
        assert not self.errors, f"{self.page.url}: the page reported errors: {self.errors}"
        assert not self.foreign(), f"{self.page.url}: requests that would leave {HOST}: {self.foreign()}"


@pytest.fixture
def visit(browser: Browser, base_url: str) -> Iterator[Callable[[str], Visit]]:
    """visit("guides/export/"): that page loaded, every request outside 127.0.0.1 recorded and aborted."""
    contexts: list[BrowserContext] = []

    def _visit(path: str) -> Visit:
        context = browser.new_context()
        contexts.append(context)
        context.add_init_script(OPEN_SHADOW_ROOTS)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        v = Visit(page)

        def route(r: Route) -> None:
            if _local(r.request.url):
                r.continue_()
            else:
                r.abort()

        def console(msg: ConsoleMessage) -> None:
            if msg.type == "error":
                v.errors.append(f"console: {msg.text}")

        context.route("**/*", route)
        page.on("request", lambda req: v.requests.append(req.url))
        page.on("console", console)
        page.on("pageerror", lambda exc: v.errors.append(f"pageerror: {exc}"))
        response = page.goto(base_url + path, wait_until="networkidle")
        assert response is not None and response.status == 200, f"{path}: {response and response.status}"
        return v

    yield _visit
    for context in contexts:
        context.close()


def _has_table(markdown: str) -> bool:
    """A Markdown table's delimiter row (| --- | :-: |) outside code fences."""
    fence = None
    for line in markdown.splitlines():
        m = re.match(r"\s*(```|~~~)", line)
        if m:
            fence = None if fence == m.group(1) else fence or m.group(1)
        elif fence is None and re.fullmatch(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*", line):
            return True
    return False


def _table_page(site: Path) -> str:
    """The URL path of a built page whose source has a Markdown table (TABLE_PAGES first)."""
    sources = [DOCS / p for p in TABLE_PAGES] + sorted(DOCS.rglob("*.md"))
    for src in sources:
        rel = src.relative_to(DOCS).with_suffix("").as_posix()
        url = "" if rel == "index" else (rel.removesuffix("/index") if rel.endswith("/index") else rel) + "/"
        if src.is_file() and (site / url / "index.html").is_file() and _has_table(src.read_text(encoding="utf-8")):
            return url
    pytest.fail("no built page of docs/ has a Markdown table", pytrace=False)


def test_home_page_navigation_links_every_guide(visit: Callable[[str], Visit]) -> None:
    v = visit("")
    nav = v.page.locator("nav.md-nav--primary")
    assert nav.count() == 1 and nav.is_visible(), "Material's primary navigation is missing"
    for guide in sorted((DOCS / "guides").glob("*.md")):
        href = f"guides/{guide.stem}/"
        assert nav.locator(f'a[href$="{href}"]').count() >= 1, f"the navigation has no link to {href}"
    v.assert_clean()


def test_guide_page_renders_with_navigation(visit: Callable[[str], Visit]) -> None:
    v = visit("guides/export/")
    assert v.page.locator("article.md-content__inner h1").count() == 1, "guides/export/ has no title"
    active = v.page.locator("nav.md-nav--primary a.md-nav__link--active")
    assert active.count() >= 1, "the navigation does not mark guides/export/ as the current page"
    v.assert_clean()


def test_markdown_table_renders(site: Path, visit: Callable[[str], Visit]) -> None:
    path = _table_page(site)
    v = visit(path)
    table = v.page.locator("article .md-typeset__table table")  # the wrapper is Material's script at work
    assert table.count() >= 1, f"{path}: no rendered <table>"
    assert table.first.locator("th").count() >= 1 and table.first.is_visible(), f"{path}: the table has no header"
    v.assert_clean()


def test_architecture_mermaid_renders_from_the_site(
    visit: Callable[[str], Visit], tmp_path_factory: pytest.TempPathFactory
) -> None:
    from playwright.sync_api import Error as PlaywrightError

    shot = tmp_path_factory.mktemp("screenshots") / "architecture.png"
    v = visit("architecture/")
    try:
        v.page.wait_for_function(MERMAID_DONE, timeout=TIMEOUT_MS)
        svg = v.page.locator("div.mermaid svg").first
        assert svg.locator("g.node").count() >= 2, "the mermaid <svg> has no nodes"
        assert "Syntax error" not in (svg.text_content() or ""), "mermaid drew its syntax-error picture"
        assert any(urlsplit(u).path.endswith("/javascripts/mermaid.min.js") for u in v.requests), (
            f"mermaid was not loaded from the site: {v.requests}"
        )
        v.assert_clean()
        failure = ""
    except (AssertionError, PlaywrightError) as e:
        failure = str(e)
    v.page.screenshot(path=str(shot), full_page=True)
    if failure:
        pytest.fail(f"architecture/: {failure}\nscreenshot: {shot}", pytrace=False)
