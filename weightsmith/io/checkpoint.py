"""Lazy checkpoints: keys, shapes and dtypes from headers; tensor bytes read on demand.

A ``Checkpoint`` never holds tensor data. ``read`` copies one tensor (or a block of its rows)
from disk into a fresh buffer with ``pread``, so memory is bounded by what the caller keeps.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import CheckpointError
from weightsmith.io.fingerprints import file_sha256, sampled_fingerprint
from weightsmith.io.pickle_checkpoint import _load_pickle
from weightsmith.io.regular_file import open_regular, read_regular_bytes, require_regular_file
from weightsmith.io.safetensors_format import TensorEntry, read_header
from weightsmith.io.shard_index import check_shards_inside, read_index
from weightsmith.model_ref import looks_like_hub_id

# Openers of composite references such as ``BASE+ADAPTER``: each returns a checkpoint, or None
# when the reference is not its kind. Registered by the modules that implement them (imported
# by weightsmith/io/__init__.py), so this reader does not import them back.
ReferenceOpener = Callable[[str, bool, "tuple[Path, ...]"], "Checkpoint | None"]
REFERENCE_OPENERS: list[ReferenceOpener] = []

def pread_into(fd: int, buf: memoryview, offset: int, path: str, name: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; a short read means the file shrank under us."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(
                f"{path}: file ended while reading tensor {name!r} (needed {len(view)} bytes at "
                f"offset {offset}); the shard is truncated — re-download or re-save it"
            )
        done += n


@dataclass
class Checkpoint:
    """A model's tensors, read lazily from safetensors shards (or, opted in, torch pickles)."""

    ref: str
    root: Path
    entries: dict[str, TensorEntry]
    config: dict[str, Any] | None = None
    revision: str | None = None
    shard_files: list[str] = field(default_factory=list)
    _pickled: dict[str, torch.Tensor] | None = None
    _fds: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        ref: str | os.PathLike[str],
        *,
        allow_pickle: bool = False,
        search_dirs: tuple[Path, ...] = (),
    ) -> Checkpoint:
        """Open a folder, a single ``.safetensors`` file, a Hub repo id (``org/name@rev``), or
        ``BASE+ADAPTER`` (a PEFT LoRA adapter applied to BASE as tensors are read).

        Relative paths are tried against the working directory first, then ``search_dirs``
        (the recipe's folder), so recipes run from anywhere.
        """
        text = str(ref)
        candidates = [Path(text).expanduser()]
        candidates += [d / text for d in search_dirs if not Path(text).is_absolute()]
        for path in candidates:
            if path.exists():
                return cls._open_local(text, path, allow_pickle)
        for opener in REFERENCE_OPENERS:  # BASE+ADAPTER (weightsmith/io/lora.py), ...
            opened = opener(text, allow_pickle, search_dirs)
            if opened is not None:
                return opened
        from weightsmith.io.input_hints import build_hint, local_look_alikes, looks_local

        # An example input not built yet (listed in an input-commands.txt): a local path that
        # may look like a Hub id ("inputs/minilm-base"); say how to build it.
        command = build_hint(candidates)
        looked = f"looked in {', '.join(str(p.absolute()) for p in candidates)}"
        relative = not Path(text).is_absolute()
        folders = [Path.cwd(), *search_dirs] if relative else []
        alikes = local_look_alikes(text, folders) if looks_like_hub_id(text) and command is None else []
        if looks_like_hub_id(text) and command is None and not alikes and not looks_local(text, folders):
            from weightsmith.io.hub import resolve_hub_model

            try:
                path, revision = resolve_hub_model(text)
            except CheckpointError as e:
                raise CheckpointError(
                    f"{e} (Read as a Hub id: no local folder {text!r} exists either; {looked}.)"
                ) from e
            ckpt = cls._open_local(text, path, allow_pickle)
            ckpt.revision = revision
            return ckpt
        if command:
            fix = f"build it with: {command}"
        elif alikes:
            fix = (
                f"did you mean {' or '.join(repr(os.path.relpath(p)) for p in alikes)}? "
                "Relative paths are read from the working directory (and a recipe's folder)"
            )
        elif looks_like_hub_id(text):  # and its first folder exists here: a local path
            fix = (
                f"read as a local path, not a Hub id, since {Path(text).parts[0]}/ is a folder here; "
                "check the path"
            )
        else:
            fix = "give a local path, a .safetensors file, or a Hub id like org/name"
        raise CheckpointError(f"model {text!r}: no such file or folder ({looked}); {fix}")

    @classmethod
    def _open_local(cls, ref: str, path: Path, allow_pickle: bool) -> Checkpoint:
        if not path.is_dir():
            require_regular_file(path)  # a FIFO or device named as the model: refuse, never open
            root = path.parent
            if path.name.endswith(".index.json"):
                shards, weight_map = _read_index(path)
                return cls._from_shards(ref, root, shards, weight_map, allow_pickle)
            return cls._from_shards(ref, root, [path.name], None, allow_pickle)
        root = path
        indexes = sorted(root.glob("*.safetensors.index.json"))
        singles = sorted(root.glob("*.safetensors"))
        if indexes:
            shards, weight_map = _read_index(indexes[0])
            return cls._from_shards(ref, root, shards, weight_map, allow_pickle)
        if (root / "model.safetensors").exists():
            return cls._from_shards(ref, root, ["model.safetensors"], None, allow_pickle)
        if len(singles) == 1:
            return cls._from_shards(ref, root, [singles[0].name], None, allow_pickle)
        if len(singles) > 1:
            raise CheckpointError(
                f"{root}: several .safetensors files but no *.safetensors.index.json; add the "
                "index or point the recipe at one file"
            )
        bin_index = root / "pytorch_model.bin.index.json"
        if bin_index.exists():
            shards, weight_map = _read_index(bin_index)
            return cls._from_shards(ref, root, shards, weight_map, allow_pickle)
        if (root / "pytorch_model.bin").exists():
            return cls._from_shards(ref, root, ["pytorch_model.bin"], None, allow_pickle)
        raise CheckpointError(
            f"{root}: no model.safetensors, *.safetensors.index.json or pytorch_model.bin here"
        )

    @classmethod
    def _from_shards(
        cls,
        ref: str,
        root: Path,
        shards: list[str],
        weight_map: dict[str, str] | None,
        allow_pickle: bool,
    ) -> Checkpoint:
        entries: dict[str, TensorEntry] = {}
        pickled: dict[str, torch.Tensor] | None = None
        for shard in shards:
            shard_path = root / shard
            if not shard_path.exists():
                raise CheckpointError(
                    f"{shard_path}: shard listed in the index of model {ref!r} is missing; "
                    "re-download the model or fix its index"
                )
            require_regular_file(shard_path)
            if shard.endswith(".safetensors"):
                found, _ = read_header(str(shard_path))
            else:
                found, tensors = _load_pickle(shard_path, allow_pickle)
                pickled = {**(pickled or {}), **tensors}
            for name, entry in found.items():
                if weight_map is not None and weight_map.get(name) != shard:
                    continue  # present in the file but the index points elsewhere: index wins
                entries[name] = entry
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in entries:
                    raise CheckpointError(
                        f"{root / shard}: index of model {ref!r} says tensor {name!r} is in this "
                        "shard but its header does not list it; the index or shard is corrupt"
                    )
        config = _read_config(root / "config.json")
        return cls(ref, root, entries, config, None, list(shards), pickled)

    # ------------------------------------------------------------------ queries
    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def entry(self, key: str) -> TensorEntry:
        try:
            return self.entries[key]
        except KeyError:
            raise CheckpointError(f"model {self.ref!r} has no tensor {key!r}") from None

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @property
    def num_parameters(self) -> int:
        return sum(e.numel for e in self.entries.values())

    # ------------------------------------------------------------------ reading
    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (or rows ``[start, stop)`` of its first dimension) in its own dtype."""
        _, _, nbytes = self._span(key, rows)
        return self.read_into(key, torch.empty(nbytes, dtype=torch.uint8), rows)

    def read_into(
        self, key: str, buffer: torch.Tensor, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Read into the front of a reusable uint8 ``buffer``; return a typed view of it.

        Reusing buffers matters: a fresh multi-megabyte allocation per tensor costs a page
        fault per 4 KiB, which on a large merge takes longer than the reads themselves.
        """
        e = self.entry(key)
        shape, offset, nbytes = self._span(key, rows)
        if buffer.numel() < nbytes:
            raise ValueError(f"buffer of {buffer.numel()} bytes is too small for {nbytes}")
        target = buffer[:nbytes]
        if self._pickled is not None and key in self._pickled:
            t = self._pickled[key]
            part = t[rows[0] : rows[1]] if rows else t
            target.view(e.dtype).reshape(shape).copy_(part)
        elif nbytes:
            pread_into(self._fd(e.path), target.numpy().data, offset, e.path, key)
        return target.view(e.dtype).reshape(shape)

    def _span(self, key: str, rows: tuple[int, int] | None) -> tuple[tuple[int, ...], int, int]:
        """Shape, file offset and byte count of a tensor or a block of its rows."""
        e = self.entry(key)
        if rows is None:
            return e.shape, e.offset, e.nbytes
        start, stop = rows
        row_bytes = e.nbytes // e.shape[0] if e.shape and e.shape[0] else 0
        return (stop - start, *e.shape[1:]), e.offset + start * row_bytes, (stop - start) * row_bytes

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = open_regular(path)
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled by reference (headers and absolute paths), for workers on other processes
        or nodes: file descriptors and the lock stay behind and are reopened on first read."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}
        state["root"] = Path(os.path.abspath(self.root))
        state["entries"] = {
            name: replace(e, path=os.path.abspath(e.path)) if e.path else e
            for name, e in self.entries.items()
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fds = {}
        self._lock = threading.Lock()

    def __del__(self) -> None:  # file descriptors are a finite resource
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ provenance
    def provenance(self, full_hash: bool = False) -> dict[str, Any]:
        """What identifies these inputs: ref, revision, and per shard its size and a hash.

        Hub shards carry their LFS sha256 for free (the cache names blobs by it). Local shards
        get a ``sampled_fingerprint`` instead of a full hash, which would re-read gigabytes:
        the sha256 of the size, the header and 16 blocks of 64 KiB spread evenly over the
        data. It is not the file's sha256 and is never called one. Two fine-tunes of one
        architecture share a header, so the sampled data is what tells them apart.
        ``full_hash`` (``--hash-inputs``) reads every local shard for its real ``sha256``.
        """
        shards = []
        for shard in self.shard_files:
            path = self.root / shard
            size = path.stat().st_size
            info: dict[str, Any] = {"file": shard, "bytes": size}
            real = path.resolve()
            if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
                info["sha256"] = real.name
            elif full_hash:
                info["sha256"] = file_sha256(path)
            else:
                info["sampled_fingerprint"] = sampled_fingerprint(path, size)
            shards.append(info)
        return {
            "model": self.ref,
            "path": str(self.root),
            "revision": self.revision,
            "shards": shards,
        }

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r}, {len(self.entries)} tensors, {self.total_bytes} bytes)"


def _read_index(path: Path) -> tuple[list[str], dict[str, str]]:
    weight_map = read_index(path)
    check_shards_inside(path, weight_map)
    return sorted(set(weight_map.values())), weight_map


def _read_config(path: Path) -> dict[str, Any] | None:
    """``config.json`` as an object, or None without one; anything else is a clear error."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        config = json.loads(read_regular_bytes(path).decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: not a model config (its JSON is nested too deeply)") from None
    except (UnicodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: a model config must be a JSON object, not {type(config).__name__}")
    # Multimodal configs nest the language model's config here; readers rely on it being an object.
    if not isinstance(config.get("text_config", {}) or {}, dict):
        raise CheckpointError(f"{path}: 'text_config' must be a JSON object")
    return config


