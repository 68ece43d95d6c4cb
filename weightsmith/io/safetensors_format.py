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
import reprlib
import struct
from collections import Counter
from dataclasses import dataclass

import torch

from weightsmith.errors import CheckpointError
from weightsmith.io.regular_file import open_regular

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


# The reference reader takes offsets and dims as u64 and refuses anything that overflows it.
U64_MAX = 2**64 - 1
# torch sizes are int64: a larger dimension cannot even describe an empty tensor.
TORCH_DIM_MAX = 2**63 - 1
ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
CORRUPT = "the header is corrupt — re-download or re-save this shard"


class _Object(dict):
    """A JSON object that remembers which keys it was given more than once."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)
        self.twice: frozenset[str] = frozenset()
        if len(self) < len(pairs):
            counts = Counter(k for k, _ in pairs)
            self.twice = frozenset(k for k, n in counts.items() if n > 1)


def _parse_int(text: str) -> object:
    # The reference (serde_json) reads "-0" and integers beyond 64 bits as floats, which it
    # refuses as offsets or dims; a float here gets the same answer (and 5000-digit numbers
    # never reach int()).
    if text == "-0" or len(text) > 21:
        return float(text)
    value = int(text)
    return float(text) if value > U64_MAX else value


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # serde_json: "number out of range"
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 120
_SHORT_REPR.maxlevel = 3


def _quote(value: object, limit: int = 120) -> str:
    """``repr`` of a header value, cut short (a hostile header can hold megabyte-long names)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value <= U64_MAX


def _parse_header(raw: bytes, path: str) -> _Object:
    corrupt = "the shard is corrupt — re-download or re-save it"
    try:
        text = raw.decode("utf-8")
        header = json.loads(
            text,
            object_pairs_hook=_Object,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_refuse_constant,
        )
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        if "\\u" in text:  # a lone surrogate escape decodes in Python but is not valid UTF-8 text
            json.dumps(header, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise CheckpointError(
            f"{path}: safetensors header is nested too deeply to be a header; {corrupt}"
        ) from None
    except (UnicodeError, ValueError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); {corrupt}") from e
    return header


def _entry_fields(path: str, name: str, spec: object) -> tuple[str, list[int], int, int]:
    """dtype name, shape and data offsets of one header entry, typed as the reference types them."""
    where = f"{path}: tensor {_quote(name)}"
    if not isinstance(spec, _Object):
        raise CheckpointError(f"{where}: header entry {_quote(spec)} is not an object; {CORRUPT}")
    twice = sorted(spec.twice.intersection(ENTRY_FIELDS))
    if twice:
        raise CheckpointError(f"{where}: header entry gives {twice[0]!r} twice; {CORRUPT}")
    missing = [f for f in ENTRY_FIELDS if f not in spec]
    if missing:
        raise CheckpointError(f"{where}: header entry lacks {missing[0]!r}; {CORRUPT}")
    dtype_name, shape, offsets = (spec[f] for f in ENTRY_FIELDS)
    if not isinstance(dtype_name, str):
        raise CheckpointError(f"{where}: dtype {_quote(dtype_name)} is not a dtype name; {CORRUPT}")
    if not isinstance(shape, list):
        raise CheckpointError(f"{where}: shape {_quote(shape)} is not a list; {CORRUPT}")
    for d in shape:
        if type(d) is int and d < 0:
            raise CheckpointError(f"{where}: shape {_quote(shape)} has a negative dimension; {CORRUPT}")
        if type(d) is int and d > TORCH_DIM_MAX:
            raise CheckpointError(f"{where}: shape {_quote(shape)} has a dimension too large (over 2**63-1)")
        if not _is_u64(d):
            raise CheckpointError(
                f"{where}: shape {_quote(shape)} must be a list of non-negative JSON integers; "
                f"{CORRUPT}"
            )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(x) for x in offsets)):
        raise CheckpointError(
            f"{where}: data_offsets {_quote(offsets)} must be two non-negative JSON integers "
            "[begin, end]; {CORRUPT}"
        )
    return dtype_name, shape, offsets[0], offsets[1]


def _declared_bytes(where: str, shape: list[int], dtype: torch.dtype) -> int:
    """Bytes a shape of a dtype takes, refusing what overflows 64 bits as the reference does."""
    numel = 1
    for d in shape:  # in order, like the reference's checked fold: [2**40, 2**40, 0] overflows
        numel *= d
        if numel > U64_MAX:
            break
    nbytes = numel * element_size(dtype)
    if nbytes * 8 > U64_MAX:
        raise CheckpointError(f"{where}: shape {_quote(shape)} is too large (overflows 64 bits)")
    return nbytes


def read_header(path: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Read and validate a safetensors header. Returns (entries by name, metadata).

    The rules are the reference library's: integer dims and offsets, a known dtype, each span
    exactly as long as its shape needs, and the spans tiling the data buffer — every byte
    belongs to exactly one tensor, with nothing after the last one. A gap would otherwise be
    read as shifted weights, an overlap as two tensors sharing bytes.
    """
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(fd, "rb", closefd=False) as f:
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
    finally:
        os.close(fd)
    header = _parse_header(raw, path)
    data_start = 8 + n
    data_len = size - data_start
    if "__metadata__" in header.twice:
        raise CheckpointError(f"{path}: safetensors header gives '__metadata__' twice; {CORRUPT}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{path}: safetensors '__metadata__' must be an object of strings, not {_quote(metadata)}; "
            f"{CORRUPT}"
        )
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, spec in header.items():
        where = f"{path}: tensor {_quote(name)}"
        dtype_name, shape, begin, end = _entry_fields(path, name, spec)
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{where} has dtype {_quote(dtype_name)}, which weightsmith cannot read")
        dtype = DTYPES[dtype_name]
        expected = _declared_bytes(where, shape, dtype)
        if end < begin:
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}] end before they begin; {CORRUPT}"
            )
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: header says bytes [{begin}, {end}) but shape "
                f"{_quote(shape)} of {dtype_name} needs {expected}; {CORRUPT}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{where} ends at byte {data_start + end} but the file has "
                f"{size} bytes; the shard is truncated — re-download or re-save it"
            )
        spans.append((begin, end, name))
        entries[name] = TensorEntry(name, dtype, tuple(shape), path, data_start + begin, expected)
    _check_tiling(path, spans, data_len)
    return entries, dict(metadata)


def _check_tiling(path: str, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """Every byte of the data buffer in exactly one tensor (empty tensors sit between others)."""
    cursor, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin > cursor:
            after = f" (after tensor {_quote(previous)})" if previous is not None else ""
            raise CheckpointError(
                f"{path}: bytes [{cursor}, {begin}) of the data buffer belong to no tensor{after}, "
                f"before tensor {_quote(name)}; {CORRUPT}"
            )
        if begin < cursor:
            raise CheckpointError(
                f"{path}: tensors {_quote(previous)} and {_quote(name)} overlap in the data buffer; {CORRUPT}"
            )
        cursor, previous = end, name
    if cursor != data_len:
        raise CheckpointError(
            f"{path}: {data_len - cursor} trailing bytes after the last tensor's data (the buffer has "
            f"{data_len}, the tensors cover {cursor}); {CORRUPT}"
        )


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
