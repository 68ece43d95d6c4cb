"""A safetensors file written when tensor shapes are only known as they are computed.

``ShardWriter`` needs every shape up front; an extracted adapter's ranks are known only after
each matrix's SVD. Tensors are appended to a spill file as they come (nothing is kept in
memory), then ``finish`` writes the header and copies the data after it in fixed-size chunks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from weightsmith.errors import OutputError
from weightsmith.io.safetensors_format import build_header

_CHUNK = 1 << 24


class AppendingSafetensorsWriter:
    """Append tensors, then ``finish()`` into ``path`` (the spill file is removed)."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.spill = self.path.with_name(f".{self.path.name}.spill")
        self.metadata = {"format": "pt", **(metadata or {})}
        self.items: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self._file = open(self.spill, "wb")  # noqa: SIM115 - closed in finish/abort

    def append(self, name: str, tensor: torch.Tensor) -> None:
        if any(name == n for n, _, _ in self.items):
            raise ValueError(f"tensor {name!r} written twice")
        data = tensor.detach().cpu().contiguous()
        try:
            if data.numel():
                # the tensor's own memory (no bytes copy: a module saved whole is not held twice)
                self._file.write(data.reshape(-1).view(torch.uint8).numpy())
        except OSError as e:
            raise OutputError(f"{self.spill}: cannot write ({e.strerror or e})") from e
        self.items.append((name, data.dtype, tuple(data.shape)))

    def finish(self) -> int:
        """Write the final file; returns its size in bytes."""
        self._file.close()
        prefix, _ = build_header(self.items, self.metadata)  # offsets follow append order
        try:
            with open(self.path, "wb") as out, open(self.spill, "rb") as src:
                out.write(prefix)
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror or e})") from e
        finally:
            self.spill.unlink(missing_ok=True)
        return self.path.stat().st_size

    def abort(self) -> None:
        self._file.close()
        self.spill.unlink(missing_ok=True)
