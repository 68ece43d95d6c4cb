"""Recipe search on the MiniLM testbed (issue 18): a tiny CMA-ES budget over a task-arithmetic
recipe's weights and lambda, scored under each task's own head.

The slow test reuses the testbed build of tests/test_testbed.py (kept between runs; in CI the
build is shared with test_build_minilm). Search split: the first SEARCH_ROWS rows of each
task's ``val.jsonl``; held-out split: its whole ``test.jsonl``. Metric: loss (continuous, so a
better recipe shows even where every candidate is 100% accurate). docs/search.md quotes the
figures this test prints (``-s``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from weightsmith.search.space import Space

pytest.importorskip("transformers")
pytest.importorskip("cma")

# The example in merges/ (minilm-search.yaml, spaces/minilm-search.yaml, search_minilm.py) is
# what this test runs, so docs/search.md's figures are the example's.
MERGES = Path(__file__).resolve().parent.parent / "merges"
TASKS = ("sentiment", "topic", "question", "formality")  # the recipe's models, in order
SEARCH_ROWS = 32
TRIALS = 8
SEED = 0
SPACE = Space.load(MERGES / "spaces" / "minilm-search.yaml")


def minilm_recipe(bed: Path) -> dict[str, object]:
    """The recipe as written (the default the search must not lose to): equal weights, lambda 1."""
    text = (MERGES / "minilm-search.yaml").read_text().replace("inputs/minilm/", f"{bed}/")
    recipe = yaml.safe_load(text)
    assert [m["model"] for m in recipe["models"]] == [f"{bed}/ft-{t}" for t in TASKS]
    return recipe


def disk_scores(folder: Path, heads: list, metric: str) -> dict[str, float]:
    """Each head's metric for the merged encoder read back from disk, in fresh models."""
    from weightsmith.finetune import Evaluator
    from weightsmith.finetune.modeling import KeyResolver

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    out = {}
    for head in heads:
        ev = Evaluator(head.model_dir, head.data, "classification", metric=metric, max_length=48)
        resolver = KeyResolver(ev.model)
        out[head.name] = ev.score({k: v for k, v in tensors.items() if resolver.resolve(k) is not None})
    return out


# --------------------------------------------------------------------------- fast: the objective
def test_heads_objective_scores_one_merge_under_each_head(tmp_path: Path) -> None:
    from weightsmith.pipeline import merge
    from weightsmith.search.heads import Head, HeadsObjective
    from weightsmith.testbeds.tiny import make_tiny_bert

    base = make_tiny_bert(tmp_path / "base", seed=0)
    a = make_tiny_bert(tmp_path / "a", num_labels=2, seed=1)
    b = make_tiny_bert(tmp_path / "b", num_labels=3, seed=2)  # another head shape: not merged
    rows = ["the cat sat", "a river runs", "stone and cloud", "tiger lamp zebra", "violin"]
    for name, labels in (("a", 2), ("b", 3)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": t, "label": i % labels}) + "\n" for i, t in enumerate(rows)))
    heads = [Head("a", a, tmp_path / "a.jsonl"), Head("b", b, tmp_path / "b.jsonl")]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                         {"model": str(b), "parameters": {"weight": 0.5}}],
              "parameters": {"lambda": 0.8}, "extra_keys": "ignore"}
    objective = HeadsObjective(recipe, heads, metric="loss", max_length=48)
    assert not objective.higher_is_better
    # A second recipe first: the scores of the first must not depend on what was merged before.
    other = {**recipe, "parameters": {"lambda": 0.1}}
    assert objective.scores(other) != objective.scores(recipe)
    scores = objective.scores(recipe)
    # Fresh models of each head, loaded from the merge on disk: head b's model in the objective
    # got the merged backbone too (its own folder's backbone would score otherwise).
    expected = disk_scores(merge(recipe, tmp_path / "out").out, heads, "loss")
    assert scores == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert objective(recipe).value == pytest.approx(sum(scores.values()) / 2)


# --------------------------------------------------------------------------- slow: the testbed
def per_task(metrics: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{t} {m['loss']:.4f} / {m['accuracy']:.3f}" for t, m in metrics.items())


def subset(src: Path, dst: Path, rows: int) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:rows]))
    return dst


