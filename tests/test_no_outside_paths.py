"""Everything a reader is pointed to lies inside the repository.

The developers' working notes live outside the repository; a user who clones or installs the
package cannot follow a citation of them, so no tracked file may name them (the theory is in
``docs/``). Relative links in tracked Markdown files must resolve to a tracked file inside the
repository.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Names of the developers' notes outside the repository, however they are cited.
OUTSIDE = re.compile(r"\.\./shared\b|/work/shared\b|\bshared/[\w.-]+\.md\b"
                     r"|\bscience\.md\b|\boffline-resources\.md\b")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_THIS = Path(__file__).name


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / name for name in out.decode().split("\0") if name]


def _text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def test_no_tracked_file_names_the_developer_notes() -> None:
    hits = []
    for path in _tracked():
        if path.name == _THIS:
            continue
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, ("these lines cite notes outside the repository; link a page of docs/ "
                      "instead or state the fact in place:\n" + "\n".join(hits))


def test_markdown_links_stay_inside_the_repository() -> None:
    tracked = _tracked()
    known = {p.resolve() for p in tracked}
    bad = []
    for path in tracked:
        if path.suffix != ".md":
            continue
        text = _FENCE.sub("", _text(path) or "")
        for target in _LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # a URL, mailto: or an anchor on the same page
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(ROOT):
                bad.append(f"{path.relative_to(ROOT)}: {target} leaves the repository")
            elif resolved not in known and not (resolved.is_dir() and any(
                    k.is_relative_to(resolved) for k in known)):
                # docs/results/* are made at build time from figures/ (docs/hooks.py)
                if not resolved.is_relative_to(ROOT / "docs" / "results"):
                    bad.append(f"{path.relative_to(ROOT)}: {target} is not a tracked file")
    assert not bad, "\n".join(bad)
