"""The documentation site: formulas tied to the code, pages made from the repository's files,
and the built site checked in a real browser.

- The per-layer formulas on ``docs/theory/kernels.md`` come with ``pycon`` snippets that compute
  each block from the formula and compare it with ``ntk``; they run here, so the page cannot
  drift from the implementation.
- The site is the one ``scripts/test.sh`` built strictly (``PROPULSION_NTK_DOCS_SITE``), or is
  built here (strictly) when that variable is unset.
- The browser test opens the site in headless Chromium (Debian's ``chromium`` and
  ``chromium-driver``) over a loopback HTTP server; it skips with the install line where they
  are absent.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THEORY = ROOT / "docs" / "theory" / "kernels.md"
FIGURES = ROOT / "figures"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_CHROMIUM = "apt-get update && apt-get install -y chromium chromium-driver"
INSTALL_DOCS = "pip install -e '.[docs]' (scripts/setup.sh installs it)"
# Sections of the theory page whose formula must be checked against ntk by a snippet.
CHECKED_SECTIONS = ("Linear (full fine-tuning)", "Propulsion", "Embedding", "LayerNorm", "LoRA", "IA3")
_FENCE = re.compile(r"^```pycon\n(.*?)^```", re.S | re.M)


# -- formulas on the theory page ------------------------------------------------------------


def _sections(text: str) -> dict[str, str]:
    """``### heading`` -> the text up to the next heading of level <= 3."""
    parts = re.split(r"^(#{2,3} .*)$", text, flags=re.M)
    out = {}
    for head, body in zip(parts[1::2], parts[2::2], strict=True):
        if head.startswith("### "):
            out[re.sub(r"\s*\{.*\}\s*$", "", head[4:]).strip()] = body
    return out


def test_theory_page_checks_each_formula_against_ntk() -> None:
    sections = _sections(THEORY.read_text(encoding="utf-8"))
    for name in CHECKED_SECTIONS:
        assert name in sections, f"section '### {name}' missing from {THEORY.name}"
        body = sections[name]
        assert "\\[" in body, f"section {name!r} states no displayed formula"
        snippets = _FENCE.findall(body)
        assert any("ntk.empirical_ntk" in s and "\nTrue\n" in s for s in snippets), (
            f"section {name!r} has no pycon snippet comparing its formula with ntk.empirical_ntk")


SNIPPET_PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md")
                       if _FENCE.search(p.read_text(encoding="utf-8")))


def test_snippet_pages_include_the_theory_pages() -> None:
    assert {THEORY, THEORY.with_name("metrics.md")} <= set(SNIPPET_PAGES)


@pytest.mark.parametrize("page", SNIPPET_PAGES, ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_page_snippets_run(page: Path) -> None:
    """Every ``pycon`` block of a page runs, in order, in one namespace, with the output shown."""
    text = page.read_text(encoding="utf-8")
    if "peft" in text:
        pytest.importorskip("peft")
    source = "\n".join(_FENCE.findall(text))
    test = doctest.DocTestParser().get_doctest(source, {}, page.name, str(page), 0)
    assert test.examples
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    lines: list[str] = []
    result = runner.run(test, out=lines.append)
    assert result.failed == 0, "".join(lines)


# -- the built site ---------------------------------------------------------------------------


@functools.cache
def _built_site() -> Path:
    given = os.environ.get("PROPULSION_NTK_DOCS_SITE")
    if given:
        site = Path(given)
        assert (site / "index.html").is_file(), f"PROPULSION_NTK_DOCS_SITE={given} holds no built site"
        return site
    site = Path(tempfile.mkdtemp(prefix="propulsion-ntk-docs-")) / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"strict docs build failed:\n{proc.stdout}\n{proc.stderr}"
    return site


@pytest.fixture(scope="module")
def site() -> Path:
    pytest.importorskip("mkdocs", reason=f"the docs extra is not installed: {INSTALL_DOCS}")
    pytest.importorskip("mkdocstrings", reason=f"the docs extra is not installed: {INSTALL_DOCS}")
    return _built_site()


def test_results_pages_come_from_figures(site: Path) -> None:
    report = (site / "results" / "claims" / "index.html").read_text(encoding="utf-8")
    # Every verdict row of figures/claims.md's summary table is on the page.
    claims = (FIGURES / "claims.md").read_text(encoding="utf-8")
    keys = re.findall(r"^\| (\w+) \| .* \| \*\*(supported|not supported|inconclusive)\*\* \|", claims, re.M)
    assert keys, "figures/claims.md has no summary rows"
    for claim, _ in keys:
        assert f"<td>{claim}</td>" in report
    gallery = (site / "results" / "gallery" / "index.html").read_text(encoding="utf-8")
    pngs = sorted(FIGURES.glob("*.png"))
    assert pngs
    for png in pngs:
        served = site / "results" / png.name
        assert served.read_bytes() == png.read_bytes(), f"{png.name} differs from figures/"
        assert f'src="../{png.name}"' in gallery, f"{png.name} missing from the gallery"


def test_site_uses_no_network_resources(site: Path) -> None:
    """No page loads a script, style sheet, font or image from another host."""
    remote = re.compile(r"""<(?:script|link|img)\b[^>]*?(?:src|href)=["'](?:https?:)?//""", re.I)
    for page in site.rglob("*.html"):
        hits = remote.findall(page.read_text(encoding="utf-8"))
        # <link rel=canonical> or similar would also match; none is expected with site_url empty.
        assert not hits, f"{page.relative_to(site)} loads remote resources: {hits[:3]}"
    assert (site / "assets" / "mathjax" / "tex-svg-full.js").is_file()


def _public_names(module: str) -> list[str]:
    """``__all__`` of a module of this repository, read without importing it."""
    path = ROOT / module.replace(".", "/")
    source = (path / "__init__.py") if path.is_dir() else path.with_suffix(".py")
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(getattr(t, "id", None) == "__all__" for t in targets) and node.value is not None:
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{module} has no __all__: its public face is undefined")


def test_api_reference_covers_every_public_name(site: Path) -> None:
    """Each module shown in docs/reference/ has every name of its ``__all__`` documented."""
    pages = sorted((ROOT / "docs" / "reference").glob("*.md"))
    modules = [m for page in pages
               for m in re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), re.M)]
    assert {"propulsion", "ntk", "experiments.training.loop", "experiments.suite"} <= set(modules)
    ids: set[str] = set()
    for html in (site / "reference").rglob("*.html"):
        ids |= set(re.findall(r'id="([\w.]+)"', html.read_text(encoding="utf-8")))
    missing = [f"{m}.{name}" for m in modules for name in _public_names(m)
               if f"{m}.{name}" not in ids
               and not any(i.startswith(m + ".") and i.endswith("." + name) for i in ids)]
    assert not missing, f"public names missing from the API reference: {missing}"


