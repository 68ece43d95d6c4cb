""".ci/setup: installs on a fresh clone, does no install work on a re-run, reinstalls on change.

The real pip is replaced by a stand-in .venv/bin/python that records pip calls, so the test
is offline and takes well under a second per run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STANDIN = f"""#!/usr/bin/env bash
# Records pip calls; an editable install creates the entry point as pip would.
if [ "$1 $2" = "-m pip" ]; then
  echo "$*" >> "$(dirname "$0")/../pip-calls.log"
  case "$*" in *"-e "*) touch "$(dirname "$0")/weightsmith"; chmod +x "$(dirname "$0")/weightsmith";; esac
  exit 0
fi
exec {sys.executable} "$@"
"""


def clone(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "setup", repo / ".ci" / "setup")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STANDIN)
    python.chmod(0o755)
    return repo


def setup(repo: Path) -> list[str]:
    """Run .ci/setup; returns the pip calls it made."""
    log = repo / ".venv" / "pip-calls.log"
    log.unlink(missing_ok=True)
    subprocess.run(["bash", str(repo / ".ci" / "setup")], check=True, capture_output=True)
    return log.read_text().splitlines() if log.exists() else []


def test_second_run_does_no_install_work_until_pyproject_changes(tmp_path: Path) -> None:
    repo = clone(tmp_path)
    first = setup(repo)
    assert any("--upgrade pip" in c for c in first) and any("-e .[dev]" in c for c in first)
    assert setup(repo) == []  # up to date: no pip at all, not even the upgrade
    with (repo / "pyproject.toml").open("a") as f:
        f.write("\n# a changed dependency list\n")
    assert any("-e .[dev]" in c for c in setup(repo))
    assert setup(repo) == []


def test_a_missing_entry_point_means_reinstall(tmp_path: Path) -> None:
    repo = clone(tmp_path)
    setup(repo)
    (repo / ".venv" / "bin" / "weightsmith").unlink()  # e.g. someone ran pip uninstall
    assert any("-e .[dev]" in c for c in setup(repo))
