"""Click commands ``finetune``, ``eval`` and ``testbed``; the main group registers them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from weightsmith.cli_errors import WRITES_NOTHING, friendly
from weightsmith.finetune.data import TASKS

_path = click.Path(path_type=str)


def schedule_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The training-schedule options every command that fine-tunes shares (same names and
    defaults as FinetuneOptions), so finetune, bang and transfer cannot drift apart."""
    for option in reversed(
        [
            click.option("--epochs", type=float, default=3.0, show_default=True),
            click.option("--steps", type=int, default=None, help="Optimizer steps (overrides --epochs)."),
            click.option("--lr", type=float, default=5e-5, show_default=True),
            click.option("--warmup-steps", type=int, default=0, show_default=True),
            click.option("--batch-size", type=int, default=16, show_default=True),
            click.option("--weight-decay", type=float, default=0.0, show_default=True),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--max-length", type=int, default=128, show_default=True),
            click.option("--truncate", is_flag=True, help="Cut examples longer than --max-length."),
        ]
    ):
        fn = option(fn)
    return fn
_task = click.Choice(TASKS)


@click.command("finetune")
@click.argument("base", type=_path)
@click.argument("out", type=_path)
@click.option("--data", required=True, type=_path, help="Training JSONL file.")
@click.option("--task", required=True, type=_task)
@schedule_options
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--label-smoothing", "label_smoothing", type=float, default=0.0, metavar="EPS")
@click.option(
    "--mixup",
    type=float,
    default=0.0,
    metavar="ALPHA",
    help="MixUp on input embeddings with Beta(ALPHA, ALPHA); classification only.",
)
@click.option(
    "--freeze",
    multiple=True,
    metavar="PATTERN",
    help="Freeze parameters whose name matches (regex search / substring).",
)
@click.option(
    "--train-only",
    multiple=True,
    metavar="PATTERN",
    help="Train only parameters whose name matches.",
)
@click.option(
    "--mask",
    type=_path,
    default=None,
    metavar="MASK.safetensors",
    help="Sparse fine-tuning: only nonzero mask entries change; absent tensors freeze.",
)
@click.option("--half-freeze", is_flag=True, help="HFT: freeze a seeded half of each block.")
@click.option(
    "--init-from",
    type=_path,
    default=None,
    metavar="DIR",
    help="Start from these weights (same architecture), e.g. a merge.",
)
@click.option("--num-labels", type=int, default=None, help="Size of a new classification head.")
@click.option("--threads", type=int, default=None,
              help="Torch CPU threads while training (fix it for bitwise reproducibility).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly
def finetune_cmd(base: str, out: str, data: str, task: str, **options: Any) -> None:
    """Fine-tune the transformers checkpoint BASE on --data and write it to OUT."""
    from weightsmith.finetune.trainer import finetune

    options["freeze"] = tuple(options["freeze"])
    options["train_only"] = tuple(options["train_only"])
    result = finetune(base, out, data, task, **options)
    click.echo(
        f"wrote {result.out_dir}: {result.steps} steps, final loss {result.final_loss:.4f}, "
        f"{result.trainable_params:,} trainable parameters, {result.wall_time_s:.1f} s"
    )


def format_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key} {value}" if isinstance(value, int) else f"{key} {value:.4f}")
    return "  ".join(parts)


@click.command("eval")
@click.argument("model", type=_path)
@click.option("--data", required=True, type=_path, help="Evaluation JSONL file.")
@click.option("--task", required=True, type=_task)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True)
@click.option("--truncate", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print metrics as JSON.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@friendly(on_interrupt=WRITES_NOTHING)
def eval_cmd(
    model: str,
    data: str,
    task: str,
    batch_size: int,
    max_length: int,
    truncate: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Evaluate the fine-tuned folder MODEL on --data."""
    from weightsmith.finetune.evaluation import evaluate

    metrics = evaluate(
        model, data, task, batch_size=batch_size, max_length=max_length, truncate=truncate,
        show_progress=not quiet,
    )
    click.echo(json.dumps(metrics, indent=2) if as_json else format_metrics(metrics))


def _testbed_interrupted(params: dict[str, Any]) -> str:
    # A build writes testbed.json last (and removes an old one first), so the next run sees
    # an unfinished folder and builds it again; the finished parts are not kept apart.
    return (f"interrupted: {params['out']} holds an unfinished build (no testbed.json); run the "
            "command again to build it")


@click.command("testbed")
@click.argument("name", type=click.Choice(["minilm", "tinylm"]))
@click.argument("out", type=_path)
@click.option("--force", is_flag=True, help="Rebuild even if OUT holds an identical build.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@friendly(on_interrupt=_testbed_interrupted)
def testbed_cmd(name: str, out: str, force: bool, quiet: bool) -> None:
    """Build the reproducible model family NAME into OUT (cached by recipe hash)."""
    from weightsmith.testbeds import build

    info = build(name, out, force=force, quiet=quiet)
    click.echo(f"testbed {name} in {out} ({'cached' if info.get('cached') else 'built'}):")
    for task, result in info["tasks"].items():
        click.echo(
            f"  {task:<12} base {result['base']:.3f}  fine-tuned {result['finetuned']:.3f}  "
            f"({result['metric']})"
        )