# -- headless Chromium ----------------------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serve(folder: Path) -> Iterator[str]:
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    with _serve(site) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"headless Chromium not installed; install it with: {INSTALL_CHROMIUM}")
    webdriver = pytest.importorskip("selenium.webdriver", reason=f"selenium missing: {INSTALL_DOCS}")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="propulsion-ntk-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look anything up
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


_TYPESET = """
const done = arguments[arguments.length - 1];
if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) { done('not loaded'); return; }
MathJax.startup.promise.then(() => done('done'), (e) => done('failed: ' + e));
"""
_STATE = """
const maths = Array.from(document.querySelectorAll('.arithmatex'));
const typeset = maths.filter(e => e.querySelector('mjx-container svg'));
const images = Array.from(document.querySelectorAll('article img'));
return {
  maths: maths.length,
  typeset: typeset.length,
  errors: document.querySelectorAll('mjx-merror, [data-mjx-error]').length,
  images: images.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
};
"""


@pytest.mark.parametrize("page, needs_maths, needs_images", [
    ("", True, True),
    ("theory/kernels/", True, False),
    ("reference/ntk/", False, False),
    ("results/claims/", False, True),
    ("results/gallery/", False, True),
])
def test_page_renders_in_chromium(browser, served: str, page: str, needs_maths: bool,
                                  needs_images: bool) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("browser")  # drop messages of earlier pages
    browser.get(f"{served}/{page}")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
    wait.until(lambda d: d.execute_script(
        "return Array.from(document.querySelectorAll('article img')).every(i => i.complete)"))
    typesetting = browser.execute_async_script(_TYPESET)
    assert typesetting == "done", f"MathJax on /{page}: {typesetting}"
    state = browser.execute_script(_STATE)
    if needs_maths:
        assert state["maths"] > 0 and state["typeset"] == state["maths"], state
    assert state["errors"] == 0, f"MathJax reported {state['errors']} TeX errors on /{page}"
    if needs_images:
        assert state["images"], f"no figures on /{page}"
    broken = [src for src, complete, width in state["images"] if not complete or width == 0]
    assert not broken, f"figures not loaded on /{page}: {broken}"
    problems = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert not problems, f"console messages on /{page}: {problems}"


def test_claims_html_opens_with_every_figure(browser) -> None:
    """figures/claims.html, as committed, opens in Chromium with every figure loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    with _serve(ROOT) as url:
        browser.get_log("browser")
        browser.get(f"{url}/figures/claims.html")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.execute_script(
            "return document.readyState == 'complete' && "
            "Array.from(document.images).every(i => i.complete)"))
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
        problems = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")
                    and "favicon.ico" not in e["message"]]  # the browser's own request, not the page's
    assert images, "figures/claims.html shows no figure"
    broken = [src for src, width in images if width == 0]
    assert not broken, f"figures not loaded in figures/claims.html: {broken}"
    assert not problems, f"console messages on figures/claims.html: {problems}"
