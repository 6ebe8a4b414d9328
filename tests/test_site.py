"""The website in a real browser: every page of the built book, opened in headless Chromium.

The site is built once (Jupyter Book 1, warnings as errors, from the committed notebooks) into a
temporary folder, served on 127.0.0.1 by ``http.server`` in a thread, and opened with playwright
driving the system's ``/usr/bin/chromium`` (``make test`` installs it from Debian when it is missing;
playwright never downloads a browser here). On every page :func:`check_page` asserts:

* it renders: HTTP 200, a title, a main article with text, no JavaScript error;
* every image loads (``naturalWidth > 0``) and no resource answers 4xx/5xx;
* math is typeset: no raw ``\\(``, ``\\[``, ``$$`` or TeX command left in the text outside code,
  every ``.math`` element holds MathJax output (``mjx-container``), no MathJax error;
* every internal link resolves: the file exists and its ``#anchor`` is an id in the target page;
* no result hides behind a horizontal scroll bar in a cell's output;
* no request leaves 127.0.0.1 (external requests are recorded, blocked, and fail the test).

On each chapter it also asserts the Colab launch link to that chapter's notebook (built from
``_config.yml``'s ``repository.url``) and a download of the ``.ipynb`` that is the committed notebook.
Screenshots of the intro and every chapter go to ``_build/screenshots/``. The checker is itself
tested on small synthetic pages: a broken image, raw TeX, a dead link, a missing anchor, an external
request and a scrolled output each fail it.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
MATHJAX = ROOT / ".cache" / "mathjax" / "node_modules"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.book


# ------------------------------------------------------------------------------------------------
# serving and building
# ------------------------------------------------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@contextmanager
def serve(folder: Path):
    """Serve ``folder`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def build_site(dest: Path) -> Path:
    """Build the committed book into ``dest`` as ``make html`` does; returns its ``_build/html``."""
    jb = Path(sys.executable).with_name("jupyter-book")
    if not jb.exists():
        pytest.fail("jupyter-book is not installed: run `make install` (the `book` extra)")
    if not (MATHJAX / "mathjax" / "es5" / "tex-chtml.js").exists():
        pytest.fail("MathJax is not installed under .cache/mathjax (the site serves it itself): run `make mathjax`")
    shutil.copytree(ROOT / "book", dest / "book", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, dest / name)
    (dest / ".cache").symlink_to(ROOT / ".cache")
    result = subprocess.run([str(jb), "build", str(dest), "--warningiserror", "--keep-going"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return dest / "_build" / "html"


def config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def colab_link(stem: str) -> str:
    """The Colab URL of chapter ``stem`` from ``_config.yml`` (repository.url, branch, colab_url)."""
    cfg = config()
    repo = cfg["repository"]["url"].rstrip("/").removesuffix(".git")
    org_repo = "/".join(urlsplit(repo).path.strip("/").split("/")[:2])
    branch = cfg["repository"].get("branch", "main")
    prefix = (cfg["repository"].get("path_to_book") or "").strip("/")
    path = f"{prefix}/book/{stem}.ipynb" if prefix else f"book/{stem}.ipynb"
    return f"{cfg['launch_buttons']['colab_url'].rstrip('/')}/github/{org_repo}/blob/{branch}/{path}"


# ------------------------------------------------------------------------------------------------
# the checker
# ------------------------------------------------------------------------------------------------

class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k == "id" or (k == "name" and tag == "a"):
                self.ids.add(v)


@functools.lru_cache(maxsize=None)
def _ids_of(path: Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(path.read_text(errors="replace"))
    return frozenset(parser.ids)


def _local_file(site: Path, url_path: str) -> Path:
    p = site / unquote(url_path).lstrip("/")
    return p / "index.html" if url_path.endswith("/") or p.is_dir() else p


# Text outside code that still looks like TeX: \( \) \[ \] $$, a TeX command, or $...$ inline math.
RAW_TEX = re.compile(r"\\[()\[\]]|\$\$|\\(?:[A-Za-z]{2,}|[,;!])(?![A-Za-z])|(?<![\w$])\$[^\s$][^$\n]{0,200}?\$(?![\w$])")

_PAGE_FACTS = """
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await Promise.race([MathJax.startup.promise, new Promise(r => setTimeout(r, 20000))]);
  }
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const skip = new Set(["SCRIPT", "STYLE", "PRE", "CODE", "TEXTAREA", "NOSCRIPT", "MJX-CONTAINER", "SVG"]);
  const texts = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    let e = n.parentElement, ok = true;
    for (; e; e = e.parentElement) { if (skip.has(e.tagName.toUpperCase())) { ok = false; break; } }
    if (ok && n.nodeValue.trim()) texts.push(n.nodeValue);
  }
  const main = document.querySelector("main article, article[role=main], main, [role=main]");
  const overflow = [];
  for (const e of document.querySelectorAll("div.cell_output, div.cell_output *")) {
    const ox = getComputedStyle(e).overflowX;
    if (["auto", "scroll", "hidden"].includes(ox) && e.scrollWidth > e.clientWidth + 2) {
      overflow.push(`${e.tagName.toLowerCase()}.${e.className}: ${e.scrollWidth}px in ${e.clientWidth}px`);
    }
  }
  return {
    title: document.title,
    mainText: main ? main.innerText.trim().length : 0,
    images: imgs.map(i => ({src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0})),
    text: texts.join("\\n"),
    math: document.querySelectorAll(".math").length,
    mathUntypeset: Array.from(document.querySelectorAll(".math"))
                        .filter(e => !e.querySelector("mjx-container")).map(e => e.textContent.slice(0, 80)),
    mjx: document.querySelectorAll("mjx-container").length,
    mathErrors: Array.from(document.querySelectorAll("mjx-merror")).map(e => e.textContent.slice(0, 80)),
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
    hasMathJax: !!(window.MathJax && MathJax.startup),
    overflow: overflow,
  };
}
"""


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme not in ("http", "https", "ws", "wss") or parts.hostname == "127.0.0.1"


class Browser:
    """One Chromium, one page; every request is recorded and any to a host other than 127.0.0.1
    is blocked and reported by the next :meth:`check`."""

    def __init__(self, playwright):
        self.browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        self.context = self.browser.new_context(viewport={"width": 1280, "height": 900})
        self.requests: list[str] = []
        self.external: list[str] = []
        self.bad_responses: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("request", self._request)
        self.page.on("websocket", lambda ws: self._request_url(ws.url))
        self.page.on("response", lambda r: r.status >= 400 and self.bad_responses.append(f"{r.status} {r.url}"))
        self.page.on("requestfailed", lambda r: is_local(r.url) and self.bad_responses.append(f"failed {r.url}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _route(self, route):
        if is_local(route.request.url):
            route.continue_()
        else:
            route.abort()

    def _request(self, request):
        self._request_url(request.url)

    def _request_url(self, url: str):
        self.requests.append(url)
        if not is_local(url):
            self.external.append(url)

    def close(self):
        self.context.close()
        self.browser.close()

    def check(self, url: str, site: Path, screenshot: Path | None = None) -> tuple[list[str], dict]:
        """Open ``url`` (a page of the site in folder ``site``); returns (problems, facts)."""
        self.requests.clear(), self.external.clear(), self.bad_responses.clear(), self.errors.clear()
        problems: list[str] = []
        response = self.page.goto(url, wait_until="load")
        if response is None or response.status != 200:
            problems.append(f"HTTP status {None if response is None else response.status}")
        try:
            self.page.wait_for_load_state("networkidle", timeout=10_000)
        except Exception:  # a page that keeps polling is still checked
            pass
        facts = self.page.evaluate(_PAGE_FACTS)
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(screenshot), full_page=True)
        if not facts["title"].strip():
            problems.append("page has no title")
        if facts["mainText"] < 20:
            problems.append(f"main article is (nearly) empty: {facts['mainText']} characters")
        problems += [f"JavaScript error: {e}" for e in self.errors]
        problems += [f"image does not load: {i['src']}" for i in facts["images"] if not i["ok"]]
        problems += [f"bad response: {r}" for r in self.bad_responses]
        problems += [f"request leaves 127.0.0.1: {u}" for u in self.external]
        raw = sorted({m.group(0) for m in RAW_TEX.finditer(facts["text"])})
        if raw:
            problems.append(f"raw TeX in the text: {raw[:8]}")
        if facts["math"] and not facts["mjx"]:
            problems.append(f"{facts['math']} math elements but no MathJax output (mjx-container)")
        problems += [f"math not typeset: {t!r}" for t in facts["mathUntypeset"][:5]]
        problems += [f"MathJax error: {t!r}" for t in facts["mathErrors"][:5]]
        problems += [f"output scrolls sideways: {o}" for o in facts["overflow"][:5]]
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
        for href in sorted(set(facts["links"])):
            parts = urlsplit(href)
            if parts.scheme not in ("http", "https") or f"{parts.scheme}://{parts.netloc}" != origin:
                continue
            target = _local_file(site, parts.path)
            if not target.is_file():
                problems.append(f"dead link: {href}")
            elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _ids_of(target):
                problems.append(f"missing anchor: {href}")
        return problems, facts


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run `make install` (the `book` extra)")
    with sync_playwright() as p:
        b = Browser(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    html = build_site(tmp_path_factory.mktemp("site"))
    with serve(html) as base:
        yield html, base


def _pages(html: Path) -> list[str]:
    return sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html")
                  if not p.relative_to(html).parts[0].startswith("_"))


# ------------------------------------------------------------------------------------------------
# the book
# ------------------------------------------------------------------------------------------------

def test_every_page_in_the_browser(site, browser):
    html, base = site
    pages = _pages(html)
    stems = {p.stem for p in CHAPTERS}
    assert {"book/intro.html", *(f"book/{s}.html" for s in stems)} <= set(pages), pages
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    failures, report = {}, []
    t0 = time.perf_counter()
    for rel in pages:
        stem = Path(rel).stem
        shot = SCREENSHOTS / f"{stem}.png" if rel == "book/intro.html" or stem in stems else None
        problems, facts = browser.check(f"{base}/{rel}", html, shot)
        if stem in stems:
            problems += _chapter_problems(stem, facts, html)
        report.append(f"{rel}: {len(facts['images'])} images, {facts['math']} math elements, "
                      f"{facts['mjx']} typeset, {len(set(facts['links']))} links, "
                      f"{len(browser.requests)} requests (all 127.0.0.1)")
        if problems:
            failures[rel] = problems
    print("\n".join(report) + f"\n{len(pages)} pages in {time.perf_counter() - t0:.1f} s")
    assert not failures, json.dumps(failures, indent=1)
    assert sorted(p.name for p in SCREENSHOTS.glob("*.png")) == sorted(["intro.png", *(f"{s}.png" for s in stems)])


def _chapter_problems(stem: str, facts: dict, html: Path) -> list[str]:
    problems = []
    colab = colab_link(stem)
    if colab not in facts["links"]:
        problems.append(f"no Colab launch link {colab}")
    downloads = [h for h in facts["links"] if urlsplit(h).path.endswith(f"/_sources/book/{stem}.ipynb")]
    if not downloads:
        problems.append(f"no download of {stem}.ipynb")
    else:
        served = json.loads(_local_file(html, urlsplit(downloads[0]).path).read_text())
        committed = json.loads((ROOT / "book" / f"{stem}.ipynb").read_text())
        if served["cells"] != committed["cells"]:
            problems.append(f"the downloaded {stem}.ipynb is not the committed notebook")
    return problems


# ------------------------------------------------------------------------------------------------
# the checker itself, on synthetic pages
# ------------------------------------------------------------------------------------------------

def _page(body: str, head: str = "") -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>t</title>{head}</head>"
            f"<body><main><article role='main'><p>Some text that says enough to count as a page.</p>"
            f"{body}</article></main></body></html>")


SYNTHETIC = {
    "good.html": _page(
        "<p>Inline <span class='math notranslate nohighlight'>\\(x^2 + \\tau_t\\)</span>.</p>"
        "<div class='math notranslate nohighlight'>\\[\\sum_{j} A_{tj} = 1\\]</div>"
        "<img src='dot.png' alt='dot'> <a href='other.html#sec'>other</a> <a href='#here'>here</a>"
        "<a href='https://example.org/'>an external link is fine; a request is not</a>"
        "<div class='cell_output'><pre>short line</pre></div><p id='here'>anchor</p>",
        "<script defer src='mathjax/es5/tex-chtml.js'></script>"),
    "other.html": _page("<h2 id='sec'>Section</h2>"),
    "broken_image.html": _page("<img src='missing.png' alt='gone'>"),
    "raw_tex.html": _page("<p>where \\(x^2\\) holds and $$y = 1$$ and $\\tau$ too</p>"),
    "untypeset.html": _page("<span class='math'>\\(x\\)</span>"),
    "dead_link.html": _page("<a href='nowhere.html'>dead</a>"),
    "missing_anchor.html": _page("<a href='other.html#no-such-id'>anchor</a>"),
    "external.html": _page("<img src='http://example.invalid/pixel.png' alt='remote'>"),
    "scrolled.html": _page("<div class='cell_output'><pre style='overflow-x:auto;white-space:pre;width:200px'>"
                           + "0.925 " * 80 + "</pre></div>"),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    for name, text in SYNTHETIC.items():
        (folder / name).write_text(text)
    from PIL import Image

    Image.new("RGB", (4, 4), "black").save(folder / "dot.png")
    if not (MATHJAX / "mathjax").exists():
        pytest.fail("MathJax is not installed under .cache/mathjax: run `make mathjax`")
    (folder / "mathjax").symlink_to(MATHJAX / "mathjax")
    with serve(folder) as base:
        yield folder, base


def test_checker_passes_a_good_page(synthetic, browser):
    folder, base = synthetic
    problems, facts = browser.check(f"{base}/good.html", folder)
    assert problems == []
    assert facts["math"] == 2 and facts["mjx"] == 2 and facts["hasMathJax"]


@pytest.mark.parametrize("name, expected", [
    ("broken_image.html", "image does not load: missing.png"),
    ("raw_tex.html", "raw TeX in the text"),
    ("untypeset.html", "math not typeset"),
    ("dead_link.html", "dead link: "),
    ("missing_anchor.html", "missing anchor: "),
    ("external.html", "request leaves 127.0.0.1: http://example.invalid/pixel.png"),
    ("scrolled.html", "output scrolls sideways"),
])
def test_checker_fails_a_broken_page(synthetic, browser, name, expected):
    folder, base = synthetic
    problems, _ = browser.check(f"{base}/{name}", folder)
    assert any(expected in p for p in problems), problems


def test_raw_tex_pattern():
    for raw in ["\\(x\\)", "\\[", "$$a$$", "\\frac{1}{2}", "$\\tau$", "\\mathbb{E}"]:
        assert RAW_TEX.search(raw), raw
    for fine in ["costs 5 dollars", "a/b", "C:\\ is not here", "late_entry(2) | early_exit(9)", "x $ y"]:
        assert not RAW_TEX.search(fine), fine
