"""``weightsmith graft BASE FT OUT``: find a sparse graft mask on data, save it, apply it.

The search is weightsmith.finetune.grafting (math in weightsmith/ops/graft.py); the mask is
applied by the streamed ``merge_method: graft``, so OUT is a normal merge output (config,
tokenizer, recipe, report) plus ``graft_report.json`` describing the search.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from weightsmith.cli_errors import friendly
from weightsmith.errors import OutputError

_path = click.Path(path_type=str)


def graft_recipe(base: str, ft: str, mask: str) -> dict[str, Any]:
    return {
        "merge_method": "graft",
        "base_model": base,
        "models": [{"model": ft}],
        "parameters": {"mask": mask},
    }


def default_mask_path(out: str | Path) -> Path:
    # Beside OUT, not inside it: loaders glob OUT/*.safetensors as the model's weights.
    out = Path(out)
    return out.with_name(out.name + ".mask.safetensors")


@contextmanager
def mask_until_done(mask_path: Path) -> Iterator[None]:
    """Keep the mask written inside the block only if the block completes.

    The merge reads the mask from its final name (OUT's recipe records that name), so it is
    written there; on an error or Ctrl-C it is removed and a mask it replaced (--overwrite)
    is put back, so no mask is left without its OUT.
    """
    backup = mask_path.with_name(f".{mask_path.name}.weightsmith-old-{uuid.uuid4().hex[:8]}")
    try:
        if mask_path.exists():
            os.rename(mask_path, backup)
        yield
    except BaseException:
        mask_path.unlink(missing_ok=True)
        if backup.exists():
            os.rename(backup, mask_path)
        raise
    backup.unlink(missing_ok=True)


def _lr(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: a positive number or 'auto'") from None


@click.command("graft")
@click.argument("base", type=_path)
@click.argument("ft", type=_path)
@click.argument("out", type=_path)
@click.option("--data", required=True, type=_path, help="Training JSONL the mask is fitted on.")
@click.option("--task", required=True, type=click.Choice(["classification", "causal-lm"]))
@click.option("--sparsity", required=True, type=float, help="Fraction grafted at the start (e.g. 1e-4).")
@click.option("--val", type=_path, default=None, help="Validation JSONL; the best mask maximises train+val.")
@click.option("--steps", type=int, default=10, show_default=True, help="Mask optimisation steps.")
@click.option(
    "--lr",
    default="1e7",
    show_default=True,
    help="Mask learning rate (the reference's 1e7), or 'auto' to scale it to this model.",
)
@click.option("--sigmoid-bias", type=float, default=10.0, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--truncate", is_flag=True, help="Cut examples longer than --max-length.")
@click.option("--region", multiple=True, metavar="PATTERN", help="Graft only tensors matching (regex).")
@click.option("--metric", default=None, help="Selection metric (default: accuracy / exact_match).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mask-out", type=_path, default=None, help="Where the mask goes [OUT.mask.safetensors].")
@click.option("--memory-budget", default="2GB", show_default=True, help="Merge memory cap.")
@click.option("--overwrite", is_flag=True, help="Replace OUT and the mask file if present.")
@click.option("--quiet", is_flag=True)
@friendly
def graft_cmd(
    base: str,
    ft: str,
    out: str,
    data: str,
    task: str,
    sparsity: float,
    val: str | None,
    steps: int,
    lr: str,
    sigmoid_bias: float,
    batch_size: int,
    max_length: int,
    truncate: bool,
    region: tuple[str, ...],
    metric: str | None,
    seed: int,
    mask_out: str | None,
    memory_budget: str,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Graft FT's update onto BASE on a sparse, data-chosen region; write the model to OUT."""
    from weightsmith.finetune.grafting import optimize_graft

    mask_path = Path(mask_out) if mask_out else default_mask_path(out)
    for path, fix in ((Path(out), "choose another OUT"), (mask_path, "choose --mask-out")):
        if path.exists() and not overwrite:  # before the search, not after it
            raise OutputError(f"{path}: exists; pass --overwrite or {fix}")
    result = optimize_graft(
        base, ft, data, task, sparsity, val=val, steps=steps, lr=_lr(lr),
        sigmoid_bias=sigmoid_bias, batch_size=batch_size, max_length=max_length,
        truncate=truncate, region=region, metric=metric, seed=seed, quiet=quiet,
    )
    report = {
        "base": base,
        "finetuned": ft,
        "mask": str(mask_path),
        "sparsity": sparsity,
        "grafted": result.grafted,
        "region_size": result.region_size,
        "grafted_fraction": result.fraction,
        "best_step": result.best_step,
        "best_score": result.best_score,
        "scores": "train" + (" + val" if val else ""),
        "lr": result.lr,
        "steps": steps,
        "sigmoid_bias": sigmoid_bias,
        "seed": seed,
        "history": result.history,
        "seconds": round(result.seconds, 3),
    }
    from weightsmith.pipeline import merge  # torch and the engine: only when a command runs

    # The mask and OUT (its report inside) appear together or not at all.
    with mask_until_done(mask_path):
        result.save(mask_path)
        merge(
            graft_recipe(base, ft, str(mask_path.resolve())), out, memory_budget=memory_budget,
            overwrite=overwrite, extra_files={"graft_report.json": json.dumps(report, indent=2) + "\n"},
        )
    click.echo(
        f"wrote {out}: grafted {result.grafted:,} of {result.region_size:,} parameters "
        f"({100 * result.fraction:.4g}%), best step {result.best_step}, score "
        f"{result.best_score:.4f}; mask {mask_path}"
    )


COMMANDS = [graft_cmd]
