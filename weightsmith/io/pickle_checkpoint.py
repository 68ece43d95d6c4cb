"""PyTorch pickle checkpoints (``.bin``/``.pt``): refused unless allowed, then loaded with
``weights_only=True`` (memory-mapped) into the same ``TensorEntry`` view as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from weightsmith.errors import CheckpointError
from weightsmith.io.safetensors_format import TensorEntry, element_size


def _load_pickle(path: Path, allow_pickle: bool) -> tuple[dict[str, TensorEntry], dict[str, torch.Tensor]]:
    if not allow_pickle:
        raise CheckpointError(
            f"{path}: this is a PyTorch pickle; weightsmith does not unpickle files by default. "
            "Convert it to safetensors, or pass --allow-pickle to load it with weights_only=True"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt archives
        raise CheckpointError(f"{path}: cannot load with weights_only=True ({e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(
            f"{path}: holds a {type(state).__name__}, not a state dict of tensor name -> tensor; "
            "save model.state_dict() instead"
        )
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    entries = {
        k: TensorEntry(k, v.dtype, tuple(v.shape), str(path), 0, v.numel() * element_size(v.dtype))
        for k, v in tensors.items()
    }
    return entries, tensors
