"""Stable ascending ranks along dim 1 (DELLA's magnitude ranks), as float32.

``ranks_along_dim1`` gives, for every entry, its 0-based rank within its row (the entries along
dim 1), ascending, ties by position: exactly ``torch.argsort(x, dim=1, stable=True)`` inverted.
On CPU float32 tensors it runs a numba radix-sort kernel (``_rank_kernels.py``, linear in the row
length, rows in parallel), elsewhere (other devices or dtypes, small tensors, numba missing or
``WEIGHTSMITH_FUSED=0``) the torch comparison sort, which stays the reference the kernel is
tested against (tests/test_row_ranks.py).
"""

from __future__ import annotations

import torch

from weightsmith.ops import fused

MIN_NUMEL = 1 << 14  # below this torch's sort is as fast and the kernel's first load is skipped
MAX_ROW = (1 << 31) - 1  # the kernel's positions are int32


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether ``ranks_along_dim1`` runs the numba kernel for ``x``."""
    return (
        fused.available()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() >= MIN_NUMEL
        and x.shape[1] <= MAX_ROW
    )


def torch_ranks(x: torch.Tensor) -> torch.Tensor:
    """The reference: ranks along dim 1 by torch's stable sort (int64 ranks cast to float32)."""
    n = x.shape[1]
    order = torch.argsort(x, dim=1, stable=True)
    positions = torch.arange(n, device=x.device).view(1, n, *[1] * (x.dim() - 2))
    ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
    del order
    return ranks.to(torch.float32)


def kernel_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along dim 1 of a CPU float32 tensor (at least 2-D) by the numba kernel."""
    from weightsmith.ops import _rank_kernels

    # Rank along the last dim of a contiguous [rows, n] copy (a view when x is already 2-D
    # and contiguous); dims after 1 become rows.
    moved = x.movedim(1, -1)
    rows = moved.reshape(-1, x.shape[1]).detach().contiguous()
    out = torch.empty(rows.shape, dtype=torch.float32)
    _rank_kernels.row_ranks(rows.numpy().view("uint32"), out.numpy())
    return out.reshape(moved.shape).movedim(-1, 1)


def ranks_along_dim1(x: torch.Tensor) -> torch.Tensor:
    """float32 rank of every entry of ``x`` (at least 2-D) within its row along dim 1, ascending,
    ties by position; the kernel where ``kernel_applies``, else torch's sort."""
    return kernel_ranks(x) if kernel_applies(x) else torch_ranks(x)
