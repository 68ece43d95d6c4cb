"""``out_format: lora``: write a merge as a PEFT LoRA adapter of the recipe's base model.

Two paths, chosen per recipe:

* **exact concatenation** — ``linear`` (normalized) and ``task_arithmetic`` whose every model is
  an adapter of ``base_model`` (``model: BASE+ADAPTER``) with plain numeric weights. The merge is
  ``W + sum_i c_i * s_i * B_i @ A_i`` (``c_i`` the method's coefficient: ``lambda * w_i``, divided
  by the weight sum when normalized; ``s_i`` the adapter's scale), which is itself one LoRA:
  ``B = [c_1 s_1 B_1 | c_2 s_2 B_2 | ...]``, ``A = [A_1; A_2; ...]`` with scale 1
  (``lora_alpha = r``). No SVD, no error; **the rank grows** to the sum of the inputs' ranks
  (adapters with coefficient 0 are dropped). ``A`` bytes are the inputs' (cast to float32);
  ``B`` is the input's times ``c_i * s_i`` (one float32 multiply; bytes unchanged when it is 1).
* **SVD re-factor** — any other method, or inputs the above cannot take (full fine-tunes, saved
  ``modules_to_save`` tensors, per-tensor weights): the full merge is written to a scratch folder
  beside OUT, then ``extract-lora`` factors ``merged - base`` per module to ``out_rank`` (or
  ``out_energy``) and reports each module's relative error. Tensors the adapters save whole are
  kept whole (``modules_to_save``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightsmith.defaults import DEFAULT_MEMORY_BUDGET
from weightsmith.errors import MergeError, RecipeError
from weightsmith.io.append_writer import AppendingSafetensorsWriter
from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.lora import LoraCheckpoint
from weightsmith.io.lora_writer import adapter_config, factor_names
from weightsmith.io.output_dir import OutputDir
from weightsmith.io.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from weightsmith.lora_extraction import ModuleReport, extract_lora
from weightsmith.lora_plan import ExtractPlan, check_extraction_fits, plan_extraction
from weightsmith.model_ref import parse_model_ref
from weightsmith.notices import collecting
from weightsmith.output_checks import check_clear_of_inputs, checkpoint_paths, protect
from weightsmith.recipe import Recipe, load_recipe
from weightsmith.recipe_settings import Conditional

OUT_FORMATS = ("full", "lora")
REPORT = "lora_merge_report.json"
_CONCAT_METHODS = ("linear", "task_arithmetic")


@dataclass
class LoraMergeResult:
    out: Path
    path: str  # "concatenation" | "svd"
    config: dict[str, Any]
    modules: list[ModuleReport] = field(default_factory=list)

    def summary(self) -> str:
        lora = [m for m in self.modules if m.rank]
        worst = max(lora, key=lambda m: m.relative_error, default=None)
        text = f"wrote LoRA adapter {self.out} ({self.path}): {len(lora)} modules, r={self.config['r']}"
        if self.config.get("rank_pattern"):
            text += f" (rank_pattern for {len(self.config['rank_pattern'])})"
        if worst is not None and self.path == "svd":
            text += f"; worst relative error {worst.relative_error:.4g} ({worst.module})"
        return text


def wants_lora(recipe: Any, out_format: str | None) -> bool:
    """Whether this merge writes an adapter: ``out_format`` (CLI/API) over the recipe's field."""
    if out_format is not None:
        if out_format not in OUT_FORMATS:
            raise RecipeError(f"out_format must be one of {', '.join(OUT_FORMATS)}, got {out_format!r}")
        return out_format == "lora"
    if isinstance(recipe, Recipe):
        return recipe.out_format == "lora"
    if isinstance(recipe, dict):
        return recipe.get("out_format") == "lora"
    with collecting(echo=False):  # the merge that follows loads it again and says its warnings
        return load_recipe(recipe).out_format == "lora"


