"""LoRA references ``BASE+ADAPTER``: a PEFT LoRA adapter applied to its base, per tensor, lazily.

The adapted model is a read-only view with ``Checkpoint``'s interface. Reading a targeted tensor
reads the base tensor (or the requested block of its rows) and adds ``scale * B @ A`` computed in
float32, as ``peft``'s ``merge_and_unload`` does, then rounds once to the base dtype. Nothing is
merged on disk and no tensor is held beyond the read that asked for it.

Only plain LoRA is implemented; every adapter variant whose merged weights are not exactly
``W + scale * B @ A`` (DoRA, lora_bias, LoHa, residual initialisations, ...) is refused by name.
Key naming follows peft 0.21 (``peft/utils/save_and_load.py``): saved keys carry the prefix
``base_model.model.``, LoRA factors end in ``lora_A.weight`` / ``lora_B.weight`` (Linear, Conv1D)
or ``lora_embedding_A`` / ``lora_embedding_B`` (Embedding), optionally with the adapter name before
``weight``; any other key is a tensor the adapter saves whole (``modules_to_save``, a trained
bias, an embedding's ``base_layer``) and replaces the base's tensor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import CheckpointError
from weightsmith.io.checkpoint import REFERENCE_OPENERS, Checkpoint
from weightsmith.io.peft_format import (
    _LORA_KEY,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    _base_key,
    check_supported,
    is_conv1d,
    lora_scale,
)
from weightsmith.model_ref import LORA_FORM, looks_like_hub_id, never_local, parse_model_ref


@dataclass
class LoraPatch:
    """What the adapter does to one base tensor."""

    key: str  # the base tensor
    module: str  # peft's module name (the key without ``.weight``)
    a_key: str | None = None  # adapter tensor names
    b_key: str | None = None
    embedding: bool = False  # lora_embedding_A [r, rows] / lora_embedding_B [cols, r]
    transposed: bool = False  # fan_in_fan_out: the base weight is stored [in, out]
    scale: float = 0.0
    replacement: str | None = None  # adapter tensor that replaces the base tensor before the delta


@dataclass
class LoraAdapter:
    """A validated PEFT LoRA adapter: its config, weights (lazy) and per-base-tensor patches."""

    ref: str
    root: Path
    config: dict[str, Any]
    weights: Checkpoint
    patches: dict[str, LoraPatch] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- refs
def open_lora_reference(
    ref: str, *, allow_pickle: bool = False, search_dirs: tuple[Path, ...] = ()
) -> LoraCheckpoint:
    """Open ``BASE+ADAPTER`` as the lazily adapted base (each side may carry ``@revision``)."""
    parsed = parse_model_ref(ref, exists=never_local, error=CheckpointError)
    if parsed.adapter is None:
        raise CheckpointError(f"model: {ref!r}: {LORA_FORM}")
    base = Checkpoint.open(str(parsed.base), allow_pickle=allow_pickle, search_dirs=search_dirs)
    adapter = read_adapter(str(parsed.adapter), search_dirs=search_dirs)
    adapter.patches = plan_patches(adapter, base)
    return LoraCheckpoint(
        ref=ref,
        root=base.root,
        entries=dict(base.entries),
        config=base.config,
        revision=base.revision,
        shard_files=list(base.shard_files),
        base=base,
        adapter=adapter,
    )


def _open_if_lora_reference(
    ref: str, allow_pickle: bool, search_dirs: tuple[Path, ...]
) -> LoraCheckpoint | None:
    """``Checkpoint.open``'s hook, called once no local path is named ``ref``: a reference with
    a ``+`` (model_ref.py parses it)."""
    if parse_model_ref(ref, exists=never_local, error=CheckpointError).adapter is None:
        return None
    return open_lora_reference(ref, allow_pickle=allow_pickle, search_dirs=search_dirs)


def _adapter_folder(ref: str, search_dirs: tuple[Path, ...]) -> tuple[Path, str | None]:
    candidates = [Path(ref).expanduser()]
    candidates += [d / ref for d in search_dirs if not Path(ref).is_absolute()]
    for path in candidates:
        if path.exists():
            return (path.parent if path.is_file() else path), None
    if looks_like_hub_id(ref):
        from weightsmith.io.hub import resolve_hub_model

        return resolve_hub_model(ref)
    raise CheckpointError(
        f"LoRA adapter {ref!r}: no such folder (looked in {', '.join(map(str, candidates))}); give "
        "the folder holding adapter_config.json and adapter_model.safetensors, or a Hub id"
    )


# ------------------------------------------------------------------------------------- reading
def read_adapter(ref: str, *, search_dirs: tuple[Path, ...] = ()) -> LoraAdapter:
    """Read and validate ``adapter_config.json``; open ``adapter_model.safetensors`` lazily."""
    root, revision = _adapter_folder(ref, search_dirs)
    config_path = root / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CheckpointError(
            f"LoRA adapter {ref!r}: {config_path} is missing; a PEFT adapter folder holds "
            "adapter_config.json and adapter_model.safetensors (saved by save_pretrained)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: an adapter config must be a JSON object")
    check_supported(config, str(config_path))
    weights_path = root / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        bin_hint = " (adapter_model.bin is a pickle: re-save with safe_serialization=True)" if (
            root / "adapter_model.bin"
        ).exists() else ""
        raise CheckpointError(f"LoRA adapter {ref!r}: {weights_path} is missing{bin_hint}")
    weights = Checkpoint.open(weights_path)
    weights.revision = revision
    return LoraAdapter(ref, root, config, weights)


def plan_patches(adapter: LoraAdapter, base: Checkpoint) -> dict[str, LoraPatch]:
    """Map every adapter tensor onto the base tensor it changes, checking shapes."""
    where = f"LoRA adapter {adapter.ref!r} ({adapter.weights.root / ADAPTER_WEIGHTS})"
    patches: dict[str, LoraPatch] = {}
    adapter_names: set[str] = set()
    factors: dict[str, dict[str, str]] = {}
    for name in adapter.weights.keys():
        if not name.startswith(PEFT_PREFIX):
            raise CheckpointError(
                f"{where}: tensor {name!r} lacks peft's prefix {PEFT_PREFIX!r}; not a PEFT adapter "
                "saved with save_pretrained"
            )
        rest = name[len(PEFT_PREFIX):]
        if "lora_magnitude_vector" in rest:
            raise CheckpointError(f"{where}: tensor {name!r} is a DoRA magnitude; DoRA is not supported")
        if re.search(r"\.lora_(?:B|embedding_B)(?:\.[^.]+)?\.bias$", rest):
            raise CheckpointError(
                f"{where}: tensor {name!r} is a LoRA bias (lora_bias); it changes the layer's bias "
                "and is not supported. Merge this adapter with peft first"
            )
        m = _LORA_KEY.match(rest)
        if m is None and re.search(r"\.lora_[^.]+", rest):
            raise CheckpointError(
                f"{where}: tensor {name!r} is a LoRA part weightsmith does not apply exactly "
                "(e.g. lora_B.bias from lora_bias); merge this adapter with peft first"
            )
        if m is None:
            key = _base_key(rest)
            if key not in base:
                raise CheckpointError(
                    f"{where}: saves tensor {name!r} whole, but base model {base.ref!r} has no "
                    f"tensor {key!r}; is this adapter for another base?"
                )
            patch = patches.setdefault(key, LoraPatch(key, key.rsplit(".", 1)[0]))
            patch.replacement = name
            continue
        if m["adapter"]:
            adapter_names.add(m["adapter"])
        embedding = m["part"].startswith("lora_embedding")
        if embedding == bool(m["weight"]):
            raise CheckpointError(f"{where}: tensor {name!r} is not named as peft names LoRA factors")
        factors.setdefault(m["module"], {})[m["part"][-1]] = name
        factors[m["module"]]["embedding"] = "1" if embedding else ""
    if len(adapter_names) > 1:
        raise CheckpointError(
            f"{where}: holds several adapters ({', '.join(sorted(adapter_names))}); save one adapter "
            "per folder"
        )
    model_type = (base.config or {}).get("model_type")
    for module, parts in factors.items():
        if "A" not in parts or "B" not in parts:
            raise CheckpointError(f"{where}: module {module!r} has only one of lora_A / lora_B")
        key = f"{module}.weight"
        if key not in base:
            raise CheckpointError(
                f"{where}: adapts module {module!r} but base model {base.ref!r} has no tensor {key!r} "
                "(tied embeddings, or an adapter for another base?)"
            )
        a, b = adapter.weights.entry(parts["A"]), adapter.weights.entry(parts["B"])
        w = base.entry(key)
        r, scale = lora_scale(adapter.config, module)
        if len(a.shape) != 2 or len(b.shape) != 2 or len(w.shape) != 2:
            raise CheckpointError(
                f"{where}: module {module!r}: LoRA on a {len(w.shape)}-D weight (convolution?) is "
                "not supported; only 2-D weights"
            )
        embedding = bool(parts["embedding"])
        if embedding:  # A [r, rows], B [cols, r]; delta = (B @ A)^T
            ok, transposed = a.shape[0] == r and b.shape[1] == r and w.shape == (a.shape[1], b.shape[0]), True
        else:  # A [r, in], B [out, r]; delta = B @ A, or its transpose for Conv1D
            out_in, in_out = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
            if out_in == in_out:
                transposed = is_conv1d(model_type, module) or bool(adapter.config.get("fan_in_fan_out"))
            else:
                transposed = w.shape == in_out
            ok = a.shape[0] == r and b.shape[1] == r and w.shape in (out_in, in_out)
        if not ok:
            raise CheckpointError(
                f"{where}: module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} with "
                f"r={r} do not fit base tensor {key!r} {list(w.shape)}; is this adapter for another "
                "base, or its rank_pattern wrong?"
            )
        patch = patches.setdefault(key, LoraPatch(key, module))
        patch.a_key, patch.b_key, patch.embedding = parts["A"], parts["B"], embedding
        patch.transposed, patch.scale = transposed, float(scale)
    for key, patch in patches.items():
        if patch.replacement is not None:
            have, want = adapter.weights.entry(patch.replacement).shape, base.entry(key).shape
            if have != want:
                raise CheckpointError(
                    f"{where}: tensor {patch.replacement!r} has shape {list(have)} but the base's "
                    f"{key!r} has {list(want)} (a resized vocabulary?); weightsmith keeps the base's shapes"
                )
    return patches


# ----------------------------------------------------------------------------------------- math
# The one arithmetic in io/, on purpose: decoding the adapter is part of reading this view, which
# io/ cannot delegate to ops/ (no upward import); see docs/architecture.md, "Layers".
def lora_delta(adapter: Checkpoint, patch: LoraPatch, rows: tuple[int, int] | None) -> torch.Tensor:
    """``scale * B @ A`` in float32 for the base tensor's rows ``[r0, r1)`` (all rows if None).

    Row blocks read only what they need: B's rows for a plain weight; A's columns when the
    weight is stored transposed (Conv1D, embeddings), since then W[r0:r1] = (B @ A[:, r0:r1])^T.
    The operation order is peft's (product, then transpose, then times the scale).
    """
    assert patch.a_key is not None and patch.b_key is not None
    if patch.transposed:
        a = adapter.read(patch.a_key).float()
        b = adapter.read(patch.b_key).float()
        if rows is not None:
            a = a[:, rows[0] : rows[1]]
        return (b @ a).T.mul_(patch.scale)  # in place: one block of scratch, same values
    a = adapter.read(patch.a_key).float()
    b = adapter.read(patch.b_key, rows).float()
    return (b @ a).mul_(patch.scale)


# ----------------------------------------------------------------------------------------- view
@dataclass(repr=False)
class LoraCheckpoint(Checkpoint):
    """``base + adapter`` as a read-only lazy checkpoint: same keys, shapes and dtypes as the
    base; a targeted tensor is adapted when read (float32 arithmetic, one rounding)."""

    base: Checkpoint | None = None
    adapter: LoraAdapter | None = None

    def read_into(
        self, key: str, buffer: torch.Tensor, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        assert self.base is not None and self.adapter is not None
        patch = self.adapter.patches.get(key)
        if patch is None:
            return self.base.read_into(key, buffer, rows)
        e = self.entry(key)
        shape, _, nbytes = self._span(key, rows)
        if buffer.numel() < nbytes:
            raise ValueError(f"buffer of {buffer.numel()} bytes is too small for {nbytes}")
        if patch.replacement is not None:  # cast to the base dtype, as peft's load_state_dict does
            out = buffer[:nbytes].view(e.dtype).reshape(shape)
            out.copy_(self.adapter.weights.read(patch.replacement, rows))
        else:
            out = self.base.read_into(key, buffer, rows)
        if patch.a_key is not None:
            delta = lora_delta(self.adapter.weights, patch, rows)
            # a float32 base is updated in place (float() returns it); others round once here
            out.copy_(out.float().add_(delta))
        return out

    def provenance(self, full_hash: bool = False) -> dict[str, Any]:
        assert self.base is not None and self.adapter is not None
        info = self.base.provenance(full_hash)
        info["model"] = self.ref
        adapter = self.adapter.weights.provenance(full_hash)
        info["adapter"] = {"model": self.adapter.ref, **{k: v for k, v in adapter.items() if k != "model"}}
        return info

    def close(self) -> None:
        for part in (self.base, self.adapter.weights if self.adapter else None):
            if part is not None:
                part.close()
        super().close()

    def __repr__(self) -> str:
        n = len(self.adapter.patches) if self.adapter else 0
        return f"LoraCheckpoint({self.ref!r}, {len(self.entries)} tensors, {n} adapted)"


REFERENCE_OPENERS.append(_open_if_lora_reference)
