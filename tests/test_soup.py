"""Model soups: uniform soup arithmetic, greedy selection logic and memory, end to end."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from classifier_family import labelled_by, noisy_copy, random_sentences, write_jsonl
from models import load_folder, save_model
from safetensors.torch import load_file, save_file

from weightsmith.errors import MergeError, RecipeError
from weightsmith.greedy_soup import greedy_soup, rank
from weightsmith.ops.registry import MergeInputs, get_method
from weightsmith.pipeline import merge, plan_merge


def soup_recipe(models: list[Path], mode: str = "uniform", **extra: object) -> dict[str, object]:
    return {"merge_method": "soup", "models": [str(m) for m in models], "parameters": {"mode": mode}, **extra}


# --------------------------------------------------------------------------- uniform
def test_uniform_soup_of_identical_models_is_that_model(family, tmp_path: Path) -> None:
    _, models = family
    ft = models[0]
    merged = load_folder(merge(soup_recipe([ft, ft]), tmp_path / "out").out)
    original = load_folder(ft)
    assert merged.keys() == original.keys()
    for k, v in original.items():
        # (x + x) / 2 is exact in any binary float format.
        assert torch.equal(merged[k], v), k


def test_uniform_soup_equals_linear_with_equal_weights(family, tmp_path: Path) -> None:
    _, models = family
    soup = load_folder(merge(soup_recipe(models), tmp_path / "soup").out)
    linear = load_folder(merge({"merge_method": "linear", "models": [str(m) for m in models],
                                "parameters": {"weight": 1.0}}, tmp_path / "linear").out)
    states = [load_folder(m) for m in models]
    for k in soup:
        assert torch.equal(soup[k], linear[k]), k
        if soup[k].dtype.is_floating_point:
            mean = sum(s[k].float() for s in states) / len(states)
            torch.testing.assert_close(soup[k].float(), mean, atol=1e-2, rtol=1e-2)
    report = json.loads((tmp_path / "soup" / "merge_report.json").read_text())
    assert report["summary"]["mode"] == "uniform"
    assert report["summary"]["ingredients"] == [str(m) for m in models]


def test_soup_config_errors(family, tmp_path: Path) -> None:
    base, models = family
    with pytest.raises(RecipeError, match="takes uniform | greedy"):
        plan_merge(soup_recipe(models, mode="fancy"))
    with pytest.raises(RecipeError, match="needs held-out data"):
        plan_merge(soup_recipe(models, mode="greedy"))
    evaluation = {"data": "val.jsonl", "task": "classification"}
    with pytest.raises(RecipeError, match="mode: greedy only"):
        plan_merge(soup_recipe(models, evaluation=evaluation))
    with pytest.raises(RecipeError, match="no base_model"):
        plan_merge({**soup_recipe(models), "base_model": str(base)})
    with pytest.raises(RecipeError, match="unknown field"):
        plan_merge(soup_recipe(models, mode="greedy", evaluation={**evaluation, "split": "val"}))
    with pytest.raises(RecipeError, match="evaluation.task` is required"):
        plan_merge(soup_recipe(models, mode="greedy", evaluation={"data": "val.jsonl"}))
    with pytest.raises(RecipeError, match="not used by merge_method: linear"):
        plan_merge({"merge_method": "linear", "models": [str(m) for m in models],
                    "parameters": {"weight": 1.0}, "evaluation": evaluation})


def test_greedy_operator_refuses_to_run_without_selection() -> None:
    method = get_method("soup")
    with pytest.raises(MergeError, match="held-out data first"):
        method(MergeInputs("w", torch.ones(2, 3)), mode="greedy")


# --------------------------------------------------------------------------- greedy logic
MARKER = (7, 13)  # a shape no other tensor in these tests has: counts resident model copies


def ingredients(values: list[float]) -> dict[int, dict[str, torch.Tensor]]:
    return {i: {"w": torch.full(MARKER, v), "b": torch.full((3,), v)} for i, v in enumerate(values)}


def in_memory_loader(states: dict[int, dict[str, torch.Tensor]]):
    def load(i: int):
        for name, tensor in states[i].items():
            yield name, tensor.clone()  # fresh tensors, as a checkpoint read gives

    return load


def peak_score(target: float):
    """Score = -|mean(w) - target|: higher is better, best where the soup's mean hits target."""
    calls: list[float] = []

    def score(weights) -> float:
        pairs = dict(weights.items() if isinstance(weights, dict) else weights())
        calls.append(float(pairs["w"].mean()))
        return -abs(float(pairs["w"].mean()) - target)

    return score, calls


