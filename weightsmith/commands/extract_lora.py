"""``weightsmith extract-lora FINE_TUNE BASE OUT``: the click command; the extraction itself is
weightsmith/lora_extraction.py, loaded (with torch) only when the command runs, so
``weightsmith --help`` stays fast."""

from __future__ import annotations

import click

from weightsmith.cli_errors import friendly
from weightsmith.defaults import DEFAULT_MEMORY_BUDGET
from weightsmith.dtype_names import FACTOR_DTYPES

REPORT = "extract_report.json"  # as lora_extraction.REPORT (tests/test_cli_startup.py checks)


@click.command("extract-lora")
@click.argument("fine_tune")
@click.argument("base")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--rank", type=int, default=None, help="LoRA rank of every module (capped by its size).")
@click.option("--energy", type=float, default=None,
              help="Per module, the smallest rank keeping this fraction of sum(s^2), e.g. 0.99.")
@click.option("--include", multiple=True, metavar="REGEX", help="Only tensors matching (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip tensors matching (repeatable).")
@click.option("--save-module", "save_modules", multiple=True, metavar="REGEX",
              help="Keep matching modules whole (modules_to_save) instead of factoring them.")
@click.option("--save-above-error", type=float, default=None, metavar="E",
              help="Keep a module whole (modules_to_save) when its LoRA's relative error exceeds E.")
@click.option("--embed-lora", is_flag=True, help="Factor input embeddings too (lora_embedding_A/B).")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="auto: randomized for --rank far below the matrix size, exact otherwise.")
@click.option("--dtype", type=click.Choice(FACTOR_DTYPES), default="float32", show_default=True,
              help="dtype of the written factors")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Also read PyTorch .bin pickles (weights_only=True).")
@click.option("--quiet", "-q", is_flag=True, help="No per-module table.")
@click.option("--memory-budget", default=DEFAULT_MEMORY_BUDGET, show_default=True,
              help="cap on one tensor's memory, SVD scratch included; a tensor over it is refused up front")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the per-tensor memory plan (SVD scratch included) and write nothing.")
@click.option("--device", default="cpu", show_default=True,
              help="where the SVDs run: cpu, cuda[:N], or auto (CUDA when present); cpu-staged: the CPU fake")
@click.option("--device-memory-budget", default=None, metavar="SIZE",
              help="device memory one SVD may use; default: 4/5 of the free device memory")
@friendly
def extract_lora_cmd(
    fine_tune: str,
    base: str,
    out: str,
    rank: int | None,
    energy: float | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    save_modules: tuple[str, ...],
    save_above_error: float | None,
    embed_lora: bool,
    svd: str,
    dtype: str,
    overwrite: bool,
    allow_pickle: bool,
    quiet: bool,
    memory_budget: str,
    plan_only: bool,
    device: str,
    device_memory_budget: str | None,
) -> None:
    """Write a PEFT LoRA adapter approximating FINE_TUNE - BASE to the new folder OUT.

    Each tensor's peak (SVD scratch included) must fit --memory-budget; --plan shows them."""
    from weightsmith.lora_extraction import extract_lora, plan_extract_lora  # torch: only now

    options = {"memory_budget": memory_budget, "device": device, "device_memory_budget": device_memory_budget}
    if plan_only:
        plan = plan_extract_lora(
            fine_tune, base, rank=rank, energy=energy, include=include, exclude=exclude,
            save_modules=save_modules, embed_lora=embed_lora, svd=svd, allow_pickle=allow_pickle,
            memory_budget=memory_budget,
        )
        for line in plan.lines(top=10, title="extract-lora:"):
            click.echo(line)
        return
    header = [f"{'module':60s} {'kind':15s} {'shape':>12s} {'rank':>5s} {'rel.err':>8s}"]

    def row(line: str) -> None:  # the table's header with its first row (not before a refusal)
        while header:
            click.echo(header.pop())
        click.echo(line)
    result = extract_lora(
        fine_tune, base, out, rank=rank, energy=energy, include=include, exclude=exclude,
        save_modules=save_modules, save_above_error=save_above_error, embed_lora=embed_lora,
        svd=svd, dtype=dtype, **options,
        overwrite=overwrite, allow_pickle=allow_pickle, log=None if quiet else row,
    )
    lora = [m for m in result.modules if m.rank]
    worst = max(lora, key=lambda m: m.relative_error, default=None)
    uncaptured = [m.module for m in result.modules if m.kind == "not-captured"]
    patterned = len(result.config["rank_pattern"])
    click.echo(
        f"wrote {result.out}: {len(lora)} LoRA modules (r={result.config['r']}"
        f"{f', rank_pattern for {patterned}' if patterned else ''})"
        f", {len(result.config['modules_to_save'] or [])} saved whole, {result.adapter_bytes:,} bytes"
        + (f"; worst relative error {worst.relative_error:.4f} ({worst.module})" if worst else "")
    )
    if uncaptured:
        click.echo(
            f"warning: {len(uncaptured)} changed module(s) not in the adapter: {', '.join(uncaptured[:5])}"
            f"{' ...' if len(uncaptured) > 5 else ''} (see {REPORT})",
            err=True,
        )
    click.echo(f"per-module errors: {result.out / REPORT}")


COMMANDS = [extract_lora_cmd]
