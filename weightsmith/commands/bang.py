"""``weightsmith bang``: BANG = a calibrated fine-tune, then WiSE-FT with the base.

Lin et al., "Spurious Feature Diversification Improves Out-of-distribution Generalization",
ICLR 2024 (arXiv 2309.17230). The fine-tuned model is over-confident out of distribution, so
in a WiSE-FT average it dominates the zero-shot model; fine-tuning with label smoothing and/or
MixUp makes it less confident and the average balanced. This command runs that fine-tune with
the engine (``finetune``) and averages it with the base through the normal merge path
(``merge_method: wise_ft``; ``bang`` when ``--temperature`` also scales the head down).
The paper's exact epsilon / MixUp alpha were not retrieved (algorithms.md §12 item 3); the
defaults here (label smoothing 0.1, no MixUp) are the common choices, not the paper's.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from weightsmith import finished_outputs
from weightsmith.cli_errors import friendly
from weightsmith.errors import OutputError, RecipeError
from weightsmith.finetune.cli import schedule_options
from weightsmith.finetune.data import TASKS


@dataclass(frozen=True)
class BangResult:
    out: Path
    finetuned: Path | None  # None when the fine-tune lived in a temporary folder
    steps: int
    final_loss: float
    recipe: dict[str, Any]


def bang_recipe(
    base: str | Path, finetuned: str | Path, alpha: float, temperature: float = 1.0
) -> dict[str, Any]:
    """The merge recipe: plain ``wise_ft``, or ``bang`` when the head is also scaled down."""
    params: dict[str, Any] = {"alpha": alpha}
    method = "wise_ft"
    if temperature != 1:
        method = "bang"
        params["temperature"] = temperature
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(finetuned)}],
        "parameters": params,
    }


def run_bang(
    base: str | Path,
    out: str | Path,
    data: str | Path,
    task: str,
    *,
    label_smoothing: float = 0.1,
    mixup: float = 0.0,
    alpha: float = 0.5,
    temperature: float = 1.0,
    finetuned: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    **finetune_options: Any,
) -> BangResult:
    """Fine-tune ``base`` on ``data`` with label smoothing / MixUp, then merge it with ``base``.

    ``finetuned``: keep the fine-tune in this folder (default: a temporary folder, removed).
    ``finetune_options``: any other ``finetune`` option (steps, lr, seed, freeze, ...).
    """
    from weightsmith.finetune.modeling import check_model_dir, has_classification_head, model_config
    from weightsmith.finetune.trainer import finetune
    from weightsmith.pipeline import merge

    if label_smoothing == 0 and mixup == 0:
        raise RecipeError(
            "bang: with neither --label-smoothing nor --mixup the fine-tune is not calibrated and "
            "this is plain WiSE-FT; use `weightsmith finetune` and merge_method: wise_ft for that"
        )
    base_dir = check_model_dir(base, "base model")
    if task == "classification" and not has_classification_head(model_config(base_dir)):
        raise RecipeError(
            f"{base_dir}: has no classification head; BANG averages the base with the fine-tune "
            "head included, so the base needs its zero-shot head (fit a linear probe first: "
            "weightsmith finetune BASE PROBE --train-only classifier ...)"
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists; pass --overwrite to replace it")  # before training, not after
    with tempfile.TemporaryDirectory(prefix="weightsmith-bang-") as scratch:
        ft_dir = Path(finetuned) if finetuned is not None else Path(scratch) / "finetuned"
        trained = finetune(
            base_dir,
            ft_dir,
            data,
            task,
            label_smoothing=label_smoothing,
            mixup=mixup,
            quiet=quiet,
            overwrite=overwrite,
            **finetune_options,
        )
        recipe = bang_recipe(base_dir, ft_dir, alpha, temperature)
        result = merge(recipe, out, overwrite=overwrite, progress=not quiet)
    return BangResult(
        result.out,
        ft_dir if finetuned is not None else None,
        trained.steps,
        trained.final_loss,
        recipe,
    )


_path = click.Path(path_type=str)


def _interrupted(params: dict[str, Any]) -> str:
    # OUT and --finetuned are each written whole or not at all (the fine-tune first), so a
    # kept --finetuned is a finished fine-tune; the default temporary one is always removed.
    kept = params.get("finetuned")
    tail = f"; {finished_outputs.state(kept, 'was not written')}" if kept else ""
    out = finished_outputs.state(params["out"], "was not written (the partial output was removed)")
    return f"interrupted: {out}{tail}"


@click.command("bang")
@click.argument("base", type=_path)
@click.argument("out", type=_path)
@click.option("--data", required=True, type=_path, help="Training JSONL file.")
@click.option("--task", required=True, type=click.Choice(TASKS))
@click.option("--label-smoothing", type=float, default=0.1, show_default=True, metavar="EPS")
@click.option("--mixup", type=float, default=0.0, show_default=True, metavar="ALPHA",
              help="MixUp on input embeddings with Beta(ALPHA, ALPHA); classification only.")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="0 = base, 1 = fine-tune.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Also divide the fine-tune's head by this before averaging (merge_method: bang).")
@click.option("--finetuned", type=_path, default=None, metavar="DIR",
              help="Keep the calibrated fine-tune here (default: a temporary folder).")
@schedule_options
@click.option("--freeze", multiple=True, metavar="PATTERN", help="Freeze matching parameters.")
@click.option("--train-only", multiple=True, metavar="PATTERN", help="Train only matching parameters.")
@click.option("--overwrite", is_flag=True, help="Replace OUT (and --finetuned) if they exist.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@friendly(on_interrupt=_interrupted)
def bang_cmd(base: str, out: str, data: str, task: str, **options: Any) -> None:
    """BANG: fine-tune BASE on --data with label smoothing / MixUp, average with BASE into OUT."""
    options["freeze"] = tuple(options["freeze"])
    options["train_only"] = tuple(options["train_only"])
    result = run_bang(base, out, data, task, **options)
    kept = f"; fine-tune kept in {result.finetuned}" if result.finetuned else ""
    click.echo(
        f"wrote {result.out}: {result.recipe['merge_method']} alpha {options['alpha']} of a fine-tune "
        f"with label smoothing {options['label_smoothing']}, MixUp {options['mixup']} "
        f"({result.steps} steps, final loss {result.final_loss:.4f}){kept}"
    )


COMMANDS = [bang_cmd]
