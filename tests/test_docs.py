"""The README and the docs site: the site builds with warnings as errors (a broken link, a
missing page or anchor fails), the guard itself catches what it should, and the README stays a
first screen (at most 250 lines, its links naming files that exist)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250
_LINK = re.compile(r"(?<!!)\[[^\]\n]+\]\(([^)\s]+)\)")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent, env=env, capture_output=True, text=True, timeout=300,
    )


def test_the_docs_site_builds_with_warnings_as_errors(tmp_path):
    done = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "method/index.html", "data/index.html", "cluster/index.html",
                 "serving/index.html", "benchmarks/index.html", "architecture/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


def test_the_strict_build_fails_on_a_broken_link_a_missing_anchor_or_a_missing_repository_file(tmp_path):
    """A copy of the repository (its docs copied, the rest linked) with three broken links."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for entry in ROOT.iterdir():
        if entry.name in {"docs", ".git", ".venv"}:
            continue
        (copy / entry.name).symlink_to(entry)
    shutil.copytree(ROOT / "docs", copy / "docs")
    page = copy / "docs" / "serving.md"
    page.write_text(page.read_text() + "\n[a](no-such-page.md) [b](method.md#no-such-anchor) [c](../deploy/NO-SUCH.md)\n")
    done = build(copy / "mkdocs.yml", tmp_path / "site")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "no-such-page.md" in output and "#no-such-anchor" in output and "../deploy/NO-SUCH.md" in output, output


def test_the_readme_is_a_first_screen_and_its_links_name_files_that_exist():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"
    assert lines[2] == "```bash" and lines[3].startswith("make demo") and lines[4].startswith("make test") and lines[5] == "```"
    missing = []
    for target in _LINK.findall("\n".join(lines)):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue
        if not (ROOT / target.split("#", 1)[0]).exists():
            missing.append(target)
    assert not missing, f"README.md links to files that do not exist: {missing}"
