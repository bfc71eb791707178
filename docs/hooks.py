"""MkDocs hooks: pages and assets made at build time from files already in the repository.

- ``results/claims.md`` is ``figures/claims.md`` (the claims report written by
  ``propulsion-ntk report``), and every ``figures/*.png`` is served beside it, so the report's
  image links resolve unchanged;
- ``results/gallery.md`` shows every committed ``figures/*.png``, captioned from the table of
  ``figures/README.md`` (file stem, experiment, what it shows);
- MathJax (``tex-svg-full.js``, one self-contained file, SVG output, no web fonts) is served
  from the ``django-static-mathjax`` package installed by the ``docs`` extra, so equations
  render without any network;
- Sphinx roles left in docstrings (``:func:`x```) lose the role prefix on API pages.

Nothing here is copied into ``docs/`` by hand: a new figure or a new report appears on the next
build.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "figures"
MATHJAX_FILE = "tex-svg-full.js"
MATHJAX_URI = f"assets/mathjax/{MATHJAX_FILE}"
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):(?=<code>|<a )")


def mathjax_path() -> Path:
    """The MathJax component shipped by ``django-static-mathjax`` (Apache-2.0)."""
    spec = importlib.util.find_spec("mathjax")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "static" / "mathjax" / "es5" / MATHJAX_FILE
        if path.is_file():
            return path
    raise PluginError(
        f"MathJax ({MATHJAX_FILE}) not found: the docs need the package django-static-mathjax; "
        "install the docs extra: pip install -e '.[docs]' (scripts/setup.sh does)"
    )


def figure_captions(readme: Path) -> list[tuple[str, str, str]]:
    """``(stem pattern, experiment, what it shows)`` rows of the table in ``figures/README.md``."""
    rows = []
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        for stem in re.findall(r"`([^`]+)`", cells[0]):
            rows.append((stem, cells[1], cells[2]))
    return rows


def caption(stem: str, rows: list[tuple[str, str, str]]) -> tuple[str, str]:
    for pattern, experiment, what in rows:
        if fnmatch.fnmatchcase(stem, pattern):
            return experiment, what
    return "", ""


def gallery_page(pngs: list[Path], rows: list[tuple[str, str, str]]) -> str:
    lines = [
        "# Figure gallery",
        "",
        "Every figure committed in `figures/` (drawn from saved results by `propulsion-ntk "
        "figures`), collected at build time; captions come from the table in "
        "`figures/README.md`. Each figure also exists as a PDF beside its PNG.",
        "",
    ]
    for png in pngs:
        experiment, what = caption(png.stem, rows)
        lines += [f"## `{png.stem}`", ""]
        if experiment:
            lines += [f"*{experiment}*: {what}", ""]
        lines += [f"![{png.stem}]({png.name})", ""]
    return "\n".join(lines)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    report = FIGURES / "claims.md"
    if not report.is_file():
        raise PluginError(f"{report} is missing: run `propulsion-ntk report --out figures` first")
    pngs = sorted(FIGURES.glob("*.png"))
    if not pngs:
        raise PluginError(f"no figures in {FIGURES}: run `propulsion-ntk figures` first")
    files.append(File.generated(config, "results/claims.md", abs_src_path=str(report)))
    rows = figure_captions(FIGURES / "README.md")
    files.append(File.generated(config, "results/gallery.md", content=gallery_page(pngs, rows)))
    for png in pngs:
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    files.append(File.generated(config, MATHJAX_URI, abs_src_path=str(mathjax_path())))
    return files


def on_page_content(html: str, page, config: MkDocsConfig, files: Files) -> str:
    if page.file.src_uri.startswith("reference/"):
        return _ROLE.sub("", html)
    return html
