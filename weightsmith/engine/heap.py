"""How glibc's allocator serves the engine's big buffers: one mode per method, set per run.

Elementwise methods keep big buffers on the heap, where the next tensor reuses them (page-fault
cost matters there). Compute-bound methods (SVDs) get a fresh mapping per big temporary, so
freed memory leaves RSS at once and their measured peak stays at what they declare to the
planner. Both modes are process-wide settings; each run sets its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsmith.ops.registry import MergeMethod


def _libc() -> Any:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def _set_thresholds(mmap: int, trim: int) -> None:
    """glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (fixed: glibc stops adjusting them)."""
    libc = _libc()
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, mmap)
        libc.mallopt(m_trim_threshold, trim)


def keep_big_buffers_on_the_heap() -> None:
    """Serve the operators' tensor-sized temporaries from glibc's heap, not fresh mmaps.

    glibc maps each allocation above its threshold anew, and the kernel then zero-fills it a
    page fault per 4 KiB: measured on a 46 MB tensor, clone 44 ms vs 8 ms and a TIES trim 2x
    slower. On the heap, freed buffers are reused by the next tensor; the budget bounds what
    is live at once, and ``release_heap`` hands the memory back after the merge.
    """
    _set_thresholds(mmap=1 << 30, trim=1 << 30)


# While a compute-bound method runs, every allocation of at least this size is a fresh mapping,
# handed back to the kernel as soon as it is freed.
FRESH_MAP_THRESHOLD = 1 << 20
GLIBC_DEFAULT_TRIM_THRESHOLD = 128 << 10


def map_big_buffers_fresh() -> None:
    """Serve every temporary of 1 MiB or more from a fresh mmap, for SVD methods.

    Their LAPACK workspaces of many sizes fragment the heap, so freed memory stays in RSS: the
    measured peak of one iso_cts matrix varied 2x from run to run (``MergeMethod.compute_bound``).
    Setting the threshold also stops glibc raising it after each free, which would bring
    the heap back. The page faults cost nothing next to the SVD (iso_cts, 1536 x 1536, 4 tasks:
    11.3 s mapped vs 13.2 s on the heap).
    """
    _set_thresholds(mmap=FRESH_MAP_THRESHOLD, trim=GLIBC_DEFAULT_TRIM_THRESHOLD)


def choose_heap(method: MergeMethod) -> None:
    """The allocator mode that keeps ``method``'s measured peak at its declared scratch."""
    if method.compute_bound:
        map_big_buffers_fresh()
    else:
        keep_big_buffers_on_the_heap()


def release_heap() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