def test_greedy_orders_by_score_and_accepts_only_strict_improvements() -> None:
    # Alone: 1.0 is best (target 1.2), then 2.0, 0.0, 3.0.
    states = ingredients([0.0, 1.0, 2.0, 3.0])
    score, calls = peak_score(1.2)
    result = greedy_soup(4, in_memory_loader(states), score)
    assert result.order == (1, 2, 0, 3)
    assert calls[:4] == [0.0, 1.0, 2.0, 3.0]  # every ingredient scored alone, input order
    # Candidates: {1,2} mean 1.5 (|0.3| > |0.2|: rejected); {1,0} mean 0.5 (rejected);
    # {1,3} mean 2.0 (rejected).
    assert calls[4:] == [1.5, 0.5, 2.0]
    assert [ok for _, _, ok in result.steps] == [False, False, False]
    assert result.chosen == (1,)
    # Target 1.6: {1,2} (1.5) improves on 1.0 alone; then {1,2,0} = 1.0 is worse; {1,2,3} = 2.0
    # is |0.4| vs |0.1|: worse.
    score, calls = peak_score(1.6)
    result = greedy_soup(4, in_memory_loader(states), score)
    assert result.order == (2, 1, 3, 0)
    assert calls[4:] == [1.5, 2.0, 1.0]
    assert result.chosen == (2, 1)
    assert result.score == pytest.approx(-0.1)


def test_greedy_rejects_equal_scores() -> None:
    states = ingredients([1.0, 1.0, 1.0])
    result = greedy_soup(3, in_memory_loader(states), lambda w: 0.5)
    assert result.chosen == (0,)  # ties keep recipe order, and an equal score is no improvement
    assert [ok for _, _, ok in result.steps] == [False, False]


def test_greedy_lower_is_better_and_nan_ranks_last() -> None:
    assert rank([0.3, 0.1, float("nan"), 0.2], higher_is_better=False) == [1, 3, 0, 2]
    assert rank([0.3, 0.1, float("nan"), 0.3], higher_is_better=True) == [0, 3, 1, 2]
    states = ingredients([0.0, 4.0, 1.0])

    def loss(weights) -> float:  # lower is better; the ingredients' mean 1.0 is ideal
        pairs = dict(weights.items() if isinstance(weights, dict) else weights())
        return abs(float(pairs["w"].mean()) - 1.0)

    result = greedy_soup(3, in_memory_loader(states), loss, higher_is_better=False)
    assert result.order == (2, 0, 1)
    assert result.chosen == (2,)  # {1.0, 0.0} -> 0.5 is worse; {1.0, 4.0} -> 2.5 is worse


def test_greedy_single_ingredient_is_it() -> None:
    states = ingredients([0.25])
    result = greedy_soup(1, in_memory_loader(states), lambda w: 1.0)
    assert result.chosen == (0,) and result.steps == ()


@pytest.mark.slow  # counts live tensors through a whole greedy selection
def test_greedy_holds_at_most_soup_and_one_candidate(tmp_path: Path) -> None:
    """Count live tensors of the marker shape at every evaluation: the ingredients come from
    disk one at a time, so at most the soup and the candidate being scored may be resident."""
    paths = []
    for i in range(6):
        p = tmp_path / f"ing{i}.safetensors"
        save_file({"w": torch.full(MARKER, float(i)), "b": torch.full((3,), float(i))}, str(p))
        paths.append(p)

    def load(i: int):
        yield from load_file(str(paths[i])).items()

    resident: list[int] = []

    def live_copies() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and tuple(o.shape) == MARKER)

    def score(weights) -> float:
        pairs = dict(weights.items() if isinstance(weights, dict) else weights())
        mean = float(pairs["w"].mean())
        del pairs
        resident.append(live_copies())
        # Alternating preference so some candidates are accepted and some rejected.
        return -abs(mean - 2.6)

    result = greedy_soup(6, load, score)
    assert any(ok for _, _, ok in result.steps) and not all(ok for _, _, ok in result.steps)
    assert len(resident) == 6 + 5
    assert max(resident[:6]) <= 1, resident  # scoring alone: only the ingredient streamed in
    assert max(resident[6:]) <= 2, resident  # then: the soup and one candidate, never more


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def bert_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """A tiny classifier A, two bad copies of it, and validation labels = A's predictions."""
    from weightsmith.testbeds.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("soup")
    good = make_tiny_bert(root / "a", num_labels=2, seed=1)
    g = torch.Generator().manual_seed(0)
    # Noise everywhere and a negated head: two classes, so their predictions flip.
    models = [good] + [noisy_copy(good, root / f"noisy{i}", scale, g) for i, scale in enumerate((0.1, 0.3))]
    val = write_jsonl(root / "val.jsonl", labelled_by(good, random_sentences(40), root / "draft.jsonl"))
    return models, val


