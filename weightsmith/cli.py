"""The thin command-line front: parse options, call the library, print errors as one message."""

from __future__ import annotations

import json
from typing import Any

import click

from weightsmith import finished_outputs
from weightsmith.cli_errors import WRITES_NOTHING
from weightsmith.cli_errors import friendly as _friendly
from weightsmith.cli_options import common_plan_options, device_options, executor_option
from weightsmith.units import format_size
from weightsmith.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weightsmith")
def main() -> None:
    """weightsmith: merge fine-tuned checkpoints of one base model, streamed tensor by tensor."""


def _merge_interrupted(params: dict[str, Any]) -> str:
    """What an interrupted merge keeps: a multi-stage recipe's finished stages stay in the stage
    cache (the next run reuses them); with --push-to, OUT if the merge had finished."""
    from weightsmith.stages import cache_folder, is_multi_stage

    out, repo = params["out"], params.get("push_to")
    if repo:
        if finished_outputs.is_finished(out):
            return (f"interrupted: nothing was pushed to {repo}; {out} is complete (push it with: "
                    f"weightsmith push {out} {repo})")
        return f"interrupted: nothing was pushed to {repo}; {out} was not written"
    removed = "was not written (the partial output was removed)"
    message = f"interrupted: {finished_outputs.state(out, removed)}"
    if is_multi_stage(params["recipe"]) and not finished_outputs.is_finished(out):
        cache = cache_folder(out, params.get("stage_cache"))
        message += f"; the stages that had finished stay in {cache} and the next run reuses them"
    return message


