"""Shard index files (``*.index.json``): which shard holds each tensor, checked before use.

An index is input like any other (a Hub repo's index is written by whoever owns the repo), so
its ``weight_map`` must be an object of tensor names to shard file names, and every name must
stay inside the model folder: no absolute paths, no ``..``, no symlink that resolves outside.
The one exception is the Hub cache's own layout, where ``snapshots/<commit>/<file>`` is a
symlink to ``../../blobs/<sha256>`` of the same repo.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from weightsmith.errors import CheckpointError
from weightsmith.io.regular_file import read_regular_bytes


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file, each value a plain relative file name."""
    bad = f"{path}: not a valid shard index"
    try:
        index = json.loads(read_regular_bytes(path).decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{bad} (its JSON is nested too deeply)") from None
    except (UnicodeError, ValueError) as e:
        raise CheckpointError(f"{bad} ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{bad}: it needs a 'weight_map' object of tensor name -> shard file")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not _plain_name(shard):
            raise CheckpointError(
                f"{bad}: weight_map[{key!r}] is {shard!r:.200}, not a shard file name; fix the index"
            )
        if PurePosixPath(shard).is_absolute() or ".." in PurePosixPath(shard).parts:
            raise CheckpointError(_outside(path, key, shard, path.parent))
    return weight_map


def check_shards_inside(index: Path, weight_map: dict[str, str]) -> None:
    """Refuse a shard whose path (symlinks resolved) leaves the index's folder."""
    root = index.parent
    allowed = [root.resolve()]
    repo = root.parent.parent
    if root.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
        allowed.append((repo / "blobs").resolve())  # the Hub cache: files link to the repo's blobs
    first_key: dict[str, str] = {}
    for key, shard in weight_map.items():
        first_key.setdefault(shard, key)
    for shard, key in first_key.items():
        try:
            real = (root / shard).resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise CheckpointError(f"{index}: shard {shard!r} cannot be resolved ({e})") from e
        if not any(real == a or real.is_relative_to(a) for a in allowed):
            raise CheckpointError(_outside(index, key, shard, root, real))


def _plain_name(name: str) -> bool:
    return bool(name) and "\x00" not in name and not name.endswith("/")


def _outside(index: Path, key: str, shard: str, root: Path, real: Path | None = None) -> str:
    resolved = f" (it resolves to {real})" if real is not None else ""
    return (
        f"{index}: weight_map[{key!r}] names {shard!r}, which is outside the model folder {root}"
        f"{resolved}; an index may only name shards inside its own folder — fix the index or copy "
        "the shard into the folder"
    )
