"""Where ``extract-lora`` runs its per-matrix SVDs: here (``--device cpu``), or on the device
stage of engine/device.py (``cuda[:N]``, or the ``cpu-staged`` fake that CI tests), on its
compute stream, with the matrix copied in and the factors copied back. The device stage
accounts each SVD's scratch against ``--device-memory-budget``, and a matrix whose SVD could
not fit it is refused before any output (``check_fits_device``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from weightsmith.engine.device import DeviceStage, open_stage
from weightsmith.engine.device_choice import ON_CPU, DeviceChoice
from weightsmith.errors import MergeError
from weightsmith.units import format_size

T = TypeVar("T")


class SvdRunner:
    """Runs ``fn(matrix)`` on the selected device (``devices.device_choice`` checks the user's
    options); ``close()`` when done."""

    def __init__(self, device_choice: DeviceChoice = ON_CPU) -> None:
        self.device = device_choice.device
        self.stage: DeviceStage | None = open_stage(device_choice)
        self._compute = None if self.stage is None else self.stage.stream("compute")
        self.count = 0

    @property
    def log(self) -> list[tuple[str, int, str]]:
        """The fake device's (stage, matrix, start|end) log; empty on cpu and cuda."""
        return list(getattr(self.stage, "log", []))

    def check_fits_device(self, name: str, shape: tuple[int, ...], peak: int) -> None:
        """Refuse up front a matrix whose SVD would pass the device memory budget."""
        if self.stage is not None and peak > self.stage.budget:
            raise MergeError(
                f"tensor {name!r} {list(shape)}: its SVD needs about {format_size(peak)} on "
                f"{self.device}, over the device memory budget of {format_size(self.stage.budget)}; "
                "raise --device-memory-budget, use --svd randomized with a small --rank, "
                "or --device cpu"
            )

    def run(self, fn: Callable[[torch.Tensor], T], matrix: torch.Tensor, scratch: int = 0) -> T:
        if self.stage is None or self._compute is None:
            return fn(matrix)
        stage = self.stage
        out: list[Any] = []
        index = self.count
        self.count += 1

        def job() -> None:
            out.append(fn(matrix.to(stage.compute_device, non_blocking=False)))

        stage.sync(stage.enqueue(self._compute, "compute", index, job, scratch=scratch))
        return out[0]

    def close(self) -> None:
        if self.stage is not None:
            self.stage.close()
