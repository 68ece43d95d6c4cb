"""Runs a MergePlan: read-ahead, compute, write-behind, all under one memory budget.

Three stages overlap: reader threads ``pread`` the next units' inputs and convert them to the
compute dtype; the calling thread runs the operator; a writer thread casts and ``pwrite``s the
result. Every unit reserves its bytes from a shared ``Budget`` before its reads start and gives
them back after its write, so in-flight tensors never exceed ``--memory-budget``. The engine
never knows the operator's math: it hands stacked tensors to ``method(inputs, **params)``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from weightsmith.engine.plan import MergePlan, Source, WorkUnit
from weightsmith.errors import MergeError
from weightsmith.io.writer import ShardWriter
from weightsmith.ops.registry import MergeInputs


def _return_big_buffers_to_the_os() -> None:
    """Make glibc serve tensor-sized buffers with mmap, so freeing them lowers RSS.

    By default glibc raises its mmap threshold after the first large free (up to 32 MB) and
    then keeps freed tensor buffers in per-thread heaps, so RSS drifts above what is live.
    A fixed threshold keeps resident memory equal to what the budget accounts for.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


class Budget:
    """A byte semaphore. A unit larger than the whole budget waits until it runs alone."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self.cond = threading.Condition()

    def acquire(self, nbytes: int, cancelled: threading.Event) -> int:
        want = min(nbytes, self.total)
        with self.cond:
            while self.free < want and not cancelled.is_set():
                self.cond.wait(0.1)
            self.free -= want
        return want

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.free += nbytes
            self.cond.notify_all()


@dataclass
class Loaded:
    unit: WorkUnit
    reserved: int
    models: torch.Tensor | None = None
    base: torch.Tensor | None = None
    copy: torch.Tensor | None = None


@dataclass
class RunStats:
    bytes_read: int = 0
    bytes_written: int = 0
    tensors: int = 0
    report: dict[str, dict[str, float]] = field(default_factory=dict)
    # Model-wide statistics passes run before the output pass (engine/passes.py), what they
    # read, and their result (handed to the method as ``inputs.context``).
    global_passes: int = 0
    global_bytes_read: int = 0
    context: Any = None
    # merge_report.json's summary (engine/summary.py), filled by the pipeline after the run.
    summary: dict[str, Any] | None = None


def _read_rows(plan: MergePlan, src: Source, rows: tuple[int, int] | None, task_rows: int) -> torch.Tensor:
    """Read an input (or rows of it), zero-padding or truncating per vocab_policy."""
    ckpt = plan.checkpoints[src.ckpt]
    if src.rows is None:
        return ckpt.read(src.key, rows)
    entry = ckpt.entry(src.key)
    start, stop = rows if rows else (0, task_rows)
    out_rows = stop - start
    have = max(0, min(src.rows, start + out_rows) - start)
    part = ckpt.read(src.key, (start, start + have)) if have else None
    if have == out_rows and part is not None:
        return part
    full = torch.zeros((out_rows, *entry.shape[1:]), dtype=entry.dtype)
    if part is not None:
        full[:have] = part
    return full


def load_unit(plan: MergePlan, unit: WorkUnit, reserved: int) -> Loaded:
    task, rows = unit.task, unit.rows
    loaded = Loaded(unit, reserved)
    if task.kind == "copy":
        assert task.base is not None
        loaded.copy = plan.checkpoints[task.base.ckpt].read(task.base.key, rows)
        return loaded
    cd = plan.compute_dtype
    n_rows = task.shape[0] if task.shape else 1
    first = _read_rows(plan, task.models[0], rows, n_rows)
    stacked = torch.empty((len(task.models), *first.shape), dtype=cd)
    stacked[0].copy_(first)
    del first
    for i, src in enumerate(task.models[1:], start=1):
        stacked[i].copy_(_read_rows(plan, src, rows, n_rows))
    loaded.models = stacked
    if task.base is not None:
        loaded.base = _read_rows(plan, task.base, rows, n_rows).to(cd)
    return loaded


def _nonfinite_culprit(plan: MergePlan, unit: WorkUnit) -> str:
    """After a NaN/Inf shows up, find which input (if any) already had one."""
    task = unit.task
    for src in [*([task.base] if task.base else []), *task.models]:
        ckpt = plan.checkpoints[src.ckpt]
        data = _read_rows(plan, src, unit.rows, task.shape[0] if task.shape else 1)
        if not torch.isfinite(data.float()).all():
            return (
                f"the input model {ckpt.ref!r} ({ckpt.entry(src.key).path}) already contains "
                "NaN/Inf in this tensor; fix or replace that checkpoint"
            )
    return (
        "no input has NaN/Inf, so the merge arithmetic overflowed the output dtype; lower the "
        "weights or lambda, or write a wider out_dtype"
    )


def execute(
    plan: MergePlan,
    writer: ShardWriter,
    *,
    threads: int = 2,
    progress: Callable[[int], None] | None = None,
    device: str = "cpu",
) -> RunStats:
    """Run every unit of the plan, writing results through ``writer``."""
    _return_big_buffers_to_the_os()
    stats = RunStats()
    # Methods with model-wide statistics stream the inputs first; the result is small.
    from weightsmith.engine.passes import run_global_passes

    stats.context, stats.global_passes, stats.global_bytes_read = run_global_passes(
        plan, threads=threads, device=device
    )
    context = stats.context
    budget = Budget(plan.memory_budget)
    cancelled = threading.Event()
    ready: queue.Queue[Future[Loaded] | None] = queue.Queue(maxsize=max(2, threads * 2))
    to_write: queue.Queue[tuple[WorkUnit, torch.Tensor, int] | None] = queue.Queue(maxsize=2)
    errors: list[BaseException] = []
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ws-read")

    def produce() -> None:
        try:
            for unit in plan.units:
                if cancelled.is_set():
                    break
                reserved = budget.acquire(unit.reserve, cancelled)
                ready.put(pool.submit(load_unit, plan, unit, reserved))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
        finally:
            ready.put(None)

    def write_behind() -> None:
        while True:
            item = to_write.get()
            if item is None:
                return
            unit, out, reserved = item
            try:
                if not cancelled.is_set():
                    writer.write(unit.task.name, out, unit.rows)
                    stats.bytes_written += out.numel() * out.element_size()
                    if progress:
                        progress(out.numel() * out.element_size())
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                cancelled.set()
            finally:
                del out
                budget.release(reserved)

    producer = threading.Thread(target=produce, name="ws-plan", daemon=True)
    writer_thread = threading.Thread(target=write_behind, name="ws-write", daemon=True)
    producer.start()
    writer_thread.start()
    try:
        while True:
            if errors:
                raise errors[0]
            fut = ready.get()
            if fut is None:
                break
            loaded = fut.result()
            out, tensor_stats = _compute(plan, loaded, device, context)
            if tensor_stats:
                # Row blocks of one tensor add up: methods report additive quantities.
                into = stats.report.setdefault(loaded.unit.task.name, {})
                for k, v in tensor_stats.items():
                    into[k] = into.get(k, 0.0) + v
            to_write.put((loaded.unit, out, loaded.reserved))
            loaded = None  # drop input references before the next unit
            stats.tensors += 1
        to_write.put(None)
        writer_thread.join()
        if errors:
            raise errors[0]
    except BaseException:
        cancelled.set()
        _drain(ready)
        try:
            to_write.put_nowait(None)
        except queue.Full:
            pass
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    stats.bytes_read = plan.bytes_to_read + stats.global_bytes_read
    return stats


def _drain(q: queue.Queue[Any]) -> None:
    try:
        while True:
            item = q.get_nowait()
            if isinstance(item, Future):
                item.cancel()
    except queue.Empty:
        pass


def _compute(
    plan: MergePlan, loaded: Loaded, device: str, context: Any = None
) -> tuple[torch.Tensor, dict[str, float]]:
    unit = loaded.unit
    task = unit.task
    if task.kind == "copy":
        assert loaded.copy is not None
        return loaded.copy, {}
    assert loaded.models is not None
    models, base = loaded.models, loaded.base
    if device != "cpu":
        models = models.to(device, non_blocking=True)
        base = base.to(device, non_blocking=True) if base is not None else None
    generator = None
    if task.seed is not None:
        generator = torch.Generator(device=models.device)
        generator.manual_seed(task.seed)
    inputs = MergeInputs(task.name, models, base, generator, context)
    out = plan.method(inputs, **task.params)
    if not torch.isfinite(out).all():
        raise MergeError(
            f"tensor {task.name!r}: the merge produced NaN/Inf; {_nonfinite_culprit(plan, unit)}"
        )
    out = out.to(task.out_dtype)
    if task.out_dtype.is_floating_point and not torch.isfinite(out).all():
        raise MergeError(
            f"tensor {task.name!r}: values overflow {str(task.out_dtype).removeprefix('torch.')}; "
            "write a wider out_dtype or lower the weights"
        )
    return (out.cpu() if out.device.type != "cpu" else out), inputs.stats
