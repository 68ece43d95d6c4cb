"""Re-execute notebooks in place, keeping their outputs, as they are committed.

    python notebooks/execute.py [NAME.ipynb ...]      (default: every notebook here)

The committed outputs (and so the pictures GitHub shows) come from this command, run with the
notebooks' default sizes from the repository root; tests/test_notebooks.py re-executes them with
smaller sizes on every test run. Each runs in a fresh kernel of this interpreter, one at a time,
in a scratch folder; cell timing metadata is not recorded, so a re-run changes only outputs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
KERNEL = "weightsmith-execute"


def execute(path: Path, scratch: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    kernelspec = dict(nb.metadata.get("kernelspec", {}))  # keep the generic "python3" spec
    start = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name=KERNEL, record_timing=False,
                   resources={"metadata": {"path": str(scratch)}}).execute()
    nb.metadata["kernelspec"] = kernelspec
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main() -> None:
    names = sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb"))
    with tempfile.TemporaryDirectory(prefix="notebooks-") as tmp:
        spec = Path(tmp) / "jupyter" / "kernels" / KERNEL
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL,
                                                      "language": "python"}))
        os.environ["JUPYTER_PATH"] = str(Path(tmp) / "jupyter")
        os.environ["JUPYTER_RUNTIME_DIR"] = str(Path(tmp) / "runtime")
        for name in names:
            seconds = execute(HERE / name, Path(tmp))
            print(f"{name}: executed in {seconds:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
