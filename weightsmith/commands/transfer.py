"""``weightsmith transfer NEW_BASE FT OLD_BASE OUT``: fine-tuning transfer, optionally followed by
fine-tuning from the transferred model ("recycling-then-finetuning", Lin et al., EMNLP 2025).

The transfer itself is the streamed ``merge_method: transfer`` (weightsmith/ops/transfer.py);
the fine-tuning stage is the finetune engine started from the transferred weights (init_from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from weightsmith import finished_outputs
from weightsmith.cli_errors import NOTHING_WRITTEN, friendly
from weightsmith.finetune.cli import schedule_options

_path = click.Path(path_type=str)


def transfer_recipe(
    new_base: str, ft: str, old_base: str, weight: float = 1.0, tokenizer_source: str | None = None
) -> dict[str, Any]:
    """The merge recipe of one transfer. ``vocab_policy: pad``: tokens the fine-tune added come
    over as its own rows (both bases read as zeros there), as in the reference."""
    recipe: dict[str, Any] = {
        "merge_method": "transfer",
        "base_model": new_base,
        "models": [{"model": ft, "parameters": {"source_base": old_base, "weight": weight}}],
        "vocab_policy": "pad",
    }
    if tokenizer_source is not None:
        recipe["tokenizer_source"] = tokenizer_source
    return recipe


def _vocab_rows(ref: str) -> int | None:
    from weightsmith.io.checkpoint import Checkpoint

    config = Checkpoint.open(ref).config or {}
    rows = config.get("vocab_size")
    return rows if isinstance(rows, int) else None


def transfer_model(
    new_base: str | Path,
    ft: str | Path,
    old_base: str | Path,
    out: str | Path,
    *,
    weight: float = 1.0,
    memory_budget: str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write NEW_BASE + weight * (FT - OLD_BASE) to ``out``; returns ``out``.

    When FT's vocabulary is larger than NEW_BASE's (it added tokens), the output takes FT's
    tokenizer, since the extra rows are FT's tokens.
    """

    new_rows, ft_rows = _vocab_rows(str(new_base)), _vocab_rows(str(ft))
    grew = new_rows is not None and ft_rows is not None and ft_rows > new_rows
    recipe = transfer_recipe(
        str(new_base), str(ft), str(old_base), weight, tokenizer_source=str(ft) if grew else None
    )
    from weightsmith.pipeline import merge  # torch and the engine: only when a command runs

    merge(recipe, out, memory_budget=memory_budget, overwrite=overwrite)
    return Path(out)


def _interrupted(params: dict[str, Any]) -> str:
    # Each stage's folder is written whole or not at all; the transfer finishes first.
    if not params.get("then_finetune"):
        return NOTHING_WRITTEN
    out = Path(params["out"])
    removed = "was not written (the partial output was removed)"
    return (f"interrupted: {finished_outputs.state(out / 'transferred', removed)}; "
            f"{finished_outputs.state(out / 'finetuned', removed)}")


@click.command("transfer")
@click.argument("new_base", type=_path)
@click.argument("ft", type=_path)
@click.argument("old_base", type=_path)
@click.argument("out", type=_path)
@click.option("--weight", type=float, default=1.0, show_default=True, help="Scale of FT - OLD_BASE.")
@click.option("--memory-budget", default="1GB", show_default=True, help="Merge memory cap.")
@click.option("--overwrite", is_flag=True, help="Replace OUT (or its subfolders) if present.")
@click.option(
    "--then-finetune",
    is_flag=True,
    help="Fine-tune from the transferred model: OUT/transferred, then OUT/finetuned.",
)
@click.option("--data", type=_path, default=None, help="Training JSONL (with --then-finetune).")
@click.option("--task", type=click.Choice(["classification", "causal-lm"]), default=None)
@schedule_options
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--freeze", multiple=True, metavar="PATTERN", help="Freeze matching parameters.")
@click.option("--train-only", multiple=True, metavar="PATTERN", help="Train only matching parameters.")
@click.option("--num-labels", type=int, default=None, help="Size of a new classification head.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly(on_interrupt=_interrupted)
def transfer_cmd(
    new_base: str,
    ft: str,
    old_base: str,
    out: str,
    weight: float,
    memory_budget: str,
    overwrite: bool,
    then_finetune: bool,
    data: str | None,
    task: str | None,
    **finetune_options: Any,
) -> None:
    """Transfer FT's update from OLD_BASE to NEW_BASE: OUT = NEW_BASE + W (FT - OLD_BASE).

    With --then-finetune, OUT/transferred holds the transfer and OUT/finetuned the model
    fine-tuned on --data starting from it.
    """
    if then_finetune and (data is None or task is None):
        raise click.UsageError("--then-finetune needs --data and --task")
    if not then_finetune and data is not None:
        raise click.UsageError("--data is for --then-finetune; add the flag or drop --data")
    target = Path(out) / "transferred" if then_finetune else Path(out)
    if then_finetune:  # the fine-tune's OUT is refused now, not after the transfer is written
        from weightsmith.finetune.trainer import check_out_dir

        check_out_dir(Path(out) / "finetuned", Path(new_base), overwrite)
    transfer_model(
        new_base, ft, old_base, target, weight=weight, memory_budget=memory_budget,
        overwrite=overwrite,
    )
    click.echo(f"wrote {target}: {new_base} + {weight:g} * ({ft} - {old_base})")
    if not then_finetune:
        return
    from weightsmith.finetune.trainer import finetune

    assert data is not None and task is not None
    finetune_options["freeze"] = tuple(finetune_options["freeze"])
    finetune_options["train_only"] = tuple(finetune_options["train_only"])
    grown = _vocab_rows(str(target)) != _vocab_rows(new_base)
    # init_from loads the transferred weights into NEW_BASE's architecture; when FT added
    # tokens the shapes differ, so training starts from the transferred folder itself.
    start = (target, {}) if grown else (Path(new_base), {"init_from": str(target)})
    result = finetune(
        start[0], Path(out) / "finetuned", data, task, overwrite=overwrite, **start[1],
        **finetune_options,
    )
    click.echo(
        f"wrote {result.out_dir}: {result.steps} steps from the transferred model, final loss "
        f"{result.final_loss:.4f}, {result.wall_time_s:.1f} s"
    )


COMMANDS = [transfer_cmd]
