"""The claims report: for every claim, what was measured, on what setup, the figure and the verdict.

Built only from a results folder (each experiment's ``verdicts(store, config)``, which derive
verdicts from saved numbers and the thresholds in the config) and written as Markdown and as a
small self-contained HTML page from the same rows. The output is deterministic: the same results
give the same bytes.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

from experiments.records import atomic_path
from experiments.suite.base import MissingResultError, Verdict

__all__ = ["summary_table", "sync_readme",
           "CLAIM_TITLES", "HYPOTHESIS_TITLES", "ExperimentVerdicts", "collect", "render_markdown",
           "render_html", "write_report"]

# Claims in the order the paper makes them; unknown keys follow in alphabetical order.
CLAIM_TITLES: dict[str, str] = {
    "ntk_approximation": "Propulsion approximates the NTK of full fine-tuning (Theorem 1)",
    "theorem_premise": "The premise of Theorem 1 (JL: W^T W close to a scaled identity)",
    "kernel_regime": "Training stays in the kernel regime",
    "accuracy": "Accuracy comparable to full fine-tuning",
    "higher_degree_helps": "A higher degree k gives higher accuracy (best SST-2 at k = 25)",
    "convergence": "Fast convergence",
    "memory": "Lower memory than other PEFT methods",
    "parameter_count": "About 0.1% of the parameters are trained",
}
# The toolkit's own hypotheses: tested and reported in their own section, never as the paper's claims.
HYPOTHESIS_TITLES: dict[str, str] = {
    "degree_is_lr": "The degree k acts as a learning-rate factor (the toolkit's hypothesis, not the "
                    "paper's claim)",
}


@dataclass(frozen=True)
class ExperimentVerdicts:
    """One experiment's verdicts with the setup and provenance they came from (or why none)."""

    name: str
    title: str
    preset: str | None
    config: dict
    provenance: dict
    verdicts: tuple[Verdict, ...]
    missing: str | None  # why the results are missing or partial, else None
    command: str | None = None  # the `propulsion-ntk run` line that fills them, when missing


def collect(results_dir: str | Path) -> list[ExperimentVerdicts]:
    """Verdicts of every experiment of the suite, in registry order, from ``results_dir``.

    An experiment that never ran, or whose results lack units or never finished (no
    ``provenance.json``), is listed with the reason and the command that fills it.

    Raises:
        MissingResultError: ``results_dir`` holds no experiment results at all.
        DamagedFileError: a stored file does not match its checksum (named in the message).
    """
    from experiments.suite import EXPERIMENTS, fill_command, open_results, present_experiments, preset_of

    present = {m.NAME for m in present_experiments(results_dir)}
    out, presets = [], []
    for name, module in EXPERIMENTS.items():
        if name not in present:
            continue
        store = open_results(results_dir, name)
        prov = store.read_provenance()
        try:
            verdicts, missing = tuple(module.verdicts(store, store.config)), None
        except MissingResultError as exc:
            verdicts, missing = (), f"partial: {exc}"
        if missing is None and not prov:
            missing = ("partial: the run did not finish (no provenance.json); its verdicts may rest on "
                       "part of its units")
        preset = prov.get("preset") or preset_of(name, store.config)  # a run still going has no provenance
        presets.append(preset)
        command = fill_command(name, results_dir, store.config) if missing else None
        out.append(ExperimentVerdicts(name, module.TITLE, preset, store.config.to_dict(),
                                      prov, verdicts, missing, command))
    preset = next((p for p in presets if p), "quick")
    for name, module in EXPERIMENTS.items():
        if name not in present:
            out.append(ExperimentVerdicts(name, module.TITLE, None, {}, {}, (), "never ran: no results in "
                                          f"{Path(results_dir) / name}",
                                          fill_command(name, results_dir, preset=preset)))
    order = list(EXPERIMENTS)
    return sorted(out, key=lambda e: order.index(e.name))


Row = tuple[ExperimentVerdicts, Verdict]


def _claims(experiments: list[ExperimentVerdicts], *,
            hypotheses: bool = False) -> list[tuple[str, list[Row]]]:
    """The paper's claims (default) or the toolkit's hypotheses, each with its verdict rows."""
    by_claim: dict[str, list[Row]] = {}
    for exp in experiments:
        for v in exp.verdicts:
            if (v.claim in HYPOTHESIS_TITLES) == hypotheses:
                by_claim.setdefault(v.claim, []).append((exp, v))
    titles = HYPOTHESIS_TITLES if hypotheses else CLAIM_TITLES
    order = [c for c in titles if c in by_claim] + sorted(set(by_claim) - set(titles))
    return [(c, by_claim[c]) for c in order]


def _title(claim: str) -> str:
    return HYPOTHESIS_TITLES.get(claim, CLAIM_TITLES.get(claim, claim))


