"""Every command ends an error the same way (one line, its exit code, no traceback) and a Ctrl-C
with exit 130 and a TRUE line: nothing left behind, or exactly what it keeps.

The Ctrl-C is simulated at each command's worst moment: everything written, nothing committed
(OutputDir.commit raising KeyboardInterrupt), or inside save_model once the weights are on disk.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from models import save_model

from weightsmith.cli import main
from weightsmith.cli_errors import NOTHING_WRITTEN, WRITES_NOTHING, friendly
from weightsmith.errors import OutputError, RecipeError
from weightsmith.io.output_dir import OutputDir

pytest.importorskip("transformers")


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(res, code: int, words: str) -> None:
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr
    assert "Traceback" not in res.output


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary or backup entries a command may have left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".weightsmith-" in p.name)


def interrupt_commit(monkeypatch: pytest.MonkeyPatch, name: str | None = None) -> list[set[str]]:
    """OutputDir.commit of OUT ``name`` (any OUT when None) raises KeyboardInterrupt, its files
    all written; returns the file names each stopped folder held."""
    stopped: list[set[str]] = []
    commit = OutputDir.commit

    def interrupted(self: OutputDir) -> Path:
        if name is not None and self.out.name != name:
            return commit(self)
        stopped.append({p.name for p in self.tmp.iterdir()})  # the worst moment: all written
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputDir, "commit", interrupted)
    return stopped


# --------------------------------------------------------------------------- the wrapper itself
@click.command()
@click.option("--fail", type=click.Choice(["error", "interrupt", "none"]))
@click.option("--keep", default="log.txt")
@friendly(on_interrupt=lambda p: f"interrupted: {p['keep']} is kept")
def keeping(fail: str, keep: str) -> None:
    if fail == "error":
        raise RecipeError("bad recipe; fix it")
    if fail == "interrupt":
        raise KeyboardInterrupt
    click.echo("done")


@click.command()
@friendly
def plain() -> None:
    assert signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, signal.SIG_DFL)
    raise KeyboardInterrupt


def test_wrapper_error_interrupt_and_what_is_kept() -> None:
    before = signal.getsignal(signal.SIGINT)
    res = CliRunner().invoke(keeping, ["--fail", "error"])
    assert_one_error_line(res, RecipeError.exit_code, "bad recipe; fix it")
    res = CliRunner().invoke(keeping, ["--fail", "interrupt", "--keep", "trials.jsonl"])
    assert res.exit_code == 130 and res.stderr.strip() == "interrupted: trials.jsonl is kept"
    res = CliRunner().invoke(plain)
    assert res.exit_code == 130 and res.stderr.strip() == NOTHING_WRITTEN
    assert CliRunner().invoke(keeping, ["--fail", "none"]).output == "done\n"
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored after each run


def test_every_command_ends_through_the_one_wrapper() -> None:
    bare = [name for name, cmd in main.commands.items()
            if not getattr(cmd.callback, "ends_friendly", False)]
    assert not bare, f"commands without cli_errors.friendly: {bare}"
    assert len(main.commands) >= 13  # merge, plan, push, finetune, eval, testbed, graft, bang, ...


# --------------------------------------------------------------------------- tiny classifiers
def rows(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        out.append({"text": f"{'good' if label else 'bad'} {rng.choice(['film', 'meal', 'song'])}",
                    "label": label})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from weightsmith.testbeds.common import write_jsonl
    from weightsmith.testbeds.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("tiny")
    return {
        "pre": make_tiny_bert(root / "pre", num_labels=2, seed=0, hidden=16, layers=1),
        "ft": make_tiny_bert(root / "ft", num_labels=2, seed=1, hidden=16, layers=1),
        "data": write_jsonl(root / "train.jsonl", rows(8, 0)),
    }


TRAIN = ("--task", "classification", "--steps", "1", "--batch-size", "4", "--max-length", "8",
         "--quiet")


# --------------------------------------------------------------------------- finetune / eval
def test_finetune_error_and_interrupt_while_saving(tiny, tmp_path: Path, monkeypatch) -> None:
    from weightsmith.finetune import trainer

    res = run("finetune", tmp_path / "missing", tmp_path / "out", "--data", tiny["data"], *TRAIN)
    assert_one_error_line(res, 3, "base model folder not found")
    res = run("finetune", tiny["pre"], tiny["pre"], "--data", tiny["data"], *TRAIN, "--overwrite")
    assert_one_error_line(res, OutputError.exit_code, "output folder is the base model folder")

    saved = trainer.save_model

    def save_then_interrupt(model, tokenizer, tokenizer_dir, out_dir):
        saved(model, tokenizer, tokenizer_dir, out_dir)
        assert (out_dir / "model.safetensors").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_model", save_then_interrupt)
    out = tmp_path / "out"
    res = run("finetune", tiny["pre"], out, "--data", tiny["data"], *TRAIN)
    assert res.exit_code == 130 and res.stderr.strip() == NOTHING_WRITTEN, res.output
    assert not out.exists() and not leftovers(tmp_path)
    # --overwrite: the old OUT stays as it was until the new one is complete.
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    res = run("finetune", tiny["pre"], out, "--data", tiny["data"], *TRAIN, "--overwrite")
    assert res.exit_code == 130
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and not leftovers(tmp_path)
    monkeypatch.undo()
    # An empty OUT may be written without --overwrite (as before); a full one may not.
    (out / "mine.txt").unlink()
    res = run("finetune", tiny["pre"], out, "--data", tiny["data"], *TRAIN)
    assert res.exit_code == 0, res.output
    assert {"model.safetensors", "config.json", "train_log.json"} <= {p.name for p in out.iterdir()}
    res = run("finetune", tiny["pre"], out, "--data", tiny["data"], *TRAIN)
    assert_one_error_line(res, OutputError.exit_code, "pass --overwrite")


def test_eval_error_and_interrupt(tiny, monkeypatch) -> None:
    from weightsmith.finetune import evaluation

    res = run("eval", tiny["pre"], "--data", Path(tiny["data"]).with_name("none.jsonl"),
              "--task", "classification")
    assert res.exit_code not in (0, 1) and res.stderr.startswith("error: "), res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate", interrupted)
    res = run("eval", tiny["pre"], "--data", tiny["data"], "--task", "classification")
    assert res.exit_code == 130 and res.stderr.strip() == WRITES_NOTHING


def test_testbed_interrupt_says_the_build_is_unfinished(tmp_path: Path, monkeypatch) -> None:
    import weightsmith.testbeds as testbeds
    from weightsmith.testbeds.common import INFO_NAME, start_build

    def interrupted(name, out, force=False, quiet=False):
        start_build(Path(out))
        raise KeyboardInterrupt

    out = tmp_path / "tb"
    out.mkdir()
    (out / INFO_NAME).write_text("{}")  # an old build's record: a rebuild drops it first
    monkeypatch.setattr(testbeds, "build", interrupted)
    res = run("testbed", "tinylm", out, "--force")
    assert res.exit_code == 130 and "unfinished build" in res.stderr and str(out) in res.stderr
    assert not (out / INFO_NAME).exists()


# --------------------------------------------------------------------------- graft
def test_graft_interrupt_leaves_no_out_and_no_mask(tiny, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "g"
    mask = tmp_path / "g.mask.safetensors"
    args = ("graft", tiny["pre"], tiny["ft"], out, "--data", tiny["data"], "--task",
            "classification", "--sparsity", "0.01", "--steps", "1", "--max-length", "8", "--quiet")
    mask.write_text("an older mask")
    res = run(*args)  # refused before the search
    assert_one_error_line(res, OutputError.exit_code, "choose --mask-out")

    stopped = interrupt_commit(monkeypatch)
    res = run(*args, "--overwrite")
    assert res.exit_code == 130 and res.stderr.strip() == NOTHING_WRITTEN, res.output
    assert {"graft_report.json", "config.json"} <= stopped[0]  # written before the commit
    assert not out.exists() and not leftovers(tmp_path)
    assert mask.read_text() == "an older mask"  # the mask it would have replaced is back
    mask.unlink()
    res = run(*args)
    assert res.exit_code == 130 and not out.exists() and not mask.exists() and not leftovers(tmp_path)

    monkeypatch.undo()
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "graft_report.json").read_text())["mask"] == str(mask) and mask.is_file()
    res = run(*args[:3], tmp_path / "other", *args[4:], "--mask-out", tmp_path / "m2.safetensors")
    assert res.exit_code == 0, res.output
    res = run(*args, "--mask-out", tmp_path / "m3.safetensors")
    assert_one_error_line(res, OutputError.exit_code, "choose another OUT")


def test_mask_until_done_keeps_a_mask_only_when_the_block_completes(tmp_path: Path) -> None:
    from weightsmith.commands.graft import mask_until_done

    mask = tmp_path / "m.safetensors"
    mask.write_text("old")
    with pytest.raises(OutputError), mask_until_done(mask):
        mask.write_text("new")
        raise OutputError("the merge failed")
    assert mask.read_text() == "old" and not leftovers(tmp_path)
    with mask_until_done(mask):
        mask.write_text("new")
    assert mask.read_text() == "new" and not leftovers(tmp_path)


def test_finetune_disk_error_is_one_line(tiny, tmp_path: Path, monkeypatch) -> None:
    from weightsmith.finetune import trainer

    def disk_full(model, tokenizer, tokenizer_dir, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "save_model", disk_full)
    res = run("finetune", tiny["pre"], tmp_path / "out", "--data", tiny["data"], *TRAIN)
    assert_one_error_line(res, OutputError.exit_code, "No space left on device")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# --------------------------------------------------------------------------- bang
def test_bang_interrupt_keeps_only_a_finished_finetune(tiny, tmp_path: Path, monkeypatch) -> None:
    out, kept = tmp_path / "bang", tmp_path / "kept"
    args = ("bang", tiny["pre"], out, "--data", tiny["data"], *TRAIN)
    res = run(*args, "--label-smoothing", "0")
    assert_one_error_line(res, RecipeError.exit_code, "plain WiSE-FT")

    interrupt_commit(monkeypatch, name="bang")
    res = run(*args, "--finetuned", kept)
    assert res.exit_code == 130, res.output
    message = res.stderr.strip()
    assert message.startswith(f"interrupted: {out} was not written") and str(kept) in message
    assert not out.exists() and (kept / "model.safetensors").is_file() and not leftovers(tmp_path)
    res = run(*args)
    assert res.exit_code == 130 and res.stderr.strip().endswith("(the partial output was removed)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


# --------------------------------------------------------------------------- transfer
def test_transfer_interrupts(family, tmp_path: Path, monkeypatch) -> None:
    base, models = family
    res = run("transfer", base, models[0], tmp_path / "missing", tmp_path / "t")
    assert res.exit_code not in (0, 1) and res.stderr.startswith("error: "), res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output

    interrupt_commit(monkeypatch)
    res = run("transfer", base, models[0], models[1], tmp_path / "t")
    assert res.exit_code == 130 and res.stderr.strip() == NOTHING_WRITTEN
    assert not (tmp_path / "t").exists() and not leftovers(tmp_path)


def test_transfer_then_finetune_interrupt_keeps_the_transfer(tmp_path: Path, monkeypatch) -> None:
    from weightsmith.testbeds import seq_tasks as st
    from weightsmith.testbeds.common import write_jsonl
    from weightsmith.testbeds.tiny import make_tiny_llama

    old, new, ft = (make_tiny_llama(tmp_path / n, seed=s, hidden=16, layers=1)
                    for s, n in enumerate(("old", "new", "ft")))
    data = write_jsonl(tmp_path / "train.jsonl", st.sample(st.reverse, 4, seed=3))
    out = tmp_path / "out"
    interrupt_commit(monkeypatch, name="finetuned")
    res = run("transfer", new, ft, old, out, "--then-finetune", "--data", data, "--task",
              "causal-lm", "--steps", "1", "--batch-size", "4", "--quiet")
    assert res.exit_code == 130, res.output
    assert f"{out / 'finetuned'} was not written" in res.stderr
    assert f"{out / 'transferred'} is complete (it was finished before the interrupt)" in res.stderr
    assert [p.name for p in out.iterdir()] == ["transferred"] and not leftovers(tmp_path)
    # An OUT/finetuned the fine-tune would refuse (not empty) is refused before the transfer is
    # written, not after, with the fine-tune's own message.
    monkeypatch.undo()
    (out / "finetuned").mkdir()
    (out / "finetuned" / "mine.txt").write_text("keep")
    (out / "transferred" / "config.json").write_text("{}")  # the transfer must stay as it is
    res = run("transfer", new, ft, old, out, "--then-finetune", "--data", data, "--task",
              "causal-lm", "--steps", "1", "--batch-size", "4", "--quiet")
    assert_one_error_line(res, OutputError.exit_code, f"{out / 'finetuned'}: exists and is not empty")
    assert (out / "transferred" / "config.json").read_text() == "{}"
    assert [p.name for p in (out / "finetuned").iterdir()] == ["mine.txt"]


# --------------------------------------------------------------------------- search
def test_search_interrupt_keeps_the_trial_log(family, tmp_path: Path, monkeypatch) -> None:
    import yaml

    from weightsmith.search import population
    from weightsmith.search.objective import Score

    base, models = family
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(m), "parameters": {"weight": 0.5}} for m in models[:2]]}))
    space = tmp_path / "space.yaml"
    space.write_text("models[0].parameters.weight: [0, 1]\n")
    data = tmp_path / "val.jsonl"
    data.write_text('{"text": "x", "label": 0}\n')
    scored = []

    def objective(candidate):
        if len(scored) == 3:
            raise KeyboardInterrupt
        scored.append(candidate)
        return Score(float(len(scored)), float(len(scored)))

    monkeypatch.setattr(population, "open_pool", lambda *a, **k: population.SequentialPool(objective))
    work, out = tmp_path / "work", tmp_path / "best"
    args = ("search", recipe, "--space", space, "--eval", data, "--task", "classification",
            "--trials", "6", "--popsize", "2", "--workdir", work, "--quiet")
    res = run(*args, "--out", out)
    assert res.exit_code == 130, res.output
    assert res.stderr.strip() == (f"interrupted: the trials finished so far stay logged in {work} "
                                  f"(continue with --resume); {out} was not written")
    assert len((work / "trials.jsonl").read_text().splitlines()) >= 3 and not out.exists()
    res = run(*args)
    assert_one_error_line(res, OutputError.exit_code, "pass --resume")


# --------------------------------------------------------------------------- extract-lora
def test_extract_lora_error_and_interrupt(tmp_path: Path, monkeypatch) -> None:
    from models import LLAMA_CONFIG, perturb, random_state

    state = random_state(LLAMA_CONFIG, 0)
    base = save_model(tmp_path / "base", state, LLAMA_CONFIG)
    ft = save_model(tmp_path / "ft", perturb(state, 1), LLAMA_CONFIG)
    (tmp_path / "full").mkdir()
    res = run("extract-lora", ft, base, tmp_path / "full", "--rank", "2", "--quiet")
    assert_one_error_line(res, OutputError.exit_code, "--overwrite")
    interrupt_commit(monkeypatch)
    res = run("extract-lora", ft, base, tmp_path / "lora", "--rank", "2", "--quiet")
    assert res.exit_code == 130 and res.stderr.strip() == NOTHING_WRITTEN, res.output
    assert not (tmp_path / "lora").exists() and not leftovers(tmp_path)


# --------------------------------------------------------------------------- merge / push / plan
def two_stages(base: Path, models: list[Path]) -> str:
    linear = "merge_method: linear\ndtype: float32\nmodels:\n"
    return (f"{linear}  - model: first\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {models[2]}\n    parameters: {{weight: 0.5}}\n---\nname: first\n{linear}"
            + "".join(f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in models[:2]))


def test_merge_interrupt_names_the_finished_stages_it_keeps(family, tmp_path: Path, monkeypatch) -> None:
    base, models = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(two_stages(base, models))
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    res = run("merge", recipe, out, "--stage-cache", cache, "-q")
    assert_one_error_line(res, OutputError.exit_code, "--overwrite")
    out.rmdir()
    interrupt_commit(monkeypatch, name="out")
    res = run("merge", recipe, out, "--stage-cache", cache, "-q")
    assert res.exit_code == 130, res.output
    assert res.stderr.strip() == (f"interrupted: {out} was not written (the partial output was "
                                  f"removed); the stages that had finished stay in {cache} and "
                                  "the next run reuses them")
    assert not out.exists() and not leftovers(tmp_path) and not leftovers(cache)
    assert [(p / "merge_report.json").is_file() for p in cache.iterdir()] == [True]  # stage `first`
    single = tmp_path / "single.yaml"
    single.write_text(two_stages(base, models).split("---\nname: first\n")[1])
    res = run("merge", single, out, "-q")
    assert res.exit_code == 130 and res.stderr.strip() == f"interrupted: {out} was not written " \
        "(the partial output was removed)"


def interrupt_after_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """OutputDir.commit renames OUT into place, then a Ctrl-C arrives before the command ends."""
    commit = OutputDir.commit

    def committed_then_interrupted(self: OutputDir) -> Path:
        commit(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputDir, "commit", committed_then_interrupted)


def test_an_interrupt_after_the_final_rename_says_out_is_complete(family, tiny, tmp_path: Path,
                                                                  monkeypatch) -> None:
    base, models = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(two_stages(base, models).split("---\nname: first\n")[1])
    interrupt_after_commit(monkeypatch)
    out = tmp_path / "out"
    res = run("merge", recipe, out, "-q")
    assert res.exit_code == 130, res.output
    assert res.stderr.strip() == f"interrupted: {out} is complete (it was finished before the interrupt)"
    assert (out / "merge_report.json").is_file() and not leftovers(tmp_path)
    res = run("finetune", tiny["pre"], tmp_path / "ft", "--data", tiny["data"], *TRAIN)
    assert res.exit_code == 130
    assert res.stderr.strip() == f"interrupted after {tmp_path / 'ft'} was complete: kept as written"
    assert (tmp_path / "ft" / "model.safetensors").is_file()
    # The next command's message does not count what this one finished.
    monkeypatch.undo()
    interrupt_commit(monkeypatch)
    res = run("finetune", tiny["pre"], tmp_path / "ft2", "--data", tiny["data"], *TRAIN)
    assert res.exit_code == 130 and res.stderr.strip() == NOTHING_WRITTEN


def test_push_and_plan_interrupts(family, tmp_path: Path, monkeypatch) -> None:
    import weightsmith.io.hub_push as hub_push
    import weightsmith.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    base, models = family
    monkeypatch.setattr(hub_push, "push_to_hub", interrupted)
    res = run("push", base, "me/model")
    assert res.exit_code == 130 and "nothing was committed to me/model" in res.stderr
    monkeypatch.setattr(pipeline, "plan_merge", interrupted)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(two_stages(base, models).split("---\nname: first\n")[1])
    res = run("plan", recipe)
    assert res.exit_code == 130 and res.stderr.strip() == WRITES_NOTHING
