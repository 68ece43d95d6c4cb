"""Process-level settings that training and evaluation results depend on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def fixed_threads(n: int | None) -> Iterator[None]:
    """Pin torch's intra-op thread count for the duration (None leaves it alone).

    Reductions split across a different number of threads round differently, so bitwise
    reproducibility across machines needs a fixed count; on a busy shared machine one thread
    also avoids OpenMP spin-waiting, which can make two threads several times slower than one.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