_HYPOTHESES_NOTE = ("What the toolkit itself predicts about how Propulsion works; tested like the claims, "
                    "but not a claim of the paper.")


def _setup(exp: ExperimentVerdicts) -> str:
    items = ", ".join(f"{k}={v}" for k, v in exp.config.items())
    return f"{exp.name} (preset {exp.preset or 'unknown'}): {items}"


def _figure_link(stem: str | None, fig_dir: Path, out_dir: Path) -> tuple[str | None, bool]:
    if stem is None:
        return None, False
    png = fig_dir / f"{stem}.png"
    return Path(os.path.relpath(png.resolve(), out_dir.resolve())).as_posix(), png.is_file()


def _origin(exp: ExperimentVerdicts) -> str:
    p = exp.provenance
    if not p:
        return "no provenance.json"
    dirty = " (uncommitted changes)" if p.get("git_dirty") else ""
    text = (f"commit {str(p.get('git_commit', 'unknown'))[:12]}{dirty}, {p.get('device', '?')} "
            f"({p.get('device_name', '?')}), {p.get('date', '?')}, {p.get('wall_time_s', '?')} s")
    commits = p.get("unit_commits") or {}
    if set(commits) - {p.get("git_commit")}:  # units computed elsewhere than by this run's code
        text += "; units computed at " + ", ".join(
            f"{c[:12]}{' (uncommitted changes)' if c.endswith('+dirty') else ''} ({n})"
            for c, n in sorted(commits.items()))
    return text


def render_markdown(experiments: list[ExperimentVerdicts], fig_dir: Path, out_dir: Path) -> str:
    """The report as Markdown (summary table, then one section per claim)."""
    lines = ["# Claims report", "",
             "Generated by `propulsion-ntk report` from saved results; never edited by hand. Each verdict "
             "follows from the measured value and the rule stated beside it (thresholds live in the "
             "experiment's config).", "", "## Summary", "",
             "| claim | statement | value | verdict | experiment |", "|---|---|---|---|---|"]
    claims, hypotheses = _claims(experiments), _claims(experiments, hypotheses=True)
    hypothesis_table = ["", "## Summary: the toolkit's hypotheses", "", _HYPOTHESES_NOTE, "",
                        "| hypothesis | statement | value | verdict | experiment |", "|---|---|---|---|---|"]
    for group, intro in ((claims, []), (hypotheses, hypothesis_table)):
        if group:
            lines += intro
        for claim, rows in group:
            for exp, v in rows:
                statement = v.statement.replace("|", "\\|")
                lines.append(f"| {claim} | {statement} | {v.value_text} | **{v.verdict}** | {exp.name} |")
    if hypotheses:
        claims = [*claims, ("", []), *hypotheses]
    for claim, rows in claims:
        if not claim:
            lines += ["", "# Hypotheses of this toolkit (not claims of the paper)", "", _HYPOTHESES_NOTE]
            continue
        lines += ["", f"## {_title(claim)} (`{claim}`)"]
        for exp, v in rows:
            link, exists = _figure_link(v.figure, fig_dir, out_dir)
            lines += ["", f"**{v.statement}** Verdict: **{v.verdict}**", "",
                      f"- Measurement: {v.measurement}", f"- Value: {v.value_text}",
                      f"- Rule: {v.threshold}", *([f"- Decided by: {v.decided_by}"] if v.decided_by else []),
                      f"- Setup: {_setup(exp)}", f"- Run: {_origin(exp)}"]
            if link:
                lines += ["", f"![{v.figure}]({link})" if exists else
                          f"- Figure `{v.figure}` not drawn yet (run `propulsion-ntk figures`)"]
    missing = [e for e in experiments if e.missing]
    if missing:
        lines += ["", "## Missing or partial experiments", "",
                  _MISSING_NOTE, ""]
        lines += [f"- {e.name} ({e.title}): {e.missing}\n  `{e.command}`" for e in missing]
    return "\n".join(lines) + "\n"


_MISSING_NOTE = "Their claims are not (or not fully) judged above; each command computes what is missing."

_CSS = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;vertical-align:top}"
        ".supported{color:#1a7f37}.not-supported{color:#cf222e}.inconclusive{color:#9a6700}"
        "img{max-width:100%}")


