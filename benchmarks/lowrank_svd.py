"""Exact vs randomized truncated SVD for extract-lora: relative Frobenius error and CPU time.

    PYTHONPATH=. python benchmarks/lowrank_svd.py [N]

Four N x N matrices (default N = 1024): a rank-16 matrix plus 1 % noise, power-law spectra
s_i ~ i^-1 and i^-0.5 (random singular vectors), and a Gaussian (flat spectrum). For ranks 16
and 64 it prints the exact error (torch.linalg.svd) and the randomized one (torch.svd_lowrank,
rank + 8 columns, niter 2 and 4) with its excess over the optimum. One CPU thread.
"""

from __future__ import annotations

import sys
import time

import torch

from weightsmith.ops.lowrank import relative_error, truncated_svd


def _spectrum(n: int, p: float) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(n, n))
    v, _ = torch.linalg.qr(torch.randn(n, n))
    return (u * torch.arange(1, n + 1, dtype=torch.float32) ** -p) @ v.T


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cases = {
        "rank16+noise1%": lambda: (torch.randn(n, 16) @ torch.randn(16, n)) / 16 + 0.0025 * torch.randn(n, n),
        "s~i^-1": lambda: _spectrum(n, 1.0),
        "s~i^-0.5": lambda: _spectrum(n, 0.5),
        "gaussian": lambda: torch.randn(n, n),
    }
    for name, make in cases.items():
        d = make()
        for r in (16, 64):
            t0 = time.perf_counter()
            ex = truncated_svd(d, r, "exact")
            te = time.perf_counter() - t0
            e_ex = relative_error(d, ex.b, ex.a)
            row = [name, str(r), f"exact {e_ex:.5f} ({te:.2f}s)"]
            for it in (2, 4):
                t0 = time.perf_counter()
                rd = truncated_svd(d, r, "randomized", niter=it)
                tr = time.perf_counter() - t0
                e_rd = relative_error(d, rd.b, rd.a)
                row.append(f"rand niter={it} {e_rd:.5f} (+{(e_rd - e_ex) / e_ex * 100:.2f}%, {tr:.2f}s)")
            print(" | ".join(row))


if __name__ == "__main__":
    main()
