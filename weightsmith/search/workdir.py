"""Checks on a search's --workdir made before any work: it must not be an input, lie inside an
input model folder, or hold an input under a name the search writes.

A merge's OUT is refused even when it merely contains an input, since ``--overwrite`` deletes
OUT (output_checks.check_clear_of_inputs). A search never deletes its workdir; it writes a few
fixed files there (``--overwrite`` removes only the trial log), so a workdir holding the recipe
or the data beside those files is fine, and is a common layout.
"""

from __future__ import annotations

import os
from pathlib import Path

from weightsmith.engine.plan import MergePlan
from weightsmith.errors import OutputError
from weightsmith.output_checks import Protected, protect, protected_inputs
from weightsmith.search.fingerprint import FINGERPRINT_FILE

# What a search writes into its workdir (optimizer: the log; fingerprint.py: the inputs' digests;
# report.write_outputs: the rest).
WRITTEN = ("trials.jsonl", FINGERPRINT_FILE, "best_recipe.yaml", "trials.json", "trials.csv",
           "search.png")


def search_inputs(plan: MergePlan, files: dict[str, str | None],
                  folders: dict[str, str | None]) -> list[Protected]:
    """Every path a search reads: the recipe's inputs (``plan``, planned from headers as a
    merge does), the files and the model folders given on the command line (``label -> path``:
    ``--model-dir``, each ``--head``'s model)."""
    out = protected_inputs(plan)
    out += [protect(label, path, folder=False) for label, path in files.items() if path]
    out += [protect(label, path, folder=True) for label, path in folders.items() if path]
    return out


def check_workdir(workdir: str | os.PathLike[str], inputs: list[Protected]) -> None:
    target = Path(workdir).expanduser().resolve()
    for p in inputs:
        if p.path == target:
            raise OutputError(f"--workdir {target} is the {p.label}; choose a workdir of its own "
                              "(e.g. runs/search1)")
        if p.folder and p.path in target.parents:
            raise OutputError(
                f"--workdir {target} is inside the {p.label} folder {p.path}: the search's files "
                "would change an input (and mix with its files); choose a workdir outside it"
            )
        if p.path.parent == target and p.path.name in WRITTEN:
            raise OutputError(
                f"--workdir {target}: the {p.label} {p.path} would be overwritten by the search's "
                f"{p.path.name}; choose another workdir or move that file"
            )