@pytest.mark.slow
def test_search_on_the_minilm_testbed_beats_the_default_on_held_out_data(tmp_path: Path) -> None:
    from test_testbed import kept_build

    from weightsmith.finetune.runtime import fixed_threads
    from weightsmith.pipeline import merge
    from weightsmith.search.heads import Head, HeadsObjective
    from weightsmith.search.optimizer import search
    from weightsmith.search.report import write_outputs

    started, cpu = time.perf_counter(), time.process_time()
    bed, _ = kept_build("minilm")
    built = time.perf_counter()
    recipe = minilm_recipe(bed)
    search_heads = [Head(t, bed / f"probe-{t}", subset(bed / "data" / t / "val.jsonl",
                                                       tmp_path / "search" / f"{t}.jsonl", SEARCH_ROWS))
                    for t in TASKS]
    held_heads = [Head(t, bed / f"probe-{t}", bed / "data" / t / "test.jsonl") for t in TASKS]
    options = {"metric": "loss", "max_length": 48, "batch_size": 64, "random_seed": SEED}
    with fixed_threads(1):  # one thread: the same float sums on every run of this machine
        objective = HeadsObjective(recipe, search_heads, **options)
        assert not objective.higher_is_better
        runs = [search(SPACE, recipe, objective, trials=TRIALS, log_path=tmp_path / f"run{i}.jsonl",
                       higher_is_better=False, seed=SEED, popsize=4) for i in (1, 2)]
        first, second = runs
        best = SPACE.apply(recipe, first.best_trial.unit)

        # (b) The same seed gives the same trial table and the same best recipe.
        assert (tmp_path / "run1.jsonl").read_text() == (tmp_path / "run2.jsonl").read_text()
        assert second.best == first.best
        assert SPACE.apply(recipe, second.best_trial.unit) == best
        assert len(first.trials) == TRIALS and first.trials[0].params == {
            **{f"models[{i}].parameters.weight": 1.0 for i in range(len(TASKS))}, "parameters.lambda": 1.0}
        assert first.best_trial.score <= first.trials[0].score  # trial 0 is the recipe as written

        # (a) On held-out data the best recipe is at least as good as the recipe as written.
        held = HeadsObjective(recipe, held_heads, **options)
        default_metrics, best_metrics = held.metrics(recipe), held.metrics(best)
        default_scores, best_scores = ({t: m["loss"] for t, m in ms.items()}
                                       for ms in (default_metrics, best_metrics))
        default, found = (sum(s.values()) / len(s) for s in (default_scores, best_scores))
        assert found <= default, (default_scores, best_scores)

        # (c) Merged to disk normally, the best recipe scores as it did in memory.
        out = merge(best, tmp_path / "best", threads=1).out
        on_disk = disk_scores(out, held_heads, "loss")
    assert on_disk == pytest.approx(best_scores, rel=1e-6, abs=1e-7)
    write_outputs(first, best, tmp_path / "work")
    table = json.loads((tmp_path / "work" / "trials.json").read_text())
    assert table["best_trial"] == first.best and len(table["trials"]) == TRIALS

    done = time.perf_counter()
    print(f"\nMiniLM search: tasks {', '.join(TASKS)}; {TRIALS} trials x 2 runs (seed {SEED}); "
          f"search split {SEARCH_ROWS} val rows/task, held-out = test (200 rows/task)\n"
          f"  held-out mean loss: default {default:.4f} -> best {found:.4f} (trial {first.best}: "
          f"{json.dumps({k: round(v, 3) for k, v in first.best_trial.params.items()})})\n"
          f"  search-split mean loss per trial: {', '.join(f'{t.score:.4f}' for t in first.trials)}\n"
          f"  per task, loss / accuracy: default {per_task(default_metrics)}\n"
          f"                             best    {per_task(best_metrics)}\n"
          f"  wall: testbed {built - started:.1f} s, search + checks {done - built:.1f} s; "
          f"CPU (this process) {time.process_time() - cpu:.1f} s")
