"""What a search's scores depend on, kept in its workdir so that ``--resume`` refuses a search
whose inputs changed.

The replayed optimizer already refuses a log written under another seed, space or recipe
(optimizer.replay: the candidates differ). It cannot see a change in what the candidates are
scored on: another eval file, another head's model or data, another metric would give other
scores for the same candidates, and a resumed log would mix two searches. So the first run
writes ``search_inputs.json`` (label -> digest) and a resume compares it before any work,
naming each input that changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from weightsmith.engine.plan import MergePlan
from weightsmith.errors import RecipeError
from weightsmith.io.fingerprints import file_sha256, json_digest, sampled_fingerprint

FINGERPRINT_FILE = "search_inputs.json"


def _digest(value: Any) -> str:
    return json_digest(value, default=str)  # str: the digests search_inputs.json has held


def folder_digest(folder: str | Path) -> str:
    """A model folder's files by name, size and sampled fingerprint (io/fingerprints.py: the
    header and 16 blocks), so a re-saved head or a new config is seen without reading the
    weights in full."""
    root = Path(folder)
    if not root.is_dir():
        return _digest({"missing": str(root)})  # the objective's own check names it
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return _digest([(str(p.relative_to(root)), p.stat().st_size, sampled_fingerprint(p, p.stat().st_size))
                    for p in files])


def file_digest(path: str | Path) -> str:
    """A data file's sha256 (eval data is read in full by the search anyway)."""
    p = Path(path)
    return file_sha256(p) if p.is_file() else _digest({"missing": str(p)})


def search_fingerprint(
    recipe: dict[str, Any],
    plan: MergePlan,
    files: dict[str, str | None],
    folders: dict[str, str | None],
    scoring: dict[str, Any],
) -> dict[str, str]:
    """``label -> digest`` of the recipe (as parsed), its input models (``plan``'s checkpoints'
    provenance: sampled shard fingerprints), each file (``label -> path``, None skipped), each
    model folder, and the settings that change a candidate's score (task, metric, lengths...).
    The seed is left to the optimizer's replay, which names it."""
    out = {"recipe": _digest(recipe),
           "recipe's input models": _digest([c.provenance() for c in plan.checkpoints]),
           "scoring options": _digest(scoring)}
    out.update({label: file_digest(path) for label, path in files.items() if path})
    out.update({label: folder_digest(path) for label, path in folders.items() if path})
    return out


def check_resumable(workdir: str | Path, fingerprint: dict[str, str], resuming: bool) -> None:
    """On a resume over a logged search, refuse inputs other than the logged search's; then
    record ``fingerprint`` for the next resume. A workdir written before fingerprints were
    kept has none to compare: its search resumes (as it did) and gets one."""
    path = Path(workdir) / FINGERPRINT_FILE
    if resuming and path.is_file():
        try:
            logged = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RecipeError(f"{path}: cannot read the logged search's inputs ({e}); pass "
                              "--overwrite to start afresh") from None
        changed = sorted((set(logged) ^ set(fingerprint))  # an input added or left out
                         | {k for k in fingerprint if logged.get(k) != fingerprint[k]})
        if changed:
            raise RecipeError(
                f"{path}: --resume over a search with other inputs ({', '.join(changed)} changed "
                "or added/removed); resume with the logged search's inputs, or pass --overwrite "
                "to start afresh (or use a new --workdir)"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