def render_html(experiments: list[ExperimentVerdicts], fig_dir: Path, out_dir: Path) -> str:
    """The same content as :func:`render_markdown`, as one HTML page."""
    e = html.escape

    def badge(v: Verdict) -> str:
        return f'<b class="{v.verdict.replace(" ", "-")}">{e(v.verdict)}</b>'

    parts = ['<!DOCTYPE html>', '<html><head><meta charset="utf-8"><title>Claims report</title>',
             '<link rel="icon" href="data:,">',
             f"<style>{_CSS}</style></head><body>", "<h1>Claims report</h1>",
             "<p>Generated by <code>propulsion-ntk report</code> from saved results; never edited by hand. "
             "Each verdict follows from the measured value and the rule stated beside it.</p>",
             "<h2>Summary</h2>", "<table><tr><th>claim</th><th>statement</th><th>value</th><th>verdict</th>"
             "<th>experiment</th></tr>"]
    claims, hypotheses = _claims(experiments), _claims(experiments, hypotheses=True)
    for i, group in enumerate((claims, hypotheses)):
        if i and group:
            parts += ["</table>", "<h2>Summary: the toolkit's hypotheses</h2>",
                      f"<p>{e(_HYPOTHESES_NOTE)}</p>",
                      "<table><tr><th>hypothesis</th><th>statement</th><th>value</th><th>verdict</th>"
                      "<th>experiment</th></tr>"]
        for claim, rows in group:
            for exp, v in rows:
                parts.append(f"<tr><td>{e(claim)}</td><td>{e(v.statement)}</td><td>{e(v.value_text)}</td>"
                             f"<td>{badge(v)}</td><td>{e(exp.name)}</td></tr>")
    parts.append("</table>")
    if hypotheses:
        claims = [*claims, ("", []), *hypotheses]
    for claim, rows in claims:
        if not claim:
            parts += ["<h1>Hypotheses of this toolkit (not claims of the paper)</h1>",
                      f"<p>{e(_HYPOTHESES_NOTE)}</p>"]
            continue
        parts.append(f"<h2>{e(_title(claim))} (<code>{e(claim)}</code>)</h2>")
        for exp, v in rows:
            link, exists = _figure_link(v.figure, fig_dir, out_dir)
            parts += [f"<p><b>{e(v.statement)}</b> Verdict: {badge(v)}</p><ul>",
                      f"<li>Measurement: {e(v.measurement)}</li><li>Value: {e(v.value_text)}</li>",
                      f"<li>Rule: {e(v.threshold)}</li>"
                      + (f"<li>Decided by: {e(v.decided_by)}</li>" if v.decided_by else "")
                      + f"<li>Setup: {e(_setup(exp))}</li>",
                      f"<li>Run: {e(_origin(exp))}</li></ul>"]
            if link:
                parts.append(f'<p><img src="{e(link)}" alt="{e(str(v.figure))}"></p>' if exists else
                             f"<p>Figure <code>{e(str(v.figure))}</code> not drawn yet.</p>")
    missing = [x for x in experiments if x.missing]
    if missing:
        parts += ["<h2>Missing or partial experiments</h2>",
                  f"<p>{_MISSING_NOTE}</p><ul>"]
        parts += [f"<li>{e(x.name)} ({e(x.title)}): {e(str(x.missing))}<br>"
                  f"<code>{e(str(x.command))}</code></li>" for x in missing]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(results_dir: str | Path, out_path: str | Path, *, fig_dir: str | Path = "figures") -> Path:
    """Write ``out_path`` (Markdown, ``.md`` added if missing) and the HTML beside it, atomically.

    Figures are linked relative to the report, from ``fig_dir``; returns the Markdown path.

    Raises:
        MissingResultError: ``results_dir`` holds no experiment results.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".md":
        out_path = out_path.with_name(out_path.name + ".md")
    experiments = collect(results_dir)
    fig_dir = Path(fig_dir)
    for path, text in ((out_path, render_markdown(experiments, fig_dir, out_path.parent)),
                       (out_path.with_suffix(".html"), render_html(experiments, fig_dir, out_path.parent))):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return out_path


README_START, README_END = "<!-- claims-summary:start -->", "<!-- claims-summary:end -->"


def summary_table(claims_markdown: str) -> str:
    """The summary table of a claims report (the Markdown table under ``## Summary``)."""
    lines = claims_markdown.splitlines()
    try:
        start = lines.index("## Summary")
    except ValueError:
        raise ValueError("this claims report has no '## Summary' section; regenerate it with "
                         "`propulsion-ntk report`") from None
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    if not table:
        raise ValueError("the '## Summary' section of this claims report holds no table")
    return "\n".join(table)


def sync_readme(readme: str | Path, claims_md: str | Path) -> bool:
    """Replace the README's block between ``<!-- claims-summary:start -->`` and ``:end -->`` by the
    summary table of ``claims_md``, so the README never states other numbers than the report.

    Returns whether the README changed. Raises ValueError when the markers are missing.
    """
    readme, text = Path(readme), Path(readme).read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} block to fill")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    table = summary_table(Path(claims_md).read_text(encoding="utf-8"))
    new = f"{head}{README_START}\n{table}\n{README_END}{tail}"
    if new == text:
        return False
    with atomic_path(readme) as tmp:
        tmp.write_text(new, encoding="utf-8")
    return True
