"""``weightsmith search RECIPE --space SPACE.yaml --eval DATA.jsonl --task T --trials N``
(or ``--head NAME MODEL_DIR DATA.jsonl`` once per task instead of ``--eval``: a multi-task score).

Tunes the recipe's numbers (weightsmith/search/) with candidates merged in memory, writes the
best recipe, the trial table and a plot into ``--workdir``, and merges the best recipe to disk
normally when ``--out`` is given. docs/search.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from weightsmith.cli_errors import friendly
from weightsmith.errors import OutputError, RecipeError

_path = click.Path(path_type=str)


def load_recipe_dict(path: str) -> dict[str, Any]:
    try:
        docs = list(yaml.safe_load_all(Path(path).read_text()))
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e}") from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise RecipeError(f"{path}: a search tunes one single-stage recipe (one YAML mapping)")
    return docs[0]


@click.command("search")
@click.argument("recipe", type=_path)
@click.option("--space", "space_path", required=True, type=_path, help="SPACE.yaml: recipe paths -> bounds.")
@click.option("--eval", "data", type=_path, default=None,
              help="Held-out JSONL the score is taken on (required unless --head is given).")
@click.option("--head", "head_options", nargs=3, multiple=True, type=(str, _path, _path),
              metavar="NAME MODEL_DIR DATA",
              help="Repeatable, instead of --eval/--model-dir: a task scored with its own model "
              "folder (its head on the merged backbone) on its own JSONL; the score is the mean "
              "of --metric over the tasks.")
@click.option("--task", required=True, type=click.Choice(["classification", "causal-lm"]))
@click.option("--trials", required=True, type=int, help="Trials in all (trial 0 is the recipe as given).")
@click.option("--workdir", required=True, type=_path, help="Trial log, best recipe, table and plot.")
@click.option("--out", type=_path, default=None, help="Merge the best recipe into this folder.")
@click.option("--metric", default=None, help="accuracy | loss | ece, or exact_match | loss.")
@click.option("--control", type=_path, default=None, help="Control-task JSONL (multi-objective).")
@click.option("--control-weight", type=float, default=0.5, show_default=True,
              help="w in score = (1-w)*target + w*control, with --control.")
@click.option("--model-dir", type=_path, default=None, help="Model folder the candidates load into "
              "(default: the first input model).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sigma", type=float, default=0.3, show_default=True, help="CMA-ES step, in the unit cube.")
@click.option("--popsize", type=int, default=None, help="CMA-ES population (default: cma's).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True)
@click.option("--truncate", is_flag=True)
@click.option("--memory-budget", default="2GB", show_default=True)
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Score candidates one after another here, or in parallel on Ray actors "
              "(pip install 'weightsmith[ray]').")
@click.option("--ray-address", default=None,
              help="With --executor ray: the cluster (default: start a local one).")
@click.option("--ray-workers", type=int, default=None,
              help="With --executor ray: actors, each holding its own model (default: the "
              "cluster's CPUs, at most one generation).")
@click.option("--resume", is_flag=True, help="Continue the search logged in --workdir.")
@click.option("--overwrite", is_flag=True, help="Start afresh over a logged search; replace --out.")
@click.option("--quiet", is_flag=True)
@friendly(on_interrupt=lambda p: (
    f"interrupted: the trials finished so far stay logged in {p['workdir']} (continue with "
    "--resume)" + (f"; {p['out']} was not written" if p.get("out") else "")))
def search_cmd(
    recipe: str, space_path: str, data: str | None, head_options: tuple[tuple[str, str, str], ...],
    task: str, trials: int, workdir: str, out: str | None,
    metric: str | None, control: str | None, control_weight: float, model_dir: str | None, seed: int,
    sigma: float, popsize: int | None, batch_size: int, max_length: int, truncate: bool,
    memory_budget: str, executor: str, ray_address: str | None, ray_workers: int | None, resume: bool,
    overwrite: bool, quiet: bool,
) -> None:
    """Tune RECIPE's numeric parameters for a score on --eval (or over several --head tasks),
    merging candidates in memory."""
    from weightsmith import pipeline
    from weightsmith.progress import progress
    from weightsmith.search.fingerprint import check_resumable, search_fingerprint
    from weightsmith.search.optimizer import default_popsize, search
    from weightsmith.search.population import open_pool
    from weightsmith.search.report import write_outputs
    from weightsmith.search.space import Space
    from weightsmith.search.workdir import check_workdir, search_inputs

    heads = _heads(head_options, data, model_dir, control)
    base = load_recipe_dict(recipe)
    space = Space.load(space_path)
    files = {"recipe file": recipe, "search space": space_path, "eval data": data,
             "control data": control}
    folders: dict[str, str | None] = {"--model-dir": model_dir}
    for h in heads:
        files[f"--head {h.name} data"] = str(h.data)
        folders[f"--head {h.name} model"] = str(h.model_dir)
    plan = pipeline.plan_merge(base, memory_budget=memory_budget)
    check_workdir(workdir, search_inputs(plan, files, folders))
    if executor != "ray" and (ray_address or ray_workers):
        raise RecipeError("--ray-address/--ray-workers need --executor ray")
    folder = Path(workdir)
    log = folder / "trials.jsonl"
    if log.exists() and not (resume or overwrite):
        raise OutputError(f"{log}: a search is logged there; pass --resume to continue it or "
                          "--overwrite to start afresh")
    if log.exists() and overwrite and not resume:
        log.unlink()
    scoring = dict(task=task, metric=metric, batch_size=batch_size, max_length=max_length,
                   truncate=truncate)
    check_resumable(folder, search_fingerprint(
        base, plan, {k: v for k, v in files.items() if k != "recipe file"}, folders,
        {**scoring, "heads": [h.name for h in heads],
         "control_weight": control_weight if control else None},
    ), resuming=resume and log.exists())
    args: dict[str, Any] = dict(recipe=base, memory_budget=memory_budget, random_seed=seed, **scoring)
    if heads:  # HeadsObjective (objective_args.build_objective), here or in each Ray actor
        args["heads"] = heads
    else:
        args.update(data=data, control=control, control_weight=control_weight, model_dir=model_dir)
    with open_pool(executor, args, ray_address, ray_workers, popsize or default_popsize(space)) as pool:
        bar = progress(trials, "search", "trial", enabled=not quiet)
        try:
            result = search(space, base, pool, trials=trials, log_path=log,
                            higher_is_better=pool.higher_is_better, seed=seed, sigma=sigma,
                            popsize=popsize, bar=bar)
        finally:
            bar.close()
    best = space.apply(base, result.best_trial.unit)
    write_outputs(result, best, folder)
    click.echo(f"best: trial {result.best} of {len(result.trials)}, score "
               f"{result.best_trial.score:.6g} (recipe as given: {result.trials[0].score:.6g}); "
               f"{folder / 'best_recipe.yaml'}")
    if out:  # the pool's models are gone (closed above) before this merge
        pipeline.merge(best, out, memory_budget=memory_budget, overwrite=overwrite,
                       random_seed=seed, progress=not quiet)
        click.echo(f"wrote {out}")


def _heads(given: tuple[tuple[str, str, str], ...], data: str | None, model_dir: str | None,
           control: str | None) -> list[Any]:
    """The ``--head`` tasks (none: the single ``--eval`` score), refusing options they replace."""
    from weightsmith.search.heads import heads_from_options

    if not given:
        if data is None:
            raise RecipeError("give --eval DATA.jsonl (the data the score is taken on), or one "
                              "--head NAME MODEL_DIR DATA.jsonl per task")
        return []
    mixed = [name for name, value in (("--eval", data), ("--model-dir", model_dir)) if value is not None]
    if mixed:
        raise RecipeError(f"--head with {' and '.join(mixed)}: each --head names its own model "
                          f"folder and data; drop {' and '.join(mixed)} or the --head options")
    if control is not None:
        raise RecipeError("--control with --head: a multi-task search has no control task (its "
                          "score is the mean over the heads); drop --control, or add that task "
                          "as one more --head")
    return heads_from_options(given)


COMMANDS = [search_cmd]
