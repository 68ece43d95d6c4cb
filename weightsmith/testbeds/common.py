"""Shared machinery for testbed builds: recipe hashing, caching, provenance, data files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from weightsmith.finetune.trainlog import package_versions

INFO_NAME = "testbed.json"


def recipe_hash(recipe: dict[str, object]) -> str:
    """Stable hash of everything that determines the build's bytes."""
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_info(out_dir: Path, digest: str) -> dict[str, object] | None:
    """The recorded info when ``out_dir`` already holds a complete build of this recipe.

    testbed.json is written last, so its presence with a matching hash means every model
    and data file of that recipe was produced.
    """
    path = out_dir / INFO_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if info.get("recipe_hash") == digest else None


def start_build(out_dir: Path) -> None:
    """Make ``out_dir`` and drop its testbed.json: a (forced) rebuild stopped halfway must not
    leave the old file claiming the folder is a finished build."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INFO_NAME).unlink(missing_ok=True)


def write_info(out_dir: Path, info: dict[str, object]) -> Path:
    path = out_dir / INFO_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)  # atomic: a half-written file must never look like a finished build
    return path


def write_jsonl(path: Path, rows: Sequence[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def versions() -> dict[str, str]:
    return package_versions()


class Stages:
    """Wall-clock time of each build stage, recorded in testbed.json."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        if not self.quiet:
            print(f"[testbed] {name} ...", file=sys.stderr, flush=True)
        yield
        self.times[name] = round(time.perf_counter() - t, 2)
        if not self.quiet:
            print(f"[testbed] {name} done in {self.times[name]:.1f} s", file=sys.stderr, flush=True)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)
