"""The notebooks in notebooks/ run top to bottom in a fresh kernel, so they never rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "weightsmith-tests"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernelspec for this interpreter (not whatever "python3" a machine has), small settings."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": KERNEL, "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("WS_NB_HIDDEN", "16")
    monkeypatch.setenv("WS_NB_LAYERS", "3")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' scratch folders land here
    return tmp_path


def run_notebook(name: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    NotebookClient(nb, timeout=120, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[str, list[dict]]:
    text, displays = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                displays.append(out.data)
    return "".join(text), displays


def test_notebooks_are_committed_executed():
    # GitHub shows a notebook's committed outputs, so they are committed: the pictures are
    # visible there. The tests below re-execute every notebook, so the outputs cannot rot.
    pictures = {}
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.get("execution_count") for c in code] == list(range(1, len(code) + 1)), path.name
        outs = [o for c in code for o in c.get("outputs", [])]
        assert not [o for o in outs if o.output_type == "error"], path.name
        pictures[path.name] = sum("image/png" in o.get("data", {}) for o in outs)
    assert pictures == {"paper_operators.ipynb": 2, "quickstart.ipynb": 0, "task_vector_diagnostics.ipynb": 3}


def test_quickstart(kernel_env):
    nb = run_notebook("quickstart.ipynb", kernel_env)
    text, _ = outputs(nb)
    assert "largest difference between the two merges" in text  # the notebook asserts < 1e-5
    assert "matches the formula computed by hand" in text
    assert "task_arithmetic" in text and "model.safetensors.index.json" in text


@pytest.mark.slow  # the diagnostics themselves are unit-tested in test_diagnostics.py
def test_task_vector_diagnostics(kernel_env):
    nb = run_notebook("task_vector_diagnostics.ipynb", kernel_env)
    text, displays = outputs(nb)
    pictures = [d for d in displays if "image/png" in d]
    assert len(pictures) == 3  # norms, cosine heatmap, sign conflicts
    assert "math vs code" in text and "layer 2" in text
    assert not list(kernel_env.glob("weightsmith-diagnostics-*"))  # cleaned up after itself


@pytest.mark.slow  # trains a dozen tiny models: minutes on a loaded 2-core machine
def test_paper_operators(kernel_env, monkeypatch):
    monkeypatch.setenv("WS_NB_HIDDEN", "32")  # 16 is too narrow to learn the tasks in a few steps
    nb = run_notebook("paper_operators.ipynb", kernel_env)
    text, displays = outputs(nb)
    pictures = [d for d in displays if "image/png" in d]
    assert len(pictures) == 2  # accuracy vs lambda, LiNeS vs uniform scaling
    assert "best lambda for the mean of the targets" in text  # the notebook asserts lambda 0 == base
    assert "LiNeS: 3 blocks" in text  # WS_NB_LAYERS
    chose = next(line for line in text.splitlines() if line.startswith("greedy soup chose:"))
    assert "lr0.05" not in chose  # the deliberately too-hot ingredient is rejected
    assert not list(kernel_env.glob("weightsmith-paper-operators-*"))  # cleaned up after itself
