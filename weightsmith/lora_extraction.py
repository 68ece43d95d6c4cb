"""``weightsmith extract-lora FINE_TUNE BASE OUT``: a PEFT LoRA adapter from two checkpoints.

Per module, ``FINE_TUNE - BASE`` is factored by a truncated SVD into LoRA factors (the best
rank-r approximation), written as ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained(base, OUT)`` loads. Streaming: one tensor pair is read, factored
and appended to disk at a time. The relative Frobenius error of every module is printed and
written to ``OUT/extract_report.json``.

Rank: ``--rank R`` (capped by each matrix's smaller side) or ``--energy F`` (per module, the
smallest rank keeping the fraction F of the squared singular values; the adapter's ``r`` is the
most common rank, others go to ``rank_pattern`` / ``alpha_pattern``). ``lora_alpha`` always
equals the rank, so peft's scale is 1 and ``B @ A`` is the difference itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from weightsmith.defaults import DEFAULT_MEMORY_BUDGET
from weightsmith.devices import device_choice
from weightsmith.dtype_names import FACTOR_DTYPES, canonical_name, parse_dtype
from weightsmith.errors import MergeError, RecipeError
from weightsmith.io.append_writer import AppendingSafetensorsWriter
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.lora_writer import adapter_config, factor_names
from weightsmith.io.output_dir import OutputDir
from weightsmith.io.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, is_conv1d
from weightsmith.lora_plan import (
    ExtractPlan,
    check_extraction_fits,
    group_modules,
    is_embedding,
    pick_method,
    plan_extraction,
    saved_whole,
    selected,
)
from weightsmith.ops.lowrank import factor_peak_bytes, relative_error, truncated_svd
from weightsmith.output_checks import check_clear_of_inputs, check_parent_writable, checkpoint_paths
from weightsmith.svd_runner import SvdRunner

REPORT = "extract_report.json"


@dataclass
class ModuleReport:
    module: str
    kind: str  # lora | embedding-lora | saved | unchanged | not-captured | excluded
    shape: list[int] = field(default_factory=list)
    rank: int = 0
    relative_error: float = 0.0
    note: str = ""


@dataclass
class ExtractResult:
    out: Path
    config: dict[str, Any]
    modules: list[ModuleReport]
    adapter_bytes: int


@dataclass(frozen=True)
class ExtractOptions:
    """What ``extract_lora`` takes besides the checkpoints and OUT (see its docstring)."""

    rank: int | None = None
    energy: float | None = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    save_modules: Sequence[str] = ()
    save_above_error: float | None = None
    embed_lora: bool = False
    svd: str = "auto"
    dtype: str = "float32"
    memory_budget: str | int | None = DEFAULT_MEMORY_BUDGET
    device: str = "cpu"
    device_memory_budget: str | int | None = None

    def check(self) -> None:
        rank, energy = self.rank, self.energy
        if (rank is None) == (energy is None):
            raise RecipeError("extract-lora: give exactly one of --rank R or --energy F")
        if rank is not None and rank < 1:
            raise RecipeError(f"extract-lora: --rank must be at least 1, got {rank}")
        if energy is not None and not 0.0 < energy <= 1.0:
            raise RecipeError(f"extract-lora: --energy is a fraction in (0, 1], got {energy}")
        if self.save_above_error is not None and not self.save_above_error >= 0:
            raise RecipeError(f"extract-lora: --save-above-error must be >= 0, got {self.save_above_error}")
        if self.svd not in ("auto", "exact", "randomized"):
            raise RecipeError(f"extract-lora: --svd is auto, exact or randomized, got {self.svd!r}")
        if self.svd == "randomized" and energy is not None:
            raise RecipeError("extract-lora: --energy needs every singular value; use --svd exact or auto")
        parse_dtype(self.dtype, "extract-lora: --dtype", FACTOR_DTYPES)  # refused before any work


def extract_lora(
    fine_tune: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    log: Any = None,
    **options: Any,
) -> ExtractResult:
    """Write the LoRA adapter approximating ``fine_tune - base`` to ``out``; see the module doc.

    ``options`` are ``ExtractOptions``' fields: ``rank`` or ``energy``, ``include``, ``exclude``,
    ``save_modules``, ``save_above_error``, ``embed_lora``, ``svd``, ``dtype``, ``memory_budget``
    (default 1.25GB; None: unlimited), ``device`` (cpu, cuda[:N], auto, cpu-staged) and
    ``device_memory_budget``. A tensor whose step (SVD scratch included) passes the memory
    budget is refused before anything is written."""
    opts = ExtractOptions(**options)
    opts.check()
    # `bf16` is written as bfloat16 in adapter_config.json
    opts = replace(opts, dtype=str(canonical_name(opts.dtype)))
    ft = Checkpoint.open(str(fine_tune), allow_pickle=allow_pickle)
    bs = Checkpoint.open(str(base), allow_pickle=allow_pickle)
    try:
        return _extract(ft, bs, str(base), Path(out), opts, overwrite, log)
    finally:
        ft.close()
        bs.close()


def plan_extract_lora(
    fine_tune: str | Path, base: str | Path, *, allow_pickle: bool = False, **options: Any
) -> ExtractPlan:
    """The memory plan ``extract_lora`` would check (``extract-lora --plan``), from headers alone."""
    opts = ExtractOptions(**options)
    opts.check()
    ft = Checkpoint.open(str(fine_tune), allow_pickle=allow_pickle)
    bs = Checkpoint.open(str(base), allow_pickle=allow_pickle)
    try:
        return _plan(ft, bs, opts)
    finally:
        ft.close()
        bs.close()


def _plan(ft: Checkpoint, bs: Checkpoint, opts: ExtractOptions) -> ExtractPlan:
    return plan_extraction(
        ft, bs, rank=opts.rank, energy=opts.energy, include=opts.include, exclude=opts.exclude,
        save_modules=opts.save_modules, embed_lora=opts.embed_lora, svd=opts.svd,
        memory_budget=opts.memory_budget,
    )


def _extract(
    ft: Checkpoint,
    bs: Checkpoint,
    base: str,
    out: Path,
    opts: ExtractOptions,
    overwrite: bool,
    log: Any,
) -> ExtractResult:
    out_dtype = parse_dtype(opts.dtype, "extract-lora: --dtype", FACTOR_DTYPES)
    inputs = checkpoint_paths(f"input model {ft.ref!r}", ft) + checkpoint_paths(f"input model {bs.ref!r}", bs)
    check_clear_of_inputs(out, inputs, overwrite)
    check_parent_writable(out)
    plan = _plan(ft, bs, opts)
    check_extraction_fits(plan)
    runner = SvdRunner(device_choice(opts.device, budget=opts.device_memory_budget))
    try:
        for t in plan.tensors:
            if t.step.startswith("svd"):
                runner.check_fits_device(t.name, t.shape, t.peak)
        return _write(ft, bs, base, out, opts, out_dtype, overwrite, runner, plan, log)
    finally:
        runner.close()


def _write(
    ft: Checkpoint,
    bs: Checkpoint,
    base: str,
    out: Path,
    opts: ExtractOptions,
    out_dtype: torch.dtype,
    overwrite: bool,
    runner: SvdRunner,
    plan: ExtractPlan,
    log: Any,
) -> ExtractResult:
    rank, energy, svd = opts.rank, opts.energy, opts.svd
    model_type = (bs.config or {}).get("model_type")
    modules = group_modules(ft)
    all_modules = set(modules)

    reports: list[ModuleReport] = []
    lora_ranks: dict[str, int] = {}
    saved: list[str] = []
    with OutputDir(out, overwrite=overwrite) as folder:
        writer = AppendingSafetensorsWriter(folder.path(ADAPTER_WEIGHTS))
        try:
            for module, keys in modules.items():
                keys = selected(keys, opts.include, opts.exclude)
                if not keys:
                    reports.append(ModuleReport(module, "excluded"))
                    continue
                missing = [k for k in keys if k not in bs]
                if missing:
                    reports.append(ModuleReport(module, "not-captured", note=f"not in base: {missing[0]}"))
                    continue
                for k in keys:
                    if ft.entry(k).shape != bs.entry(k).shape:
                        raise MergeError(
                            f"tensor {k!r}: shape {list(ft.entry(k).shape)} in {ft.ref!r} but "
                            f"{list(bs.entry(k).shape)} in {bs.ref!r}; extract-lora needs one architecture "
                            "(exclude it with --exclude)"
                        )
                if saved_whole(module, keys, opts.save_modules):
                    _save_whole(module, modules[module], ft, writer, all_modules)
                    saved.append(module)
                    reports.append(ModuleReport(module, "saved", note="--save-module: whole module"))
                    _log(log, reports[-1])
                    continue
                weight = f"{module}.weight"
                embedding = is_embedding(module)
                factorable = weight in keys and len(ft.entry(weight).shape) == 2
                if not factorable or (embedding and not opts.embed_lora):
                    reports.append(_uncaptured(module, keys, ft, bs, embedding))
                    _log(log, reports[-1])
                    continue
                transposed = embedding or is_conv1d(model_type, module)
                report, factors = _factor(
                    module, weight, ft, bs, rank, energy, svd, transposed, embedding, out_dtype, runner
                )
                save_above_error = opts.save_above_error
                if save_above_error is not None and report.rank and report.relative_error > save_above_error:
                    # not low rank enough: the whole module goes to modules_to_save instead
                    _save_whole(module, modules[module], ft, writer, all_modules)
                    saved.append(module)
                    reports.append(ModuleReport(
                        module, "saved", report.shape, note=f"rank {report.rank} error "
                        f"{report.relative_error:.4f} > {save_above_error}: whole module",
                    ))
                    _log(log, reports[-1])
                    continue
                for name, tensor in factors:
                    writer.append(name, tensor)
                others = [k for k in keys if k != weight and not torch.equal(ft.read(k), bs.read(k))]
                if others:
                    names = ", ".join(o.rsplit(".", 1)[-1] for o in others)
                    report.note = f"changed but not captured: {names}"
                reports.append(report)
                if report.rank:
                    _require_unambiguous(module, all_modules, "target_modules")
                    lora_ranks[module] = report.rank
                _log(log, report)
            if not lora_ranks and not saved:
                raise MergeError(
                    f"{ft.ref!r} and {bs.ref!r} do not differ in any selected tensor: no adapter to write"
                )
            size = writer.finish()
        except BaseException:
            writer.abort()
            raise
        conv1d = any(is_conv1d(model_type, m) for m in lora_ranks)
        config = adapter_config(lora_ranks, saved, base, ft, conv1d)
        folder.write_json(ADAPTER_CONFIG, config)
        folder.write_json(
            REPORT,
            {
                "fine_tune": ft.ref,
                "base": base,
                "rank": rank,
                "energy": energy,
                "svd": svd,
                "dtype": opts.dtype,
                "save_above_error": opts.save_above_error,
                "memory_plan": plan.as_dict(),
                "modules": [asdict(r) for r in reports],
            },
        )
        folder.commit()
    return ExtractResult(out, config, reports, size)


def _uncaptured(
    module: str, keys: list[str], ft: Checkpoint, bs: Checkpoint, embedding: bool
) -> ModuleReport:
    changed = [k for k in keys if not torch.equal(ft.read(k), bs.read(k))]
    if not changed:
        return ModuleReport(module, "unchanged", list(ft.entry(keys[0]).shape))
    hint = "--embed-lora or --save-module" if embedding else "--save-module"
    return ModuleReport(
        module, "not-captured", list(ft.entry(changed[0]).shape), relative_error=1.0,
        note=f"changed, not low-rank factorable here ({hint} keeps it)",
    )


def _factor(
    module: str,
    weight: str,
    ft: Checkpoint,
    bs: Checkpoint,
    rank: int | None,
    energy: float | None,
    svd: str,
    transposed: bool,
    embedding: bool,
    out_dtype: torch.dtype,
    runner: SvdRunner,
) -> tuple[ModuleReport, list[tuple[str, torch.Tensor]]]:
    """Factor one weight difference; returns its report row and the adapter tensors."""
    from weightsmith.ops.lowrank import rank_for_energy

    # In place in the fine-tune's fresh float32 buffer: one matrix-sized array, not three.
    delta = ft.read(weight).float().sub_(bs.read(weight))
    shape = list(delta.shape)
    if not torch.isfinite(delta).all():
        raise MergeError(f"tensor {weight!r}: the difference has NaN or Inf; check both checkpoints")
    if not delta.any():
        return ModuleReport(module, "unchanged", shape), []
    # peft's factors: Linear W [out, in] = B A; Conv1D and Embedding store W^T, so factor W^T.
    matrix = delta.T if transposed else delta
    method = pick_method(svd, rank, tuple(matrix.shape))
    wanted = min(matrix.shape) if energy is not None else int(rank or 0)

    def factor(m: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, float]:
        # on the selected device (svd_runner.py): the SVD, the rank, the factors and the error
        low = truncated_svd(m, wanted, method)
        r = rank_for_energy(low.singular_values, energy) if energy is not None else low.rank
        b, a = low.b[:, :r].to(out_dtype), low.a[:r].to(out_dtype)
        return r, b, a, relative_error(m, b.float(), a.float())

    scratch = factor_peak_bytes(tuple(matrix.shape), wanted, method)
    r, b, a, error = runner.run(factor, matrix, scratch)
    b, a = b.cpu(), a.cpu()
    # embedding: lora_embedding_A [r, rows], lora_embedding_B [cols, r]: W^T = B_e A_e = b a
    names = factor_names(module, embedding)
    kind = "embedding-lora" if embedding else "lora"
    return ModuleReport(module, kind, shape, r, error, f"svd {method}"), [(names[0], a), (names[1], b)]


def _save_whole(
    module: str, keys: list[str], ft: Checkpoint, writer: AppendingSafetensorsWriter, all_modules: set[str]
) -> None:
    """Append every tensor of ``module`` from the fine-tune (peft saves modules whole)."""
    _require_unambiguous(module, all_modules, "modules_to_save")
    for k in keys:
        writer.append(PEFT_PREFIX + k, ft.read(k))


def _log(log: Any, report: ModuleReport) -> None:
    if log is not None and report.kind != "excluded":
        log(_row(report))


def _require_unambiguous(module: str, all_modules: set[str], field_name: str) -> None:
    """peft matches names by suffix: refuse a full name that is also another module's suffix."""
    clash = sorted(m for m in all_modules if m != module and m.endswith("." + module))
    if clash:
        raise MergeError(
            f"module {module!r} would also match {clash[0]!r} in the adapter's {field_name} (peft "
            "matches by suffix); exclude one of them with --exclude"
        )


def _row(rep: ModuleReport) -> str:
    err = f"{rep.relative_error:.4f}" if rep.kind in ("lora", "embedding-lora") else "-"
    rank = str(rep.rank) if rep.rank else "-"
    shape = "x".join(map(str, rep.shape)) or "-"
    return f"{rep.module:60s} {rep.kind:15s} {shape:>12s} {rank:>5s} {err:>8s}  {rep.note}"
