"""Where a merge computes, as one value: ``--device``, ``--kernels`` and ``--device-memory-budget``
as the engine takes them (checked, ``auto`` resolved, the budget in bytes).

The three always travel together, from the front layer (devices.py builds this from the user's
options) through the executor, the statistics passes, the device pipeline and the Ray tasks;
one value means a new device option is one new field, not a dozen new parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGED_CPU = "cpu-staged"
KERNELS = ("torch", "cupy")  # --kernels: the torch path, or the numba.cuda kernels (ops/cuda_fused.py)


@dataclass(frozen=True)
class DeviceChoice:
    """``device``: cpu, cuda, cuda:N or cpu-staged (the device pipeline on the CPU, for tests);
    ``kernels``: torch or cupy (or ``auto``, the operators' default: the torch path on a
    device); ``memory_budget``: bytes of device memory the pipeline may hold (None: four fifths
    of what is free)."""

    device: str = "cpu"
    kernels: str = "torch"
    memory_budget: int | None = None

    @property
    def on_cpu(self) -> bool:
        """The plain CPU executor: no device stage at all."""
        return self.device == "cpu"

    @property
    def staged(self) -> bool:
        """The ``cpu-staged`` fake: the device pipeline, run on the CPU."""
        return self.device == STAGED_CPU

    @property
    def on_gpu(self) -> bool:
        """A CUDA device (whichever index)."""
        return not (self.on_cpu or self.staged)


ON_CPU = DeviceChoice()  # the default: the plain CPU executor

# The statistics passes on the plain CPU: the operators' default kernels (on CPU tensors every
# choice runs the CPU kernels, ops/kernel_choice.py).
CPU_STATISTICS = DeviceChoice("cpu", "auto")
