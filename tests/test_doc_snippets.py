"""Every ```python block of README.md and docs/**/*.md runs, as written (issue 15).

Each snippet runs in a fresh interpreter in a temporary copy of what the docs refer to (the
example recipes of merges/, with the example inputs under merges/inputs/). Snippets that read
the example inputs need them built by merges/build_inputs.py (~3.5 min on 2 quiet cores): they
are built once into .cache/tests/, keyed by the builder's source, and those snippets are slow.
A snippet that needs what a test cannot have (the Hub, a testbed build) is marked in the doc,
on the line before the block, with ``<!-- snippet: skip (needs ...) -->``; the reason is
required.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BUILDER = ROOT / "merges" / "build_inputs.py"
# What decides the built inputs' bytes besides the builder: the generated tasks.
BUILDER_SOURCES = [BUILDER, ROOT / "weightsmith" / "testbeds" / "text_tasks.py"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!--\s*snippet:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->")


@dataclass(frozen=True)
class Snippet:
    doc: Path
    line: int
    code: str
    skip: str | None  # the reason given in the doc, or "" when the marker has none

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def needs_inputs(self) -> bool:
        return "inputs/" in self.code or ".yaml" in self.code


def snippets(doc: Path) -> list[Snippet]:
    text = doc.read_text(encoding="utf-8")
    out = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = SKIP.search(before)
        skip = None if marker is None else (marker.group("reason") or "").strip()
        line = text.count("\n", 0, match.start()) + 1
        out.append(Snippet(doc, line, match.group(1), skip))
    return out


ALL = [s for doc in DOCS for s in snippets(doc)]


def _param(snippet: Snippet):  # noqa: ANN202 - a pytest.param
    marks = [pytest.mark.slow] if snippet.needs_inputs and snippet.skip is None else []
    return pytest.param(snippet, id=snippet.id, marks=marks)


def builder_hash() -> str:
    digest = hashlib.sha256()
    for path in BUILDER_SOURCES:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def example_inputs() -> Path:
    """merges/build_inputs.py's output, built once per builder version under .cache/tests."""
    cache = ROOT / ".cache" / "tests" / f"example-inputs-{builder_hash()}"
    done = cache / ".complete"
    if not done.exists():
        building = cache.with_name(cache.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, str(BUILDER), str(building), "--quiet"], check=True, env=env)
        shutil.rmtree(cache, ignore_errors=True)
        building.rename(cache)
        done.write_text(builder_hash() + "\n")
    return cache


def workspace(tmp_path: Path, inputs: Path | None) -> Path:
    """A stand-in for the repository root: merges/ (recipes, input-commands.txt), inputs linked."""
    root = tmp_path / "repo"
    (root / "merges").mkdir(parents=True)
    for path in (ROOT / "merges").iterdir():
        if path.is_file():
            shutil.copy(path, root / "merges" / path.name)
    if inputs is not None:
        (root / "merges" / "inputs").symlink_to(inputs, target_is_directory=True)
    return root


def run_snippet(snippet: Snippet, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", snippet.code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1800)


def test_the_docs_have_snippets_and_readme_runs_its_python_api() -> None:
    # The collector must find the README's Python API block, or the tests below prove nothing.
    readme = [s for s in ALL if s.doc.name == "README.md"]
    assert any("Checkpoint.open" in s.code for s in readme), [s.id for s in ALL]


def test_every_skip_marker_gives_a_reason_and_marks_a_block() -> None:
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for marker in SKIP.finditer(text):
            where = f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, marker.start()) + 1}"
            assert (marker.group("reason") or "").strip(), f"{where}: say why, e.g. (needs the Hub)"
            after = text[marker.end():].lstrip("\n")
            assert after.startswith("```python"), f"{where}: the marker must sit right above a python block"


def test_skip_markers_are_read(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "a\n<!-- snippet: skip (needs the Hub) -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    )
    found = snippets(doc)
    assert [(s.skip, s.code) for s in found] == [("needs the Hub", "x = 1\n"), (None, "y = 2\n")]


@pytest.mark.parametrize("snippet", [_param(s) for s in ALL])
def test_snippet_runs_as_written(snippet: Snippet, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if snippet.skip is not None:
        pytest.skip(f"{snippet.id}: {snippet.skip}")
    inputs = request.getfixturevalue("example_inputs") if snippet.needs_inputs else None
    cwd = workspace(tmp_path, inputs)
    run = run_snippet(snippet, cwd)
    assert run.returncode == 0, f"{snippet.id} failed:\n{snippet.code}\n{run.stdout}\n{run.stderr}"
