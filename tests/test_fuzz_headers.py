"""Fuzzed headers of a real shard: the reader agrees with the reference library or raises the
project's own error — never another exception, and never an allocation beyond the file size.

Three mutators (byte flips, JSON-token swaps, data-buffer truncation/extension) each run a fixed,
derandomized number of examples, so the test is deterministic and takes a few seconds. Each
example is also read with the reference ``safetensors`` library: whatever we accept it must
accept with identical bytes, and whatever it accepts we accept, except dtypes and dimensions
torch cannot represent (refused with their own message).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from weightsmith.errors import WeightsmithError
from weightsmith.io.checkpoint import Checkpoint

FUZZ = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# A real shard: several dtypes, a scalar, an empty tensor, metadata.
SHARD = save(
    {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.arange(5, dtype=torch.bfloat16),
        "i": torch.tensor([7, -3], dtype=torch.int64),
        "e": torch.zeros(0, 3),
        "s": torch.tensor(1.5, dtype=torch.float16),
        "m": torch.tensor([True, False, True]),
    },
    metadata={"format": "pt"},
)
(N,) = struct.unpack("<Q", SHARD[:8])
HEADER_TEXT = SHARD[8 : 8 + N].decode()
DATA = SHARD[8 + N :]

# What torch cannot represent though the reference reads it: refused by name, on purpose.
ALLOWED_DIVERGENCE = ("which weightsmith cannot read", "too large (over 2**63-1)")


@pytest.fixture(scope="module")
def shard_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "model.safetensors"


def reference_read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception:  # the reference raises its own error types, and sometimes plain ones
        return None


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def check(path: Path, content: bytes) -> str:
    """Read ``content`` with both readers; return 'ok' or 'refused...' (counted as events)."""
    path.write_bytes(content)
    size = len(content)
    try:
        ckpt = Checkpoint.open(path)
        tensors = {k: ckpt.read(k) for k in ckpt.keys()}
        entries = dict(ckpt.entries)
        ckpt.close()
    except WeightsmithError as e:
        ref = reference_read(path)
        if ref is not None:
            assert any(m in str(e) for m in ALLOWED_DIVERGENCE), f"reference accepts what we refuse: {e}"
        return "refused" if ref is None else "refused (a dtype or dim torch lacks)"
    # Nothing read was larger than the file, in total or per tensor.
    assert sum(e.nbytes for e in entries.values()) <= size
    for k, t in tensors.items():
        assert tuple(t.shape) == entries[k].shape and t.dtype == entries[k].dtype
        assert t.numel() * t.element_size() == entries[k].nbytes
    ref = reference_read(path)
    assert ref is not None, "we accept a file the reference refuses"
    ref_tensors, _ = ref
    assert set(ref_tensors) == set(tensors)
    for k, t in tensors.items():
        assert tuple(ref_tensors[k].shape) == tuple(t.shape) and ref_tensors[k].dtype == t.dtype
        assert as_bytes(ref_tensors[k]) == as_bytes(t)
    return "ok"


def frame(header: bytes, data: bytes = DATA) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


# ---------------------------------------------------------------------------- byte flips
@settings(FUZZ, max_examples=250)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, 8 + N - 1), st.integers(0, 255)), min_size=1, max_size=4
    )
)
def test_byte_flips_in_length_and_header(shard_path, flips):
    raw = bytearray(SHARD)
    for pos, value in flips:
        raw[pos] = value
    event(check(shard_path, bytes(raw)))


# ---------------------------------------------------------------------------- JSON-token swaps
class Raw(str):
    """A token written as is (NaN, Infinity, huge numbers, deep nesting)."""


class Pairs(list):
    """An object written from (key, value) pairs, so a key can appear twice."""


def dump(v: object) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(x)}" for k, x in v) + "}"
    if isinstance(v, dict):
        return dump(Pairs(v.items()))
    if isinstance(v, list):
        return "[" + ",".join(dump(x) for x in v) + "]"
    return json.dumps(v)


scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 4, 12, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("-0"), Raw("1e400"),
                     Raw("4.0"), Raw("4e0")]),
    st.just(5000).map(lambda n: Raw("9" * n)),
    st.booleans(),
    st.none(),
    st.sampled_from(["F32", "BF16", "I64", "BOOL", "F16", "U8", "F8_E8M0", "C64", "f32", "4", ""]),
    st.text(max_size=8),
)
deep = st.sampled_from([10, 127, 129, 1000, 200_000]).map(lambda d: Raw("[" * d + "]" * d))
values = st.recursive(
    st.one_of(scalars, deep),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


BASE_HEADER = json.loads(HEADER_TEXT)
PATHS = paths(BASE_HEADER)


def swap_type(v: object) -> object:
    """numbers -> strings -> lists -> objects -> numbers."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return {str(i): x for i, x in enumerate(v)}
    return len(v)


@st.composite
def mutated_headers(draw) -> bytes:
    header = json.loads(HEADER_TEXT)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent, key = None, None
        node = header
        try:
            for part in path:
                parent, key, node = node, part, node[part]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
        action = draw(st.sampled_from(["replace", "swap", "remove", "duplicate", "wrap", "extra"]))
        if parent is None:
            if action == "replace":
                header = draw(values)
            continue
        if action == "replace":
            parent[key] = draw(values)
        elif action == "swap":
            parent[key] = swap_type(node)
        elif action == "remove":
            del parent[key]
        elif action == "wrap":
            parent[key] = [node]
        elif action == "extra":  # an unknown field: ignored by the reference inside an entry
            if isinstance(node, dict):
                node[draw(st.sampled_from(["extra", "dtype_", "offsets"]))] = draw(values)
        elif isinstance(parent, dict):  # duplicate: the key again, same or another value
            again = node if draw(st.booleans()) else draw(values)
            replacement = Pairs([*parent.items(), (key, again)])
            if len(path) == 1:
                header = replacement
                continue
            grand = header
            for part in path[:-2]:
                grand = grand[part]
            grand[path[-2]] = replacement
        else:
            parent.append(node)
    text = dump(header)
    pad = draw(st.sampled_from(["", " " * 5, "\n\t", "\x00\x00"]))
    return (text + pad).encode("utf-8", "surrogatepass")


@settings(FUZZ, max_examples=300)
@given(header=mutated_headers())
def test_json_token_swaps(shard_path, header):
    event(check(shard_path, frame(header)))


# ---------------------------------------------------------------------------- the data buffer
@settings(FUZZ, max_examples=50)
@given(cut=st.integers(-len(DATA), 16), filler=st.binary(min_size=16, max_size=16))
def test_truncated_or_extended_data(shard_path, cut, filler):
    data = DATA[:cut] if cut < 0 else DATA + filler[:cut]
    outcome = check(shard_path, frame(HEADER_TEXT.encode(), data))
    event(outcome)
    assert outcome == ("ok" if cut == 0 else "refused")


def test_unmutated_shard_reads_back(shard_path):
    """The fuzz base itself is accepted, so the mutators start from a valid file."""
    assert check(shard_path, SHARD) == "ok"
