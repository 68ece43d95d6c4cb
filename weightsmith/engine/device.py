"""The device stage: what the device pipeline (``device_pipeline.py``) needs from an accelerator,
behind one small interface, with two implementations.

- ``CudaStage``: torch CUDA streams and events, page-locked (pinned) host buffers, device
  buffers from torch's allocator. Work "enqueued on a stream" is issued from the calling thread
  and runs asynchronously on that stream.
- ``StagedCpu`` (``--device cpu-staged``): the same three-stage pipeline on the CPU, a worker
  thread standing in for each stream and threading events for CUDA events. It records the order
  in which stages start and end, and accounts the "device" memory it hands out, so scheduling,
  ordering, batching and the memory bound are tested in CI without a GPU.

The pipeline only ever calls: ``pinned``, ``empty``, ``stream``, ``enqueue``, ``wait``, ``sync``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from weightsmith.engine.device_choice import KERNELS, STAGED_CPU, DeviceChoice
from weightsmith.errors import MergeError, RecipeError

__all__ = ["KERNELS", "STAGED_CPU", "CudaStage", "DeviceStage", "StagedCpu", "open_stage", "resolve_device"]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; others checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("cpu", STAGED_CPU):
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RecipeError(f"--device {device}: no CUDA device is available here; use --device cpu")
        return device
    raise RecipeError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto")


class DeviceStage:
    """What a device offers the pipeline (see the module docstring)."""

    name: str
    compute_device: torch.device  # where the operator's tensors live
    budget: int  # bytes of device memory the pipeline may hold

    def pinned(self, nbytes: int) -> torch.Tensor:
        raise NotImplementedError

    def empty(self, nbytes: int) -> torch.Tensor:
        raise NotImplementedError

    def stream(self, role: str) -> Any:
        raise NotImplementedError

    def enqueue(self, stream: Any, stage: str, unit: int, fn: Callable[[], None], scratch: int = 0) -> Any:
        """Run ``fn`` on ``stream`` (after what is already there); return an event marking its end.
        ``scratch``: device bytes ``fn`` may allocate while it runs (accounted by the fake)."""
        raise NotImplementedError

    def wait(self, stream: Any, event: Any) -> None:
        """Later work on ``stream`` starts after ``event``."""
        raise NotImplementedError

    def sync(self, event: Any) -> None:
        """Block the calling thread until ``event``; raise what the work before it raised."""
        raise NotImplementedError

    def peak_bytes(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CudaStage(DeviceStage):
    def __init__(self, device: str, budget: int | None) -> None:
        self.name = device
        self.compute_device = torch.device(device)
        if self.compute_device.index is None:
            self.compute_device = torch.device("cuda", torch.cuda.current_device())
        free, _ = torch.cuda.mem_get_info(self.compute_device)
        # Default: most of what is free now, leaving room for the CUDA context and the allocator.
        self.budget = budget if budget is not None else free * 4 // 5
        torch.cuda.reset_peak_memory_stats(self.compute_device)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.compute_device)

    def stream(self, role: str) -> Any:
        return torch.cuda.Stream(self.compute_device)

    def enqueue(self, stream: Any, stage: str, unit: int, fn: Callable[[], None], scratch: int = 0) -> Any:
        with torch.cuda.device(self.compute_device), torch.cuda.stream(stream):
            fn()
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def sync(self, event: Any) -> None:
        event.synchronize()

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.compute_device))


@dataclass
class _Event:
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _Worker:
    """A thread standing in for a CUDA stream: runs what is put on it, in order."""

    def __init__(self, role: str) -> None:
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"ws-{role}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            job()


class StagedCpu(DeviceStage):
    """The fake device: CPU buffers, worker threads as streams, an event log, a memory ledger."""

    def __init__(self, budget: int | None) -> None:
        self.name = STAGED_CPU
        self.compute_device = torch.device("cpu")
        self.budget = budget if budget is not None else 1 << 62
        self.in_use = 0
        self.peak = 0
        self.log: list[tuple[str, int, str]] = []  # (stage, unit, "start" | "end"), in time order
        self.lock = threading.Lock()
        self.workers: list[_Worker] = []

    def _account(self, nbytes: int) -> None:
        with self.lock:
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
            if self.in_use > self.budget:  # the pipeline's sizing is wrong: a bug, not a user error
                raise MergeError(
                    f"{STAGED_CPU}: {self.in_use} bytes of device memory in use, over the budget "
                    f"of {self.budget}; this is a bug in the device pipeline, please report it"
                )

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def empty(self, nbytes: int) -> torch.Tensor:
        self._account(max(nbytes, 1))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def stream(self, role: str) -> Any:
        worker = _Worker(role)
        self.workers.append(worker)
        return worker

    def _note(self, stage: str, unit: int, what: str) -> None:
        with self.lock:
            self.log.append((stage, unit, what))

    def enqueue(self, stream: Any, stage: str, unit: int, fn: Callable[[], None], scratch: int = 0) -> Any:
        event = _Event()

        def job() -> None:
            try:
                if stream.failed is None:
                    self._note(stage, unit, "start")
                    self._account(scratch)
                    try:
                        fn()
                    finally:
                        self._account(-scratch)
                    self._note(stage, unit, "end")
            except BaseException as e:  # noqa: BLE001 - handed over at sync
                stream.failed = e
            event.error = stream.failed
            event.done.set()

        stream.jobs.put(job)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        def job() -> None:
            event.done.wait()
            if event.error is not None and stream.failed is None:
                stream.failed = event.error

        stream.jobs.put(job)

    def sync(self, event: Any) -> None:
        event.done.wait()
        if event.error is not None:
            raise event.error

    def peak_bytes(self) -> int:
        return self.peak

    def close(self) -> None:
        for worker in self.workers:
            worker.jobs.put(None)
        for worker in self.workers:
            worker.thread.join()
        self.workers.clear()


def open_stage(choice: DeviceChoice) -> DeviceStage | None:
    """The device stage ``choice`` runs on; None on the plain CPU (no pipeline)."""
    if choice.on_cpu:
        return None
    if choice.staged:
        return StagedCpu(choice.memory_budget)
    return CudaStage(choice.device, choice.memory_budget)
