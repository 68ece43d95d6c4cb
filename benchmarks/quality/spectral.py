"""TSV-M and ISO-C / ISO-CTS vs task arithmetic and TIES (issue 17) on the MiniLM testbed.

    python benchmarks/quality/spectral.py [--testbeds DIR] [--seeds 0 1 2] [--refinetune]

The four task fine-tunes of the MiniLM testbed (``ft-<task>``: encoder fine-tuned under a frozen
linear-probe head) are merged into one encoder by each method, all through ``weightsmith merge``
(one thread). The merged encoder is scored under each task's own head (``probe-<task>``) and its
accuracy normalised by that task's fine-tune on the same examples, as both papers report it.
Each method's scale (lambda / alpha) is chosen per seed on the validation split from a grid, as
the papers do, by mean normalised validation accuracy; the test split is then scored once.

The scale grid costs one merge per method, not one per grid point: every method returns
theta_0 + s * Delta with Delta independent of s (docs/methods/spectral.md, ties.py), so the
script merges at s = 1 and rescales the merged delta. It checks that claim once per run against
real merges at other scales and prints the largest difference in the table's notes.

Seeds. Default: one testbed (its fine-tunes are seed 0) and 3 seeds of the evaluation data —
seed 0 uses the testbed's own val / test files, seed s > 0 draws fresh val and test sets from the
same task generators. Merges are deterministic (CPU LAPACK, no sampling), so the seeds measure
how much the comparison depends on which held-out examples were drawn, not training noise.
``--refinetune``: seed s > 0 instead fine-tunes each task again from ``probe-<task>`` with the
testbed's settings and seed s (4 fine-tunes per seed) and evaluates on the testbed's files.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from reporting import environment, fmt, holds, log, parser, table, testbed, write

from weightsmith.finetune import Evaluator, finetune
from weightsmith.finetune.modeling import iter_safetensors
from weightsmith.pipeline import merge
from weightsmith.testbeds.common import write_jsonl
from weightsmith.testbeds.minilm import FINETUNE, MAX_LENGTH, SEED, SPLITS
from weightsmith.testbeds.text_tasks import TASKS as GENERATORS
from weightsmith.testbeds.text_tasks import generate

TASKS = ("sentiment", "topic", "question", "formality")
# label -> (merge_method, fixed parameters, scale parameter, validation grid). TIES as in
# lines.py (density 0.2, model-wide trimming as the paper's reference). ISO's grid goes past
# the papers' 0.1..3 because docs/methods/spectral.md found alpha 3 barely enough for T = 2 here.
METHODS: dict[str, tuple[str, dict[str, Any], str, list[float]]] = {
    "task arithmetic": ("task_arithmetic", {}, "lambda", [0.3, 0.5, 1.0]),
    "TIES": ("ties", {"density": 0.2, "scope": "model"}, "lambda", [0.7, 1.0, 1.5]),
    "TSV-M": ("tsv", {}, "alpha", [0.7, 1.0, 1.5]),
    "ISO-C": ("iso_c", {}, "alpha", [1.0, 3.0, 5.0]),
    "ISO-CTS": ("iso_cts", {}, "alpha", [1.0, 3.0, 5.0]),
}
# (method, scale) pairs merged for real to check the rescaling shortcut.
RESCALE_CHECKS = [("task arithmetic", 0.3), ("ISO-C", 2.0)]
# Paper claims checked: (better, worse).
CLAIMS = [("TSV-M", "task arithmetic"), ("TSV-M", "TIES"), ("ISO-C", "task arithmetic"),
          ("ISO-C", "TIES"), ("ISO-CTS", "task arithmetic"), ("ISO-CTS", "TIES"), ("ISO-CTS", "ISO-C")]
N_VAL = 100  # validation examples per task for the scale choice (CPU time: 3 grid points x 5 x 4)
CEILING = 0.995  # both at or above this normalised accuracy in every seed: saturated
State = dict[str, torch.Tensor]


def load_state(folder: Path) -> State:
    """The floating-point tensors (the base's int ``position_ids`` buffer is no model weight)."""
    return {k: v for k, v in iter_safetensors(folder) if v.is_floating_point()}


def finetunes(bed: Path, work: Path, seed: int, refinetune: bool) -> dict[str, Path]:
    """The task models of a seed: the testbed's, or (``--refinetune``, seed != the testbed's)
    each task fine-tuned again from its probe with the testbed's settings and this seed."""
    if not refinetune or seed == SEED:
        return {t: bed / f"ft-{t}" for t in TASKS}
    out = {}
    for t in TASKS:
        folder = work / "ft" / f"{t}-s{seed}"
        if not (folder / "train_log.json").is_file():
            log(f"fine-tune {t} (seed {seed})")
            finetune(bed / f"probe-{t}", folder, bed / "data" / t / "train.jsonl", "classification",
                     seed=seed, max_length=MAX_LENGTH, quiet=True, overwrite=True, **FINETUNE)
        out[t] = folder
    return out


def eval_files(bed: Path, work: Path, seed: int, refinetune: bool) -> dict[str, dict[str, Path]]:
    """Per task, the val and test files of a seed (see the module docstring)."""
    files: dict[str, dict[str, Path]] = {}
    for i, t in enumerate(TASKS):
        folder = work / "data" / f"s{seed}" / t
        if refinetune or seed == SEED:
            val = (bed / "data" / t / "val.jsonl").read_text().splitlines(keepends=True)[:N_VAL]
            (folder / "val.jsonl").parent.mkdir(parents=True, exist_ok=True)
            (folder / "val.jsonl").write_text("".join(val))
            files[t] = {"val": folder / "val.jsonl", "test": bed / "data" / t / "test.jsonl"}
            continue
        # Seeds far from the testbed's split seeds (SEED * 10_000 + task * 100 + split).
        sizes = {"val": N_VAL, "test": SPLITS["test"]}
        files[t] = {split: write_jsonl(folder / f"{split}.jsonl",
                                       generate(GENERATORS[t], n, 1_000_000 * seed + 100 * i + j))
                    for j, (split, n) in enumerate(sizes.items())}
    return files


def recipe(bed: Path, models: dict[str, Path], method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(bed / "base"),
        "models": [{"model": str(models[t]), "parameters": {"weight": 1.0}} for t in TASKS],
        "parameters": params,
        "dtype": "float32",
        "out_dtype": "float32",
        "extra_keys": "ignore",  # the fine-tunes' heads: each task keeps its own
    }


def run_merge(bed: Path, models: dict[str, Path], label: str, scale: float, out: Path) -> State:
    method, fixed, key, _ = METHODS[label]
    started = time.perf_counter()
    merge(recipe(bed, models, method, {**fixed, key: scale}), out, overwrite=True, threads=1)
    log(f"merged {label} ({key} {scale}) in {time.perf_counter() - started:.0f}s")
    merged = load_state(out)
    shutil.rmtree(out, ignore_errors=True)
    return merged


def rescaled(base: State, unit: State, scale: float) -> State:
    """theta_0 + scale * (merged at scale 1 - theta_0)."""
    return {k: base[k] + scale * (v - base[k]) for k, v in unit.items()}


class Scores:
    """Accuracy of an encoder under each task's probe head, on one seed's val and test files."""

    def __init__(self, bed: Path, files: dict[str, dict[str, Path]]) -> None:
        self.evaluators = {
            (t, s): Evaluator(bed / f"probe-{t}", files[t][s], "classification", batch_size=64,
                              max_length=MAX_LENGTH)
            for t in TASKS for s in ("val", "test")
        }

    def accuracy(self, weights: State | None, task: str, split: str) -> float:
        return self.evaluators[(task, split)].score(weights)

    def metrics(self, weights: State | None, task: str, split: str) -> dict[str, float]:
        return self.evaluators[(task, split)].evaluate(weights)


def run_seed(seed: int, bed: Path, work: Path, refinetune: bool, units: dict[tuple, State],
             base: State) -> dict[str, Any]:
    models = finetunes(bed, work, seed, refinetune)
    key = tuple(str(models[t]) for t in TASKS)
    if key not in units:  # one merge per method and fine-tune set, at scale 1
        units[key] = {label: run_merge(bed, models, label, 1.0, work / "merged") for label in METHODS}
    unit = units[key]
    scores = Scores(bed, eval_files(bed, work, seed, refinetune))
    ft = {t: load_state(models[t]) for t in TASKS}
    ref = {(t, s): scores.accuracy(ft[t], t, s) for t in TASKS for s in ("val", "test")}

    def normalised(weights: State | None, split: str) -> dict[str, float]:
        return {t: scores.accuracy(weights, t, split) / ref[(t, split)] for t in TASKS}

    result: dict[str, Any] = {
        "fine-tuned": {"test": {t: ref[(t, "test")] for t in TASKS}},
        "zero-shot (probe)": {"test": {t: scores.accuracy(None, t, "test") for t in TASKS}},
    }
    for label, (_, _, _, grid) in METHODS.items():
        val, loss = {}, {}
        for s in grid:
            m = {t: scores.metrics(rescaled(base, unit[label], s), t, "val") for t in TASKS}
            val[s] = sum(m[t]["accuracy"] / ref[(t, "val")] for t in TASKS) / len(TASKS)
            loss[s] = sum(m[t]["loss"] for t in TASKS) / len(TASKS)
        # Validation accuracy saturates on these tasks; ties go to the lower validation loss.
        chosen = max(grid, key=lambda s: (val[s], -loss[s]))
        test = normalised(rescaled(base, unit[label], chosen), "test")
        result[label] = {"scale": chosen, "val": val, "test_norm": test,
                         "test": {t: test[t] * ref[(t, "test")] for t in TASKS}}
        log(f"seed {seed}: {label} scale {chosen}: val {val[chosen]:.3f}, test norm "
            f"{sum(test.values()) / len(TASKS):.3f}")
    return result


def rescale_check(bed: Path, work: Path, base: State, units: dict[tuple, State]) -> float:
    """Largest |rescaled - merged| over RESCALE_CHECKS, on the first seed's fine-tunes."""
    key, unit = next(iter(units.items()))
    models = dict(zip(TASKS, map(Path, key), strict=True))
    worst = 0.0
    for label, scale in RESCALE_CHECKS:
        real = run_merge(bed, models, label, scale, work / "merged")
        fast = rescaled(base, unit[label], scale)
        worst = max(worst, max((real[k].double() - fast[k].double()).abs().max().item()
                               for k in real))
    return worst


def mean_over_tasks(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def report(runs: list[dict[str, Any]], seeds: list[int], refinetune: bool, check: float | None,
           seconds: float, threads: int, planned: list[int]) -> str:
    def col(label: str, key: str = "test_norm") -> list[float]:
        return [mean_over_tasks(r[label][key]) for r in runs]

    def absolute(label: str) -> list[float]:
        return [mean_over_tasks(r[label]["test"]) for r in runs]

    rows = [[label, fmt(absolute(label), percent=True), "100 (by definition)" if label == "fine-tuned" else
             fmt([mean_over_tasks({t: r[label]["test"][t] / r["fine-tuned"]["test"][t] for t in TASKS})
                  for r in runs], percent=True), "",
             *(fmt([r[label]["test"][t] for r in runs], percent=True) for t in TASKS)]
            for label in ("fine-tuned", "zero-shot (probe)")]
    for label, (_, _, key, _) in METHODS.items():
        rows.append([label, fmt(absolute(label), percent=True), fmt(col(label), percent=True),
                     f"{key} " + ", ".join(f"{r[label]['scale']:g}" for r in runs),
                     *(fmt([r[label]["test"][t] for r in runs], percent=True) for t in TASKS)])
    grid_rows = [[label, f"{key}: " + ", ".join(f"{s:g}" for s in grid),
                  " / ".join(f"{100 * sum(r[label]['val'][s] for r in runs) / len(runs):.1f}" for s in grid)]
                 for label, (_, _, key, grid) in METHODS.items()]
    checks = []
    for better, worse in CLAIMS:
        b, w = col(better), col(worse)
        if min(b) >= CEILING and min(w) >= CEILING:
            checks.append([f"{better} > {worse}", "saturated", f"both >= {CEILING:.1%} in every seed"])
            continue
        ok, why = holds(b, w)
        checks.append([f"{better} > {worse}", "reproduced" if ok else "**did not reproduce**", why])
    at_one = "; ".join(f"{label} {100 * sum(r[label]['val'][1.0] for r in runs) / len(runs):.1f}"
                       for label, (_, _, _, grid) in METHODS.items() if 1.0 in grid)
    edge = [label for label, (_, _, _, grid) in METHODS.items()
            if any(r[label]["scale"] == max(grid) for r in runs)]
    if all(c[1] == "saturated" for c in checks):
        verdict = (
            "**Not reproduced, and not contradicted: the comparison is saturated.** At the scale its "
            f"validation grid chose, every merge keeps >= {CEILING:.1%} of each fine-tune's test "
            "accuracy in every seed, so no method can beat another on this testbed; the papers' gap, "
            "which grows with the number of tasks and how much they interfere, needs more or harder "
            "tasks than these four. ")
    else:
        verdict = ""
    verdict += (f"Scale matters more than method here: mean normalised validation accuracy at scale 1 (each "
                f"method's default) was {at_one} (%).")
    if edge:
        verdict += (f" Chosen at the top of its grid in some seed: {', '.join(edge)} (accuracy there was "
                    "already at its ceiling, so a larger scale could tie, not win).")
    if refinetune:
        seeds_text = (f"Seeds {seeds}: fine-tune seeds (seed {SEED} = the testbed's `ft-<task>`, others "
                      "fine-tuned again from `probe-<task>` with the testbed's settings); the testbed's "
                      "val / test files for every seed.")
    else:
        seeds_text = (
            f"Seeds {seeds}: **evaluation-data seeds on one set of fine-tunes** (the testbed's "
            f"`ft-<task>`, fine-tune seed {SEED}). Seed {SEED} scores the testbed's val (first {N_VAL}) / "
            f"test files; the others draw fresh val ({N_VAL}) and test (200) sets per task from the same "
            "generators. Merges are deterministic, so the ± is evaluation-sampling noise only: it says "
            "nothing about how the ranking varies with the fine-tunes (`--refinetune` measures that; not "
            "run here: 8 more fine-tunes did not fit the 2-core machine's time).")
    flag = " --refinetune" if refinetune else ""
    against = ", ".join(f"{m} {s:g}" for m, s in RESCALE_CHECKS)
    checked = (f"checked against real merges at {against}: largest difference {check:.2e}."
               if check is not None else f"the check against real merges ({against}) has not run yet.")
    partial = ""
    if len(runs) < len(planned):
        partial = (f"\n**PARTIAL: {len(runs)} of {len(planned)} seeds ({planned[:len(runs)]}) finished when "
                   "this was written; the ± and the seed counts below are over those only.**\n")
    return f"""# Spectral merges (TSV-M, ISO-C, ISO-CTS) vs task arithmetic and TIES — MiniLM

Generated by `python benchmarks/quality/spectral.py{flag}` (seeds {planned}); issue 17.{partial}
{environment(seconds, threads)}

Setup: MiniLM testbed, T = 4 tasks ({", ".join(TASKS)}); task vectors = `ft-<task>` − `base`
(encoder fine-tuned {FINETUNE["steps"]} steps under the frozen linear-probe head, word embeddings
frozen). Each method merges the four with `weightsmith merge --threads 1`; the merged encoder is
scored under each task's probe head. Normalised accuracy = merged / fine-tune on the same
examples, averaged over the tasks (the papers' headline number). Scale chosen per seed on the
validation split (mean normalised accuracy; ties to the lower mean validation loss), then test.
Defaults otherwise: TIES density 0.2, model-wide trimming; TSV rank fraction 1/T; ISO-CTS common
fraction 0.8; every 2-D tensor (word embeddings included) spectral.
{seeds_text}

### Test accuracy (mean ± std over seeds, %)

{table(["model", "mean acc", "normalised acc", "chosen scale per seed", *TASKS], rows)}

### Validation grid ({N_VAL} examples per task; mean normalised validation accuracy over seeds, %)

{table(["method", "grid", "normalised val acc"], grid_rows)}

### Expected effects (papers: TSV-M and ISO-C/CTS above task arithmetic and TIES; ISO-CTS ≥ ISO-C)

{table(["claim (normalised test acc)", "result", "evidence"], checks)}

{verdict}

Rule (algorithms.md §11): the direction holds in ≥ 2 of 3 seeds and the mean difference exceeds
one pooled standard deviation. Absolute numbers are not comparable with the papers' (CLIP ViTs on
8–20 image tasks, where TSV-M and ISO-CTS gain 10–20 points of normalised accuracy over task
arithmetic); T = 4 short text fine-tunes of a 6-layer encoder interfere far less.
The scale grid is run by rescaling one merge per method (each returns θ₀ + s·Δ); {checked}
"""


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--refinetune", action="store_true",
                   help="seeds are fine-tune seeds (4 fine-tunes per extra seed) instead of eval-data seeds")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bed = testbed("minilm", args.testbeds)
    work = args.work / "spectral"
    base = load_state(bed / "base")
    units: dict[tuple, State] = {}
    runs: list[dict[str, Any]] = []
    for s in args.seeds:  # the page is rewritten after each seed, marked partial until the end
        runs.append(run_seed(s, bed, work, args.refinetune, units, base))
        write("spectral", report(runs, args.seeds[:len(runs)], args.refinetune, None,
                                 time.perf_counter() - started, args.threads, args.seeds), args.out)
    check = rescale_check(bed, work, base, units)
    text = report(runs, args.seeds, args.refinetune, check, time.perf_counter() - started, args.threads,
                  args.seeds)
    write("spectral", text, args.out)


if __name__ == "__main__":
    main()