def merge_as_lora(
    recipe: Any,
    out: str | Path,
    *,
    out_rank: int | None = None,
    out_energy: float | None = None,
    overwrite: bool = False,
    strict: bool = False,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> LoraMergeResult:
    """Merge ``recipe`` and write the result to ``out`` as a PEFT adapter (see the module doc)."""
    say = log or print
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, strict=strict)
    if rec.base_model is None or parse_model_ref(rec.base_model).adapter is not None:
        raise RecipeError(
            "out_format: lora writes an adapter of `base_model`; set base_model to the plain base "
            "checkpoint the adapters (or fine-tunes) belong to"
        )
    allow_pickle = bool(options.get("allow_pickle", False))
    base = Checkpoint.open(rec.base_model, allow_pickle=allow_pickle, search_dirs=rec.search_dirs)
    opened = [base]
    try:
        adapters: list[tuple[LoraCheckpoint | None, dict[str, Any]]] = []
        for spec in rec.models:
            ckpt = Checkpoint.open(spec.ref, allow_pickle=allow_pickle, search_dirs=rec.search_dirs)
            opened.append(ckpt)
            if spec.ref == rec.base_model:
                continue  # the base listed again: a zero task vector
            lora = ckpt if isinstance(ckpt, LoraCheckpoint) and _same_base(ckpt, base) else None
            adapters.append((lora, spec.parameters))
        inputs = [p for c in opened for p in checkpoint_paths(f"input model {c.ref!r}", c, rec.search_dirs)]
        if rec.source is not None:
            inputs.append(protect("recipe file", rec.source, folder=False))
        check_clear_of_inputs(out, inputs, overwrite)
        coefficients = _concat_coefficients(rec, adapters)
        if coefficients is not None:
            return _write_concatenation(rec, base, adapters, coefficients, Path(out), overwrite, say)
    finally:
        for ckpt in opened:
            ckpt.close()
    why = f"method {rec.merge_method}" if rec.merge_method not in _CONCAT_METHODS else (
        "not every input is a plain adapter of base_model with a numeric weight"
    )
    if (out_rank is None) == (out_energy is None):
        raise RecipeError(
            f"out_format: lora with {why} needs an SVD re-factor: give exactly one of --out-rank R or "
            "--out-energy F (merge(..., out_rank=R) / out_energy=F)"
        )
    return _write_svd(rec, Path(out), out_rank, out_energy, overwrite, strict, say, options)


def _same_base(ckpt: LoraCheckpoint, base: Checkpoint) -> bool:
    assert ckpt.base is not None
    return Path(ckpt.base.root).resolve() == Path(base.root).resolve()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or isinstance(value, Conditional) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _concat_coefficients(
    rec: Recipe, adapters: list[tuple[LoraCheckpoint | None, dict[str, Any]]]
) -> list[float] | None:
    """Each adapter's ``c_i`` when the merge is exactly a sum of their deltas, else None."""
    method = rec.merge_method
    if method not in _CONCAT_METHODS or not adapters or any(a is None for a, _ in adapters):
        return None
    if getattr(rec, "slices", None) is not None or getattr(rec, "modules", None) is not None:
        return None  # layer-sliced recipes: per-slice weights and layouts; the SVD path takes them
    if any(p.replacement is not None for a, _ in adapters for p in a.adapter.patches.values()):  # type: ignore[union-attr]
        return None  # tensors saved whole: their merge is not a LoRA delta
    weights = [_number(p.get("weight", rec.parameters.get("weight"))) for _, p in adapters]
    if any(w is None for w in weights):
        return None
    ws = [float(w) for w in weights]  # type: ignore[arg-type]
    # the base listed among the models weighs in a normalized sum with a zero delta
    base_weights = [
        _number(m.parameters.get("weight", rec.parameters.get("weight")))
        for m in rec.models if m.ref == rec.base_model
    ]
    if any(w is None for w in base_weights):
        return None
    default_normalize = method == "linear"
    normalize = rec.parameters.get("normalize", default_normalize)
    if not isinstance(normalize, bool):
        return None
    lam = _number(rec.parameters.get("lambda", 1.0)) if method == "task_arithmetic" else 1.0
    if lam is None:
        return None
    if normalize:
        total = sum(ws) + sum(float(w) for w in base_weights)  # type: ignore[arg-type]
        if total == 0:
            raise RecipeError(f"{method}: weights sum to 0, so normalize cannot divide by them")
        ws = [w / total for w in ws]
    elif method == "linear":
        return None  # sum_i w_i W_i with sum w != 1 is not base + a low-rank delta
    return [lam * w for w in ws]