@main.command("merge")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@device_options
@click.option("--out-shard-size", default="5GB", show_default=True, help="max bytes per shard")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists (a symlinked OUT: its target)")
@click.option(
    "--resume",
    is_flag=True,
    help="continue a merge of the same recipe and inputs into OUT that was killed before it finished",
)
@click.option(
    "--threads", type=int, default=None, help="compute threads (torch and fused kernels); default: per core"
)
@click.option("--no-fsync", is_flag=True, help="skip fsync before the final rename (faster, less safe)")
@click.option(
    "--hash-inputs",
    is_flag=True,
    help="record the sha256 of every local input shard (reads each in full; default: a sampled fingerprint)",
)
@click.option("--quiet", "-q", is_flag=True, help="no progress bar or summary")
@click.option("--push-to", metavar="REPO_ID", default=None, help="after the merge, push OUT to this Hub repo")
@click.option("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
@executor_option
@click.option("--out-format", type=click.Choice(["full", "lora"]), default=None,
              help="lora: write a PEFT adapter of base_model (default: the recipe's out_format, else full)")
@click.option("--out-rank", type=int, default=None, help="out-format lora, SVD path: rank of every module")
@click.option("--out-energy", type=float, default=None,
              help="out-format lora, SVD path: per module, the rank keeping this fraction of sum(s^2)")
@common_plan_options
@_friendly(on_interrupt=_merge_interrupted)
def merge_cmd(
    recipe: str,
    out: str,
    device: str,
    kernels: str,
    device_memory_budget: str | None,
    out_shard_size: str,
    overwrite: bool,
    resume: bool,
    threads: int | None,
    no_fsync: bool,
    hash_inputs: bool,
    quiet: bool,
    push_to: str | None,
    ray_address: str | None,
    executor: str,
    ray_no_shared_fs: bool,
    out_format: str | None,
    out_rank: int | None,
    out_energy: float | None,
    memory_budget: str,
    random_seed: int | None,
    allow_pickle: bool,
    numerics: str | None,
    strict: bool,
    stage: str | None,
    stage_cache: str | None,
) -> None:
    """Merge the models named in RECIPE (YAML, mergekit format) into the new folder OUT.

    A multi-stage RECIPE (mergekit-multi: `---`-separated documents with `name:`) runs its
    stages in order, keeping intermediates in --stage-cache and reusing unchanged ones."""
    from weightsmith.lora_output import LoraMergeResult
    from weightsmith.stages import merge

    if push_to:
        from weightsmith.io.hub_push import check_can_push

        check_can_push(push_to)  # before the merge, not after an hour of it
    result = merge(
        recipe,
        out,
        memory_budget=memory_budget,
        out_shard_size=out_shard_size,
        overwrite=overwrite,
        random_seed=random_seed,
        device=device,
        threads=threads,
        allow_pickle=allow_pickle,
        progress=not quiet,
        fsync=not no_fsync,
        resume=resume,
        hash_inputs=hash_inputs,
        numerics=numerics,
        strict=strict,
        stage=stage,
        stage_cache=stage_cache,
        log=(lambda line: None) if quiet else None,
        kernels=kernels,
        device_memory_budget=device_memory_budget,
        executor=executor,
        ray_address=ray_address,
        **({"ray_shared_fs": False} if ray_no_shared_fs else {}),
        **({"out_format": out_format} if out_format else {}),
        **({"out_rank": out_rank} if out_rank is not None else {}),
        **({"out_energy": out_energy} if out_energy is not None else {}),
    )
    if isinstance(result, LoraMergeResult):
        if not quiet:
            click.echo(result.summary())
    elif not quiet:
        s = result.stats
        rate = (s.bytes_read + s.bytes_written) / max(result.seconds, 1e-9)
        click.echo(
            f"merged {len(result.plan.tasks)} tensors with {result.plan.method.name} into "
            f"{result.out} in {result.seconds:.2f}s (read {format_size(s.bytes_read)}, wrote "
            f"{format_size(s.bytes_written)}, {format_size(rate)}/s)"
        )
        if s.reused_blocks:
            click.echo(
                f"  resumed: kept {s.reused_blocks} verified blocks ({format_size(s.reused_bytes)}) "
                "of the interrupted run"
            )
        if s.global_passes:
            click.echo(f"  {s.global_passes} statistics passes before the output pass")
        if s.device_slots:
            click.echo(
                f"  device: {s.device_slots} slots, peak {format_size(s.device_peak_bytes)} of "
                f"{format_size(s.device_budget)}; {s.packed_units} small tensors in {s.packs} packed launches"
            )
        for line in (s.summary or {}).get("lines", []):
            click.echo(line)
    if push_to:
        push_cmd.callback(
            out=str(result.out), repo_id=push_to, private=False, revision=None, create_pr=False, message=None
        )


@main.command("push")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="create the repo private; refuse an existing public one")
@click.option("--revision", metavar="BRANCH", default=None, help="branch to commit to (created from main)")
@click.option("--create-pr", is_flag=True, help="open a pull request instead of committing to the branch")
@click.option("--message", default=None, help="commit message")
@_friendly(on_interrupt=lambda p: f"interrupted: nothing was committed to {p['repo_id']} (a push is "
           "one commit); run the command again, uploaded files are not sent twice")
def push_cmd(
    out: str, repo_id: str, private: bool, revision: str | None, create_pr: bool, message: str | None
) -> None:
    """Upload the finished output folder OUT to the Hub repo REPO_ID in one commit.

    Logs in through huggingface_hub (HF_TOKEN or `hf auth login`). A weightsmith README.md is
    re-rendered first, so an OUT/eval_results.json shows on the card.
    """
    from weightsmith.io.hub_push import push_to_hub

    result = push_to_hub(
        out,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=message,
        log=lambda line: click.echo(line, err=True),
    )
    click.echo(
        f"pushed {len(result.files)} files ({format_size(result.bytes)}) to {result.repo_id}: "
        f"{result.pr_url or result.commit_url}"
    )


