"""Multi-stage recipes (mergekit-multi): several YAML documents separated by ``---``, each with a
``name:``, later ones using earlier names as models.

The stages run in dependency order. Every stage but the target (the unnamed document, else the
last one, or the one ``--stage`` names) is merged into a cache folder, by default ``.weightsmith-
stages/`` beside OUT: on OUT's file system (intermediates are model-sized, and OUT's disk is the
one the user chose for models), independent of the working directory, and kept between runs.
Each intermediate's folder is named by the stage and a key (stage_keys.py, the one key ``merge``
and ``plan`` use): the fingerprint a ``--resume`` checks (resume.plan_fingerprint: the stage's
recipe with earlier stages' folders substituted, its plan, its inputs' shard fingerprints, and
the options that change bytes: shard size, device and kernels, version). A rerun whose stage recipe
and inputs are unchanged finds the folder and reuses it untouched; any change gives a new key
and a new folder, and a changed stage changes the key of every stage after it (their inputs'
fingerprints change). Every stage's recipe is checked, and the stage graph (unknown names,
cycles) too, before any work.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from weightsmith import pipeline
from weightsmith.engine.parameters import check_parameters
from weightsmith.errors import RecipeError
from weightsmith.io.output_dir import find_leftovers
from weightsmith.lora_output import merge_as_lora, wants_lora
from weightsmith.model_ref import ModelRef, local_path_exists, parse_model_ref
from weightsmith.notices import collecting, did_you_mean, warn
from weightsmith.ops.registry import get_method
from weightsmith.plan_inputs import normalize_models
from weightsmith.recipe import Recipe, check_expanded_size, load_recipe, read_recipe_source
from weightsmith.stage_keys import plan_options, stage_folder

STAGE_CACHE = ".weightsmith-stages"
# Keys whose string values are model references (mergekit substitutes stage names in each).
MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")


@dataclass
class Stage:
    name: str | None  # None: the unnamed (final) document
    index: int  # position in the file, from 0
    raw: dict[str, Any]
    needs: list[str]  # names of the stages whose outputs it reads

    @property
    def label(self) -> str:
        return f"`{self.name}`" if self.name is not None else "(final, unnamed)"


@dataclass
class StagedRecipe:
    source: Path | None
    stages: list[Stage]  # the stages the target needs, dependencies first; the target last
    skipped: list[str] = field(default_factory=list)  # stages the target does not need
    strict: bool = False
    text: str = ""  # the whole multi-document recipe, as written

    @property
    def target(self) -> Stage:
        return self.stages[-1]

    @property
    def search_dirs(self) -> tuple[Path, ...]:
        return (self.source.parent,) if self.source else ()


@dataclass
class StageOutcome:
    stage: Stage
    out: Path
    reused: bool


@dataclass
class StagedMergeResult(pipeline.MergeResult):
    """The final stage's result, plus what happened to each stage and every warning."""

    stages: list[StageOutcome] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def documents(source: str | Path) -> tuple[Path | None, list[Any]]:
    path, text = read_recipe_source(source)
    return path, _parse(text, path)


def _parse(text: str, path: Path | None) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise RecipeError(f"{path or 'recipe'}: not valid YAML: {e}") from e


def is_multi_stage(source: Any) -> bool:
    """Whether ``source`` (a path or YAML text) holds more than one YAML document."""
    if not isinstance(source, (str, Path)):
        return False
    try:
        _, text = read_recipe_source(source)
    except (RecipeError, OSError):
        return False
    if "---" not in text:
        return False
    try:
        return sum(d is not None for d in yaml.safe_load_all(text)) > 1
    except yaml.YAMLError:
        return False  # load_recipe says what is wrong


