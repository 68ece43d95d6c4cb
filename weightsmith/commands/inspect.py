"""`weightsmith inspect` (a checkpoint's headers) and `weightsmith methods` (the registry)."""

from __future__ import annotations

from collections import Counter

import click

from weightsmith.cli_errors import WRITES_NOTHING, friendly
from weightsmith.dtype_names import dtype_name
from weightsmith.units import format_size


@click.command("inspect")
@click.argument("model")
@click.option("--keys", "show_keys", is_flag=True, help="list every tensor")
@click.option("--allow-pickle", is_flag=True, help="also read PyTorch .bin pickles")
@friendly(on_interrupt=WRITES_NOTHING)
def inspect_cmd(model: str, show_keys: bool, allow_pickle: bool) -> None:
    """Keys, dtypes, parameter count, shards and layer count of MODEL (headers only)."""
    from weightsmith.engine.keys import _num_layers
    from weightsmith.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(model, allow_pickle=allow_pickle)
    dtypes = Counter(dtype_name(e.dtype) for e in ckpt.entries.values())
    click.echo(f"model:       {ckpt.ref} ({ckpt.root})")
    if ckpt.revision:
        click.echo(f"revision:    {ckpt.revision}")
    click.echo(f"tensors:     {len(ckpt.entries)}")
    click.echo(f"parameters:  {ckpt.num_parameters:,}")
    click.echo(f"bytes:       {format_size(ckpt.total_bytes)}")
    click.echo(f"dtypes:      {', '.join(f'{k} x{v}' for k, v in dtypes.most_common())}")
    click.echo(
        f"shards:      {len(ckpt.shard_files)} ({', '.join(ckpt.shard_files[:4])}"
        f"{' ...' if len(ckpt.shard_files) > 4 else ''})"
    )
    click.echo(f"layers:      {_num_layers(ckpt)}")
    if ckpt.config:
        archs = ckpt.config.get("architectures") or ["?"]  # any JSON value: print, never crash
        click.echo(f"architecture: {', '.join(map(str, archs if isinstance(archs, list) else [archs]))}")
    if show_keys:
        for name, e in ckpt.entries.items():
            click.echo(f"  {name} {list(e.shape)} {dtype_name(e.dtype)}")


@click.command("methods")
@friendly(on_interrupt=WRITES_NOTHING)
def methods_cmd() -> None:
    """List merge methods and their parameters."""
    from weightsmith.ops.registry import methods

    for name, m in methods().items():
        params = ", ".join(
            f"{p.name}{'[per model]' if p.per_model else ''}{'' if p.required else '=' + str(p.default)}"
            for p in m.params
        )
        click.echo(f"{name:18s} {m.summary}\n{'':18s} parameters: {params}")


COMMANDS = (inspect_cmd, methods_cmd)