@main.command("plan")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (every tensor, every digit)")
@click.option("--verbose", "-v", is_flag=True, help="one line per tensor, not one per parameter setting")
@click.option(
    "--out-shard-size", default="5GB", show_default=True, help="max bytes per output shard"
)
@executor_option
@device_options
@common_plan_options
@_friendly(on_interrupt=WRITES_NOTHING)
def plan_cmd(
    recipe: str,
    as_json: bool,
    verbose: bool,
    out_shard_size: str,
    executor: str,
    ray_no_shared_fs: bool,
    device: str,
    kernels: str,
    device_memory_budget: str | None,
    memory_budget: str,
    random_seed: int | None,
    allow_pickle: bool,
    numerics: str | None,
    strict: bool,
    stage: str | None,
    stage_cache: str | None,
) -> None:
    """Dry run: what each tensor gets (grouped by parameter setting), bytes and peak memory.

    A multi-stage RECIPE: its stages in order (cached or to run), then the plan of the final
    stage once its inputs exist."""
    if ray_no_shared_fs and executor != "ray":
        raise click.UsageError("--ray-no-shared-fs applies to --executor ray only; add --executor ray")
    from weightsmith.devices import device_choice, device_summary
    from weightsmith.pipeline import plan_merge
    from weightsmith.plan_report import (
        device_line,
        grouped_lines,
        plan_json,
        plan_stages_report,
        summary_lines,
        tensor_lines,
    )
    from weightsmith.sliced_report import sliced_json, sliced_lines
    from weightsmith.stages import is_multi_stage
    from weightsmith.units import parse_size

    options = {
        "memory_budget": memory_budget,
        "random_seed": random_seed,
        "allow_pickle": allow_pickle,
        "numerics": numerics,
    }
    stages: list[dict[str, Any]] = []
    if is_multi_stage(recipe):
        keyed = {**options, "out_shard_size": out_shard_size, "device": device, "kernels": kernels}
        plan = plan_stages_report(recipe, stage, stage_cache, strict, keyed, stages, echo=not as_json)
        if plan is None:
            if as_json:
                click.echo(json.dumps({"stages": stages}, indent=2, default=str))
            return
    else:
        plan = plan_merge(recipe, strict=strict, **options)
    report = plan_json(plan)
    report["summary"].update(sliced_json(plan, parse_size(out_shard_size)))
    on_device = device_summary(plan, device_choice(device, kernels, device_memory_budget))
    if on_device["device"] != "cpu":
        report["summary"]["device"] = on_device
    shards = []
    if executor == "ray":
        from weightsmith.engine.partition import partition, partition_rows

        shards = partition(plan, parse_size(out_shard_size))
        report["summary"]["ray_partition"] = partition_rows(shards, streamed=ray_no_shared_fs)
        report["summary"]["ray_shared_fs"] = not ray_no_shared_fs
    if as_json:
        extra = {"stages": stages} if stages else {}
        click.echo(json.dumps({**extra, **report}, indent=2, default=str))
        return
    for line in tensor_lines(plan) if verbose else grouped_lines(plan):
        click.echo(line)
    click.echo("")
    for line in summary_lines(plan):
        click.echo(line)
    for line in sliced_lines(plan, None if shards else parse_size(out_shard_size), per_layer=verbose):
        click.echo(line)
    if on_device["device"] != "cpu":
        click.echo(device_line(on_device))
    if shards:
        from weightsmith.engine.partition import describe_partition

        for line in describe_partition(shards, streamed=ray_no_shared_fs):
            click.echo(line)
    if plan.oversize:
        click.echo(
            f"over budget:     {len(plan.oversize)} tensor(s) cannot be split by "
            f"{plan.method.name} and exceed the budget: {', '.join(plan.oversize[:5])}"
        )
        from weightsmith.engine.tasks import budget_that_fits, over_budget
        from weightsmith.output_checks import budget_option

        if over_budget(plan):
            click.echo(
                "                 merge will refuse: the peak passes the budget; it runs with "
                f"--memory-budget {budget_option(budget_that_fits(plan))} or more"
            )


def _register_optional_commands() -> None:
    # Commands that wrap the training engine (finetune/) or the papers' workflows live in their
    # own modules; each module of weightsmith.commands lists its click commands in COMMANDS.
    import importlib
    import pkgutil

    from weightsmith.finetune.cli import eval_cmd, finetune_cmd, testbed_cmd

    for cmd in (finetune_cmd, eval_cmd, testbed_cmd):
        main.add_command(cmd)
    import weightsmith.commands as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"weightsmith.commands.{info.name}")
        for cmd in getattr(module, "COMMANDS", ()):
            main.add_command(cmd)


_register_optional_commands()

if __name__ == "__main__":
    main()