def load_stages(source: str | Path, *, stage: str | None = None, strict: bool = False) -> StagedRecipe:
    """Parse the documents, check names, references and the stage graph, and order the stages
    the target needs (dependencies first). Each stage's recipe is validated too (its warnings
    are given here, once), all before any work."""
    path, text = read_recipe_source(source)
    docs = _parse(text, path)
    where = str(path) if path else "recipe"
    by_name: dict[str | None, Stage] = {}
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise RecipeError(f"{where}: document {i + 1} is not a mapping; each stage is a recipe")
        check_expanded_size(doc, f"{where}: document {i + 1}")
        name = doc.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise RecipeError(f"{where}: document {i + 1}: `name` must be a non-empty string")
        if name in by_name:
            what = f"two stages are named `{name}`" if name else "more than one document has no `name:`"
            raise RecipeError(f"{where}: {what}; every stage but the final one needs its own name")
        by_name[name] = Stage(name, i, doc, [])
    names = [n for n in by_name if n is not None]
    for st in by_name.values():
        st.needs = sorted(_stage_refs(st.raw, set(names)), key=names.index)
        _check_unknown_refs(st, names, where, path)
    for st in by_name.values():  # a cycle anywhere is an error, even among stages not run
        _dependency_order(by_name, st, where)
    target = _target(by_name, stage, where)
    order = _dependency_order(by_name, target, where)
    skipped = [n for n in names if n not in {s.name for s in order}]
    staged = StagedRecipe(path, order, skipped, strict, text)
    for st in order:  # every stage's fields and parameters, before any work
        placeholders = {n: Path(STAGE_CACHE) / n for n in st.needs}
        recipe = normalize_models(stage_recipe(staged, st, placeholders))  # method known
        try:
            check_parameters(recipe, get_method(recipe.merge_method))
        except RecipeError as e:
            raise RecipeError(f"{where}, stage {st.label}: {e}") from None
    for name in staged.skipped:
        warn(f"{where}: stage `{name}` is not used by stage {staged.target.label}; not run "
             f"(--stage {name} runs it)")
    return staged


def _target(by_name: dict[str | None, Stage], stage: str | None, where: str) -> Stage:
    if stage is not None:
        if stage not in by_name:
            names = [n for n in by_name if n is not None]
            raise RecipeError(
                f"{where}: --stage {stage}: no such stage{did_you_mean(stage, names) or ';'} "
                f"stages: {', '.join(names) or '(none)'}"
            )
        return by_name[stage]
    return by_name[None] if None in by_name else max(by_name.values(), key=lambda s: s.index)


def _dependency_order(by_name: dict[str | None, Stage], target: Stage, where: str) -> list[Stage]:
    order: list[Stage] = []
    path: list[Stage] = []

    def visit(st: Stage) -> None:
        if st in order:
            return
        if st in path:
            cycle = [s.label for s in path[path.index(st):]] + [st.label]
            raise RecipeError(f"{where}: stages form a cycle: {' -> '.join(cycle)}; a stage can use "
                              "only stages that do not use it")
        path.append(st)
        for name in st.needs:
            visit(by_name[name])
        path.pop()
        order.append(st)

    visit(target)
    return order


def _stage_refs(node: Any, names: set[str]) -> set[str]:
    found: set[str] = set()
    _substitute(node, {n: Path(n) for n in names}, found)
    return found


