"""Input fingerprints for provenance and resume: a file's full sha256, or a cheap sampled
fingerprint (size, safetensors header and 16 blocks spread over the data)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a whole file, read in 4 MiB chunks (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_digest(value: Any, default: Callable[[Any], Any] = repr) -> str:
    """The sha256 of ``value`` as canonical JSON (keys sorted); ``default`` renders what JSON
    cannot (paths, dtypes). Resume keys and a search's input record are such digests."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=default).encode()).hexdigest()


def sampled_fingerprint(path: Path, size: int, blocks: int = 16, block: int = 1 << 16) -> str:
    """A ``size``-byte file's cheap fingerprint: its size, safetensors header and ``blocks``
    blocks spread over the data (a full sha256 would re-read gigabytes)."""
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if 8 + n > size:
            # Not a safetensors header (a torch zip starts "PK\x03\x04..."): sample the
            # whole file instead of seeking to an offset past its end.
            n = 0
        digest.update(head + f.read(min(n, 10**8)))
        start = 8 + n
        span = max(size - start - block, 0)
        for i in range(blocks):
            f.seek(start + span * i // max(blocks - 1, 1))
            digest.update(f.read(block))
    return digest.hexdigest()