def _write_concatenation(
    rec: Recipe,
    base: Checkpoint,
    adapters: list[tuple[LoraCheckpoint | None, dict[str, Any]]],
    coefficients: list[float],
    out: Path,
    overwrite: bool,
    say: Callable[[str], None],
) -> LoraMergeResult:
    keys = sorted({k for a, _ in adapters for k, p in a.adapter.patches.items() if p.a_key})  # type: ignore[union-attr]
    ranks: dict[str, int] = {}
    reports: list[ModuleReport] = []
    fan_in_fan_out = False
    with OutputDir(out, overwrite=overwrite) as folder:
        writer = AppendingSafetensorsWriter(folder.path(ADAPTER_WEIGHTS))
        try:
            for key in keys:
                parts = []
                for (ckpt, _), c in zip(adapters, coefficients, strict=True):
                    patch = ckpt.adapter.patches.get(key)  # type: ignore[union-attr]
                    if patch is None or patch.a_key is None or c == 0.0:
                        continue
                    a = ckpt.adapter.weights.read(patch.a_key).float()  # type: ignore[union-attr]
                    b = ckpt.adapter.weights.read(patch.b_key).float()  # type: ignore[union-attr,arg-type]
                    parts.append((patch, a, b.mul_(c * patch.scale)))
                if not parts:
                    continue
                first = parts[0][0]
                layout = (first.transposed, first.embedding)
                if any((p.transposed, p.embedding) != layout for p, _, _ in parts):
                    raise MergeError(
                        f"tensor {key!r}: the adapters lay out their factors differently (fan_in_fan_out "
                        "or embedding); out_format: lora cannot concatenate them"
                    )
                a_out = torch.cat([a for _, a, _ in parts], 0)
                b_out = torch.cat([b for _, _, b in parts], 1)
                names = factor_names(first.module, first.embedding)
                fan_in_fan_out |= first.transposed and not first.embedding
                writer.append(names[0], a_out)
                writer.append(names[1], b_out)
                ranks[first.module] = int(a_out.shape[0])
                reports.append(ModuleReport(
                    first.module, "embedding-lora" if first.embedding else "lora",
                    list(base.entry(key).shape), ranks[first.module], 0.0,
                    "concatenation of " + " + ".join(str(int(a.shape[0])) for _, a, _ in parts),
                ))
            if not ranks:
                raise MergeError("out_format: lora: every adapter has weight 0; nothing to write")
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        config = adapter_config(ranks, [], rec.base_model or "", base, fan_in_fan_out)
        folder.write_json(ADAPTER_CONFIG, config)
        folder.write_json(REPORT, {
            "path": "concatenation", "method": rec.merge_method, "coefficients": coefficients,
            "modules": [asdict(r) for r in reports],
        })
        folder.commit()
    say(
        "note: out_format lora concatenated the adapters' factors exactly (no SVD, no error); each "
        f"module's rank grows to the sum of the inputs' ranks (r={config['r']} here). For a smaller "
        "adapter, run extract-lora --rank R on the full merge"
    )
    return LoraMergeResult(out, "concatenation", config, reports)


def _write_svd(
    rec: Recipe,
    out: Path,
    rank: int | None,
    energy: float | None,
    overwrite: bool,
    strict: bool,
    say: Callable[[str], None],
    options: dict[str, Any],
) -> LoraMergeResult:
    from weightsmith.pipeline import merge

    allow_pickle = bool(options.get("allow_pickle", False))
    base = Checkpoint.open(rec.base_model or "", allow_pickle=allow_pickle, search_dirs=rec.search_dirs)
    saved: set[str] = set()
    embeddings = False
    for spec in rec.models:
        ckpt = Checkpoint.open(spec.ref, allow_pickle=allow_pickle, search_dirs=rec.search_dirs)
        if isinstance(ckpt, LoraCheckpoint) and ckpt.adapter is not None:
            saved |= {p.module for p in ckpt.adapter.patches.values() if p.replacement is not None}
            embeddings |= any(p.embedding for p in ckpt.adapter.patches.values())
        ckpt.close()
    base_root = str(base.root)
    save_modules = [f"^{re.escape(m)}$" for m in sorted(saved)]
    budget = options.get("memory_budget", DEFAULT_MEMORY_BUDGET)
    try:
        # Before the merge: the re-factor's SVDs (merged - base has the base's shapes) must fit.
        check_extraction_fits(_refactor_plan(base, rank, energy, save_modules, embeddings, budget),
                              "out_format: lora")
    finally:
        base.close()
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".weightsmith-lora-merge-", dir=out.absolute().parent))
    try:
        merged = merge(rec, scratch / "merged", strict=strict, **options)
        say(f"merged into scratch {merged.out}; factoring merged - base per module")
        result = extract_lora(
            merged.out, base_root, out, rank=rank, energy=energy,
            save_modules=save_modules, embed_lora=embeddings, memory_budget=budget,
            device=options.get("device", "cpu"), device_memory_budget=options.get("device_memory_budget"),
            overwrite=overwrite, allow_pickle=allow_pickle, log=say,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return LoraMergeResult(result.out, "svd", result.config, result.modules)


def _refactor_plan(
    base: Checkpoint, rank: int | None, energy: float | None, save_modules: list[str], embeddings: bool,
    budget: str | int | None,
) -> ExtractPlan:
    """The SVD re-factor's memory plan from the base's headers (the merge has its shapes)."""
    return plan_extraction(
        base, base, rank=rank, energy=energy, save_modules=save_modules, embed_lora=embeddings,
        memory_budget=budget,
    )


def refactor_plan(plan: Any) -> ExtractPlan | None:
    """``weightsmith plan`` of an ``out_format: lora`` recipe (a MergePlan): the SVD re-factor's
    per-tensor peak (SVD scratch included) under the plan's memory budget, from the base's
    headers, assuming exact SVDs (the largest; ``merge --out-rank R`` far below a matrix's
    size uses randomized ones). None for other recipes. (The concatenation path, when the
    inputs allow it, does no SVD.)"""
    recipe = plan.recipe
    if recipe.out_format != "lora" or recipe.base_model is None:
        return None
    base = next((c for c in plan.checkpoints if c.ref == recipe.base_model), None)
    if base is None:
        return None
    return _refactor_plan(base, None, 1.0, [], False, plan.memory_budget)
