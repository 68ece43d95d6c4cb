"""Compile the CUDA kernels (ops/_cuda_kernels.py) to PTX for a Hopper GPU without one (NVVM
only, no driver) and count the float instructions that decide bit-for-bit equality; prints
JSON. Run by tests/test_gpu_sim.py in a subprocess (numba.cuda must not be the simulator)."""

from __future__ import annotations

import json
import re
import sys

from numba import cuda, types


class _Hopper:  # device functions ask the current device's compute capability; there is none
    compute_capability = (9, 0)


def main() -> None:
    import numba.cuda.dispatcher as dispatcher

    dispatcher.get_current_device = lambda: _Hopper()
    from weightsmith.ops import _cuda_kernels as ck

    f32, f64, i64, i32 = types.float32, types.float64, types.int64, types.int32
    u8, b1 = types.uint8, types.boolean

    def a(t: types.Type, nd: int) -> types.Array:
        return types.Array(t, nd, "C")

    signatures = {
        "task_vectors": (a(f32, 2), a(f32, 1), a(u8, 1), b1, i64, a(i64, 2), a(f64, 2), a(i64, 2)),
        "refine": (a(i32, 2), a(i64, 1), a(i32, 1), i64, a(i64, 2)),
        "combine": (
            a(f32, 2), a(f32, 1), a(f32, 1), a(f32, 1), a(f32, 1), f32, b1, b1, b1, f32, i64,
            a(f32, 1), a(f64, 2), a(i64, 2),
        ),
        "elected_sign_sum": (a(f32, 2), a(f32, 1), a(f32, 1), i64, a(i64, 1)),
        "model_combine": (
            a(f32, 2), a(f32, 1), a(f32, 1), a(f32, 1), a(f32, 1), i64, i64, f32, b1, i64,
            a(f32, 1), a(f64, 2), a(i64, 2),
        ),
    }
    counts = {}
    for name, sig in signatures.items():
        try:
            ptx, _ = cuda.compile_ptx(getattr(ck, name).py_func, sig, cc=(9, 0))
        except Exception as e:  # no libNVVM on this machine
            if "NVVM" in str(e) or "libnvvm" in str(e).lower() or "libdevice" in str(e).lower():
                print(json.dumps({"skip": f"{type(e).__name__}: {str(e).splitlines()[0]}"}))
                return
            raise
        counts[name] = {
            "fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
            "mul_rn_f32": len(re.findall(r"\bmul\.rn\.f32\b", ptx)),
            "mul_f32": len(re.findall(r"\bmul\.f32\b", ptx)),  # contractible by ptxas
            "div_f32": sorted(set(re.findall(r"\bdiv\.[a-z.]*f32\b", ptx))),
            "atomics": sorted(set(re.findall(r"\batom\.[a-z.0-9]+", ptx))),
        }
    print(json.dumps(counts))


if __name__ == "__main__":
    sys.exit(main())
