"""The options several commands share (planning, device, executor), as click decorators.

Imported by cli.py at start-up: nothing here may load torch (`weightsmith --help` stays fast;
tests/test_cli_startup.py checks it), so the default budget comes from weightsmith.defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from weightsmith.defaults import DEFAULT_MEMORY_BUDGET


def common_plan_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--memory-budget",
        default=DEFAULT_MEMORY_BUDGET,
        show_default=True,
        help="cap on tensor memory in flight (e.g. 512MB, 4GB)",
    )(fn)
    fn = click.option(
        "--random-seed",
        type=int,
        default=None,
        help="seed for random methods (DARE); per tensor, independent of batching",
    )(fn)
    fn = click.option(
        "--allow-pickle",
        is_flag=True,
        help="also read PyTorch .bin pickles (with weights_only=True)",
    )(fn)
    fn = click.option(
        "--numerics",
        type=click.Choice(["weightsmith", "mergekit"]),
        default=None,
        help="mergekit: mergekit 0.1.5's arithmetic in the recipe's dtype, to reproduce its output "
        "bit for bit; default: the recipe's `numerics:`, else weightsmith (float32, ties kept)",
    )(fn)
    fn = click.option(
        "--strict",
        is_flag=True,
        help="errors, not warnings, for what mergekit ignores (unknown fields, parameters a "
        "method does not take)",
    )(fn)
    fn = click.option(
        "--stage",
        metavar="NAME",
        default=None,
        help="multi-stage recipes: the stage to produce (default: the unnamed document, else the last)",
    )(fn)
    fn = click.option(
        "--stage-cache",
        metavar="DIR",
        default=None,
        help="multi-stage recipes: where intermediate stages are kept and reused "
        "(default: .weightsmith-stages beside OUT; for plan, in the working directory)",
    )(fn)
    return fn


def executor_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--executor and --ray-no-shared-fs (how the Ray workers get their shards to OUT)."""
    fn = click.option(
        "--ray-no-shared-fs",
        is_flag=True,
        help="--executor ray when the workers cannot see OUT: each streams its shard back to this "
        "process (all output bytes pass through Ray's object store)",
    )(fn)
    return click.option(
        "--executor",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="run here, or one task per output shard on a Ray cluster (pip install 'weightsmith[ray]')",
    )(fn)



def device_options(fn: Any) -> Any:
    fn = click.option(
        "--device-memory-budget", default=None, metavar="SIZE",
        help="device memory the merge may hold, e.g. 20GB; default: 4/5 of the free device memory",
    )(fn)
    fn = click.option(
        "--kernels", type=click.Choice(["torch", "cupy"]), default="torch", show_default=True,
        help="on a GPU: torch ops, or the numba.cuda (CuPy-compatible) kernels of the sparse family",
    )(fn)
    return click.option(
        "--device", default="cpu", show_default=True,
        help="cpu, cuda[:N], or auto (CUDA when present); cpu-staged runs the device pipeline on the CPU",
    )(fn)