def _substitute(node: Any, paths: dict[str, Path], used: set[str]) -> Any:
    """``node`` with every model reference to a stage replaced by that stage's folder (as
    mergekit-multi does: `model`, `base_model`, tokenizer sources; `STAGE+lora` too)."""
    if isinstance(node, list):
        return [_substitute(v, paths, used) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "models" and isinstance(value, list):  # the short form `models: [a, b]`
            value = [{"model": v} if isinstance(v, str) else v for v in value]
        if key in MODEL_KEYS and isinstance(value, str):
            ref = _parse_ref(value)
            if ref.revision is None and ref.path in paths:  # STAGE or STAGE+ADAPTER
                used.add(ref.path)
                value = str(ModelRef(str(paths[ref.path]), None, ref.adapter))
            out[key] = value
        elif key in MODEL_KEYS and isinstance(value, dict) and value.get("path") in paths:
            used.add(value["path"])
            out[key] = {**value, "path": str(paths[value["path"]])}
        else:
            out[key] = _substitute(value, paths, used)
    return out


def _check_unknown_refs(st: Stage, names: list[str], where: str, path: Path | None) -> None:
    """A bare word that is neither a stage nor a local folder is a misspelled stage name (Hub
    ids have an org/ part), found now rather than after the earlier stages ran."""
    folders = [Path(), *([path.parent] if path is not None else [])]  # as Checkpoint.open looks

    def exists(text: str) -> bool:
        return any(local_path_exists(str(folder / text)) for folder in folders)

    refs: list[str] = []
    _collect_refs(st.raw, refs)
    for ref in refs:
        head = str(parse_model_ref(ref, exists=exists, where=f"{where}: stage {st.label}").base)
        if head in names or "/" in head or "\\" in head or exists(head):
            continue
        raise RecipeError(
            f"{where}: stage {st.label} uses `{head}`, which is no stage of this recipe and no "
            f"local folder{did_you_mean(head, names) or ';'} stages: {', '.join(names) or '(none)'}"
        )


def _parse_ref(ref: str) -> ModelRef:
    # A malformed reference (a+b+c) is reported by _check_unknown_refs, which names the stage.
    try:
        return parse_model_ref(ref)
    except RecipeError:
        return ModelRef(ref)


def _collect_refs(node: Any, out: list[str]) -> None:
    if isinstance(node, list):
        for v in node:
            _collect_refs(v, out)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in MODEL_KEYS and isinstance(value, str) and value not in ("base", "union"):
                out.append(value)
            elif key == "models" and isinstance(value, list):
                out += [v for v in value if isinstance(v, str)]
                _collect_refs([v for v in value if not isinstance(v, str)], out)
            else:
                _collect_refs(value, out)


def stage_recipe(staged: StagedRecipe, st: Stage, folders: dict[str, Path], echo: bool = True) -> Recipe:
    """The stage as a recipe, earlier stages' names replaced by their folders."""
    raw = _substitute(st.raw, folders, set())
    where = f"{staged.source or 'recipe'}, stage {st.label}"
    with collecting(echo=echo):
        recipe = load_recipe(raw, strict=staged.strict, where=where)
    recipe.source = staged.source  # relative paths resolve against the recipe's folder
    return recipe


def cache_folder(out: str | Path, stage_cache: str | Path | None) -> Path:
    return Path(stage_cache) if stage_cache is not None else Path(out).absolute().parent / STAGE_CACHE


def merge(
    recipe: Any,
    out: str | Path,
    *,
    stage: str | None = None,
    stage_cache: str | Path | None = None,
    strict: bool = False,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> pipeline.MergeResult:
    """``weightsmith.merge``: a one-document recipe as ``pipeline.merge``; a multi-stage one
    runs its stages (see the module's doc) and writes the target stage to ``out``. ``options``
    are ``pipeline.merge``'s."""
    out_format = options.pop("out_format", None)
    lora_options = {k: options.pop(k) for k in ("out_rank", "out_energy") if k in options}
    if not is_multi_stage(recipe):
        if stage is not None:
            raise RecipeError("--stage: this recipe has one document, so no stages to choose from")
        if wants_lora(recipe, out_format):  # a PEFT adapter instead of a model
            return merge_as_lora(recipe, out, strict=strict, log=log, **lora_options, **options)
        return pipeline.merge(recipe, out, strict=strict, **options)
    if out_format == "lora":
        raise RecipeError("out_format lora: multi-stage recipes are not supported; write the last stage "
                          "as a model, then extract-lora it")
    with collecting() as warnings:
        staged = load_stages(recipe, stage=stage, strict=strict)
        cache = cache_folder(out, stage_cache)
        say = log or (lambda line: print(line, file=sys.stderr, flush=True))
        folders: dict[str, Path] = {}
        outcomes: list[StageOutcome] = []
        n = len(staged.stages)
        for k, st in enumerate(staged.stages[:-1], 1):
            folder, reused = _run_intermediate(staged, st, folders, cache, options)
            folders[str(st.name)] = folder
            outcomes.append(StageOutcome(st, folder, reused))
            what = "unchanged, reusing" if reused else "merged into"
            say(f"stage {k}/{n} {st.label}: {what} {folder}")
        final = stage_recipe(staged, staged.target, folders, echo=False)
        # OUT records the whole multi-stage recipe (weightsmith_recipe.yaml, the model card):
        # running that file again reproduces it, stages included.
        final.text = staged.text
        result = pipeline.merge(final, out, **options)
        say(f"stage {n}/{n} {staged.target.label}: merged into {result.out}")
        outcomes.append(StageOutcome(staged.target, result.out, False))
    return StagedMergeResult(result.out, result.plan, result.stats, result.seconds, outcomes, warnings)


def _run_intermediate(
    staged: StagedRecipe, st: Stage, folders: dict[str, Path], cache: Path, options: dict[str, Any]
) -> tuple[Path, bool]:
    recipe = stage_recipe(staged, st, folders, echo=False)
    plan = pipeline.plan_merge(recipe, **plan_options(options))
    folder = stage_folder(cache, str(st.name), plan, options)
    if (folder / "merge_report.json").is_file():  # folders appear complete (atomic rename)
        return folder, True
    cache.mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in options.items() if k not in ("overwrite", "resume")}
    # A stage killed mid-merge left a temporary folder of this very plan: continue it.
    pipeline.merge(recipe, folder, resume=bool(find_leftovers(folder)), **keep)
    return folder, False


@dataclass
class StagePlan:
    stage: Stage
    recipe: Recipe
    folder: Path | None  # the intermediate's cache folder (None: the target, or not yet known)
    cached: bool
    plan: Any = None  # the stage's MergePlan, where its inputs exist now


def plan_stages(
    recipe: str | Path,
    *,
    out: str | Path | None = None,
    stage: str | None = None,
    stage_cache: str | Path | None = None,
    strict: bool = False,
    **options: Any,
) -> list[StagePlan]:
    """Each stage the target needs, in order: its recipe, whether the cache holds it, and its
    plan where its inputs exist (a stage after one still to run is planned when that has run).
    ``options`` are ``merge``'s: give the ones the merge will get (shard size, device, kernels,
    seed, ...) and each stage's folder is the one that merge writes or reuses."""
    with collecting():  # each warning once, though stages are checked first and planned after
        return _plan_stages(recipe, out, stage, stage_cache, strict, options)


def _plan_stages(
    recipe: str | Path,
    out: str | Path | None,
    stage: str | None,
    stage_cache: str | Path | None,
    strict: bool,
    options: dict[str, Any],
) -> list[StagePlan]:
    staged = load_stages(recipe, stage=stage, strict=strict)
    # Without OUT, the cache a merge into the working directory would use.
    cache = cache_folder(out if out is not None else "OUT", stage_cache)
    folders: dict[str, Path] = {}
    rows: list[StagePlan] = []
    for st in staged.stages:
        ready = all(name in folders for name in st.needs)
        recipe_obj = stage_recipe(staged, st, {**{n: cache / n for n in st.needs}, **folders}, echo=False)
        if not ready:
            rows.append(StagePlan(st, recipe_obj, None, False))
            continue
        plan = pipeline.plan_merge(recipe_obj, **plan_options(options))
        folder, cached = None, False
        if st is not staged.target:
            folder = stage_folder(cache, str(st.name), plan, options)
            cached = (folder / "merge_report.json").is_file()
            if cached:
                folders[str(st.name)] = folder
        rows.append(StagePlan(st, recipe_obj, folder, cached, plan))
    return rows