def test_greedy_soup_end_to_end(bert_family, tmp_path: Path) -> None:
    models, val = bert_family
    # Recipe order puts the perfect model last: the sort must still start from it.
    order = [models[1], models[2], models[0]]
    recipe = soup_recipe(order, mode="greedy",
                         evaluation={"data": str(val), "task": "classification", "metric": "accuracy"})
    result = merge(recipe, tmp_path / "greedy")
    report = json.loads((result.out / "merge_report.json").read_text())
    summary = report["summary"]
    assert summary["mode"] == "greedy" and summary["metric"] == "accuracy"
    scores = {row["model"]: row["score"] for row in summary["ingredients"]}
    assert scores[str(models[0])] == 1.0  # labels are its own predictions
    assert len(summary["ingredients"]) == 3 and len(summary["steps"]) == 2
    assert all("candidate_score" in s for s in summary["steps"])
    # Nothing beats a perfect score strictly, so the soup is model A alone, bit for bit.
    assert summary["chosen"] == [str(models[0])]
    assert [i["model"] for i in report["inputs"]] == [str(models[0])]
    out = load_folder(result.out)
    ref = load_file(str(models[0] / "model.safetensors"))
    assert out.keys() == ref.keys()
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    assert (result.out / "config.json").is_file() and (result.out / "README.md").is_file()


def test_greedy_soup_rejects_an_equal_candidate(bert_family, tmp_path: Path) -> None:
    models, val = bert_family
    recipe = soup_recipe([models[0], models[0]], mode="greedy",
                         evaluation={"data": str(val), "task": "classification", "metric": "loss"})
    result = merge(recipe, tmp_path / "same")
    summary = json.loads((result.out / "merge_report.json").read_text())["summary"]
    # The same model twice: the candidate equals the soup, so its loss is not strictly lower.
    assert summary["higher_is_better"] is False
    assert summary["steps"][0]["accepted"] is False
    assert summary["chosen"] == [str(models[0])]


class FakeEvaluator:
    """Stands in for finetune.Evaluator: scores by how close one tensor's mean is to a target."""

    target = 0.0
    metric = "closeness"
    higher_is_better = True

    def __init__(self, model_dir, data, task, **kwargs) -> None:
        self.key = "model.norm.weight"

    def score(self, weights) -> float:
        pairs = dict(weights.items() if isinstance(weights, dict) else weights())
        return -abs(float(pairs[self.key].mean()) - self.target)


def test_greedy_soup_writes_the_average_of_the_chosen(tmp_path: Path, monkeypatch) -> None:
    from models import LLAMA_CONFIG, random_state

    import weightsmith.finetune.evaluator as evaluator_module

    base = random_state(LLAMA_CONFIG, seed=0, dtype=torch.float32)
    folders = []
    for i, shift in enumerate((0.0, 1.0, 2.0, 10.0)):
        state = {k: v + shift if k == "model.norm.weight" else v + 0.01 * i for k, v in base.items()}
        folders.append(save_model(tmp_path / f"m{i}", state, LLAMA_CONFIG, shards=1))
    mean_norm = float(base["model.norm.weight"].mean())
    FakeEvaluator.target = mean_norm + 0.6  # best alone: shift 1 (0.4 off), then 0 (0.6 off)
    monkeypatch.setattr(evaluator_module, "Evaluator", FakeEvaluator)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": 0}])
    recipe = soup_recipe(folders, mode="greedy", evaluation={"data": str(val), "task": "classification"})
    result = merge(recipe, tmp_path / "out")
    summary = json.loads((result.out / "merge_report.json").read_text())["summary"]
    # {1, 0}: shift 0.5, 0.1 off -> kept; {1, 0, 2}: shift 1.0 -> 0.4 off, rejected;
    # {1, 0, 10}: far off, rejected.
    assert summary["chosen"] == [str(folders[1]), str(folders[0])]
    assert [s["accepted"] for s in summary["steps"]] == [True, False, False]
    assert [s["soup_size"] for s in summary["steps"]] == [2, 2, 2]
    assert summary["soup_score"] == pytest.approx(-0.1, abs=1e-5)
    out = load_folder(result.out)
    a, b = load_folder(folders[1]), load_folder(folders[0])
    for k in out:
        assert torch.equal(out[k], (b[k] + a[k]) / 2), k  # the uniform soup of the chosen two
