"""`weightsmith search --executor ray`: candidates scored on Ray actors (each built once with
its inputs and its own live model) write the trial log a sequential search writes under the
same seed; an actor killed mid-trial is restarted and the search ends with the same log;
resume from a cut log works on Ray too. A local cluster, started here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_search import SPACE, family, linear_recipe  # noqa: F401  (family: the fixture)

from weightsmith.search.ray_pool import DIE_ONCE_ENV, RayPool

ray = pytest.importorskip("ray")
pytest.importorskip("transformers")
pytest.importorskip("cma")

TRIALS, POPSIZE, SEED = 7, 3, 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """127.0.0.1, four logical CPUs, no dashboard. Four, not two: the module's ``pool`` holds two
    actors (one CPU each) until the module ends, and the two-head test starts two more; with two
    CPUs its actors would wait for resources forever. Actors inherit this environment, so the
    die-once marker path is set before the cluster starts (a cluster another module left is
    replaced)."""
    if ray.is_initialized():
        ray.shutdown()
    marker = tmp_path_factory.mktemp("ray-search") / "die-once"
    os.environ[DIE_ONCE_ENV] = str(marker)
    ray.init(num_cpus=4, include_dashboard=False, address="local", log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield marker
    ray.shutdown()
    os.environ.pop(DIE_ONCE_ENV, None)


@pytest.fixture(scope="module")
def local_log(family, tmp_path_factory) -> Path:  # noqa: F811
    """The sequential search's trial log: what every Ray run must reproduce."""
    from weightsmith.search.objective import Objective
    from weightsmith.search.optimizer import search

    log = tmp_path_factory.mktemp("local") / "trials.jsonl"
    recipe = linear_recipe(family)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as an actor runs (Ray's OMP_NUM_THREADS=1): much faster on busy cores
    try:
        search(SPACE, recipe, Objective(recipe, family["val"], "classification", random_seed=SEED),
               trials=TRIALS, log_path=log, seed=SEED, popsize=POPSIZE)
    finally:
        torch.set_num_threads(threads)
    return log


@pytest.fixture(scope="module")
def pool(cluster, family):  # noqa: F811
    """Two actors, built once for the module (each loads a model: the slow part)."""
    args = dict(recipe=linear_recipe(family), data=str(family["val"]), task="classification",
                random_seed=SEED)
    with RayPool(args, workers=2) as pool:
        yield pool


@pytest.mark.slow
def test_ray_search_writes_the_sequential_trial_log(pool, family, local_log, tmp_path: Path) -> None:  # noqa: F811
    from weightsmith.search.optimizer import search

    assert pool.higher_is_better and len(pool.actors) == 2
    log = tmp_path / "trials.jsonl"
    result = search(SPACE, linear_recipe(family), pool, trials=TRIALS, log_path=log, seed=SEED,
                    popsize=POPSIZE)
    # Same parameters, same scores, same order: the very same lines.
    assert log.read_text() == local_log.read_text()
    assert result.best_trial.score == max(t.score for t in result.trials)
    assert ray.is_initialized()  # the test's cluster was used, not shut down by the pool


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_a_resumed_ray_search_ends_the_same(
    cluster, pool, family, local_log, tmp_path: Path  # noqa: F811
) -> None:
    from weightsmith.search.optimizer import search

    lines = local_log.read_text().splitlines(keepends=True)
    log = tmp_path / "trials.jsonl"
    log.write_text("".join(lines[:3]) + lines[3][:25])  # killed while logging trial 3
    cluster.write_text("")  # the first actor to score a candidate removes it and dies
    result = search(SPACE, linear_recipe(family), pool, trials=TRIALS, log_path=log, seed=SEED,
                    popsize=POPSIZE)
    assert not cluster.exists()  # an actor did die (and its candidate was scored again)
    rss = pool.peak_rss()  # both actors answer: the dead one was restarted
    assert len(rss) == 2 and all(r > 0 for r in rss)
    assert log.read_text() == local_log.read_text()
    assert len(result.trials) == TRIALS


@pytest.mark.slow
def test_a_two_head_ray_search_writes_the_sequential_trial_log(
    cluster, family, tmp_path: Path, monkeypatch, capsys  # noqa: F811
) -> None:
    """``--head`` arguments travel to the actors: each builds the same HeadsObjective. Actors
    still loading when the pool's patience runs out (0 s here) get a warning naming the CPUs
    they wait for, and the pool then works as usual."""
    import weightsmith.search.ray_pool as ray_pool

    monkeypatch.setattr(ray_pool, "READY_NOTE_S", 0.0)
    from weightsmith.search.heads import Head
    from weightsmith.search.objective_args import build_objective
    from weightsmith.search.optimizer import search
    from weightsmith.search.population import SequentialPool

    args = dict(recipe=linear_recipe(family), task="classification", metric="loss", random_seed=SEED,
                heads=[Head("good", str(family["good"]), str(family["val"])),
                       Head("bad", str(family["bad"]), str(family["held_out"]))])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as an actor runs
    try:
        local = SequentialPool(build_objective(args))
        search(SPACE, linear_recipe(family), local, trials=5, log_path=tmp_path / "local.jsonl",
               higher_is_better=local.higher_is_better, seed=SEED, popsize=POPSIZE)
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    with RayPool(args, workers=2) as pool:
        assert "search actors have not started after 0 s" in capsys.readouterr().err
        assert not pool.higher_is_better  # the loss: the heads' objective's direction came back
        search(SPACE, linear_recipe(family), pool, trials=5, log_path=tmp_path / "ray.jsonl",
               higher_is_better=False, seed=SEED, popsize=POPSIZE)
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()


@pytest.mark.slow
def test_more_workers_than_the_cluster_has_cpus_is_refused(cluster, family) -> None:  # noqa: F811
    """Each actor takes one CPU: a pool larger than the cluster would wait forever, so it is
    refused with the count that fits (the module's cluster has four CPUs)."""
    from weightsmith.errors import RecipeError

    args = dict(recipe=linear_recipe(family), data=str(family["val"]), task="classification")
    refusal = r"--ray-workers 5: the Ray cluster has 4 CPU\(s\).*--ray-workers 4 or fewer"
    with pytest.raises(RecipeError, match=refusal):
        RayPool(args, workers=5)
    assert ray.is_initialized()  # the module's cluster, not started by the pool, is left running
