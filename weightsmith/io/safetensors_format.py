"""The safetensors file format, read and written by hand.

We parse headers ourselves (instead of ``safe_open``) so that every read is a ``pread`` into a
buffer we own, and so that a header that lies about offsets, or a truncated file, is reported
with the file and tensor at fault before any merge work starts.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data buffer. Each JSON
entry is ``{"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}`` relative to the
data buffer; the optional ``__metadata__`` entry maps strings to strings.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from weightsmith.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# The reference implementation refuses headers above 100 MB; so do we (a corrupt length
# field would otherwise make us allocate gigabytes).
MAX_HEADER_BYTES = 100_000_000


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: absolute file offset and length."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Read and validate a safetensors header. Returns (entries by name, metadata)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: file is truncated ({size} bytes, no safetensors header); "
                    "re-download or re-save this shard"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length field says {n} bytes but the file has {size}; "
                    "the file is truncated or not safetensors — re-download or re-save it"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" \x00"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: safetensors header is not valid JSON ({e}); the shard is corrupt — "
            "re-download or re-save it"
        ) from e
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, spec in header.items():
        try:
            dtype_name = spec["dtype"]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from e
        if dtype_name not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype_name}, which weightsmith cannot read"
            )
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * element_size(dtype)
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} header says bytes [{begin}, {end}) but shape "
                f"{list(shape)} of {dtype_name} needs {expected}; the header is corrupt"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
                f"{size} bytes; the shard is truncated — re-download or re-save it"
            )
        spans.append((begin, end, name))
        entries[name] = TensorEntry(name, dtype, shape, path, data_start + begin, expected)
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(
                f"{path}: tensors {n0!r} and {n1!r} overlap in the data buffer; the header is "
                "corrupt — re-download or re-save this shard"
            )
    return entries, {str(k): str(v) for k, v in metadata.items()}


def build_header(
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Serialize a header for tensors laid out back to back in the given order.

    Returns the full prefix (length field + padded JSON) and each tensor's data offsets.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * element_size(dtype)
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [pos, pos + nbytes],
        }
        offsets[name] = (pos, pos + nbytes)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad so the data buffer starts 8-byte aligned, as the reference writer does.
    raw += b" " * ((8 - (len(raw) + 8) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
