"""Interrupted merges: SIGKILL leaves a resumable temporary folder, `--resume` continues it
byte for byte, later runs report it, and signals, symlinks and full disks leave nothing behind."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from models import LLAMA_CONFIG, load_folder, perturb, save_model

import weightsmith
from weightsmith.errors import OutputError
from weightsmith.io.journal import JOURNAL_NAME, Journal

# Files whose bytes do not depend on timing; merge_report.json and the card carry the seconds.
TIMED = {"merge_report.json", "README.md"}


def ties_recipe(base, models, density=0.5, **extra):
    """TIES with scope: model, so a statistics pass runs before the output pass."""
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": density}} for m in models],
        "parameters": {"scope": "model"},
        "dtype": "float32",
        "out_dtype": "bfloat16",
        **extra,
    }


def leftovers(parent, name="out"):
    return sorted(p for p in Path(parent).iterdir() if p.name.startswith(f".{name}.weightsmith"))


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def assert_same_output(got, want, stats_rel=0.0):
    """Same bytes and the same report; ``stats_rel``: float statistics may differ by this
    relative amount (row blocks of another size sum a tensor's squares in another order)."""
    got_files, want_files = files(got), files(want)
    assert sorted(got_files) == sorted(want_files)
    assert JOURNAL_NAME not in got_files
    for name in got_files:
        if name not in TIMED:
            assert got_files[name] == want_files[name], name
    strip = ("seconds", "stage_seconds", "bytes_written", "resumed")
    got_report, want_report = (json.loads(f["merge_report.json"]) for f in (got_files, want_files))
    for key in strip:
        got_report.pop(key, None), want_report.pop(key, None)
    if stats_rel:
        for key in ("per_tensor", "summary"):
            assert_close(got_report.pop(key), want_report.pop(key), stats_rel, key)
    assert got_report == want_report  # per-tensor statistics and summary included


def assert_close(got, want, rel, where):
    """Equal, floats within ``rel`` (through nested dicts and lists)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for k in want:
            assert_close(got[k], want[k], rel, f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, rel, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rel), where
    else:
        assert got == want, where


def run_cli(args, env_extra=None, code=None, **kw):
    env = {**os.environ, **(env_extra or {})}
    argv = [sys.executable, "-c", code or "from weightsmith.cli import main; main()", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, **kw)


def killed_merge(recipe_path, out, after, *options):
    """Run `weightsmith merge` in a subprocess that SIGKILLs itself after `after` journaled blocks."""
    proc = run_cli(
        ["merge", str(recipe_path), str(out), "-q", *options],
        env_extra={"WEIGHTSMITH_TEST_KILL_AFTER": str(after)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (tmp,) = leftovers(out.parent, out.name)
    lines = (tmp / JOURNAL_NAME).read_text().splitlines()
    assert len(lines) == 1 + after  # header + one entry per block
    return tmp


@pytest.fixture
def setup(family, tmp_path):
    base, models = family
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(yaml.safe_dump(ties_recipe(base, models)))
    reference = tmp_path / "ref" / "out"  # same folder name: the report and card carry it
    weightsmith.merge(str(recipe), reference, out_shard_size="30KB")
    return base, models, recipe, reference


@pytest.mark.parametrize("after", [1, 7, 25])
def test_sigkill_then_resume_is_byte_identical(setup, tmp_path, capfd, after):
    _, _, recipe, reference = setup
    out = tmp_path / "out"
    killed_merge(recipe, out, after, "--out-shard-size", "30KB")
    assert not out.exists()
    capfd.readouterr()
    result = weightsmith.merge(str(recipe), out, out_shard_size="30KB", resume=True)
    err = capfd.readouterr().err
    assert f"resume: {after} written blocks check out" in err
    assert result.stats.reused_blocks == after
    assert result.stats.global_passes >= 1  # the statistics pass ran again
    assert_same_output(out, reference)
    assert not leftovers(tmp_path)


def test_cli_resume_flag_and_a_stale_folder_is_reported_never_deleted(setup, tmp_path):
    _, _, recipe, reference = setup
    out = tmp_path / "out"
    tmp = killed_merge(recipe, out, 4, "--out-shard-size", "30KB")
    # Without --resume: the stale folder is named with its size, age and both commands, then kept.
    proc = run_cli(["merge", str(recipe), str(out), "-q", "--out-shard-size", "30KB"])
    assert proc.returncode == 0, proc.stderr
    assert str(tmp) in proc.stderr and "last written" in proc.stderr and "ago" in proc.stderr
    assert f"weightsmith merge {recipe} {out} --out-shard-size 30KB --resume" in proc.stderr
    assert f"rm -rf {tmp}" in proc.stderr
    assert tmp.is_dir() and (tmp / JOURNAL_NAME).is_file()
    assert_same_output(out, reference)
    # The CLI's --resume (with --overwrite, as OUT now exists) continues the kept folder.
    options = ["--out-shard-size", "30KB", "--overwrite", "--resume"]
    proc = run_cli(["merge", str(recipe), str(out), "-q", *options])
    assert proc.returncode == 0, proc.stderr
    assert "resume: 4 written blocks check out" in proc.stderr
    assert_same_output(out, reference)
    assert not leftovers(tmp_path)


def test_a_resumed_merge_killed_again_resumes_again(setup, tmp_path):
    _, _, recipe, reference = setup
    out = tmp_path / "out"
    tmp = killed_merge(recipe, out, 5, "--out-shard-size", "30KB")
    proc = run_cli(
        ["merge", str(recipe), str(out), "--out-shard-size", "30KB", "--resume", "-q"],
        env_extra={"WEIGHTSMITH_TEST_KILL_AFTER": "6"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert leftovers(tmp_path) == [tmp]  # the same folder, journal appended to
    assert len((tmp / JOURNAL_NAME).read_text().splitlines()) == 1 + 5 + 6
    proc = run_cli(["merge", str(recipe), str(out), "--out-shard-size", "30KB", "--resume"])
    assert proc.returncode == 0, proc.stderr
    assert "resume: 11 written blocks check out" in proc.stderr
    assert "resumed: kept 11 verified blocks" in proc.stdout
    assert_same_output(out, reference)
    assert not leftovers(tmp_path)


def test_resume_with_a_changed_recipe_input_or_option_is_refused(setup, tmp_path):
    base, models, recipe, _ = setup
    out = tmp_path / "out"
    tmp = killed_merge(recipe, out, 3, "--out-shard-size", "30KB")
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(ties_recipe(base, models, density=0.4)))
    with pytest.raises(OutputError, match="recipe") as e:
        weightsmith.merge(str(changed), out, out_shard_size="30KB", resume=True)
    assert "cannot resume" in str(e.value) and f"rm -rf {tmp}" in str(e.value)
    with pytest.raises(OutputError, match="out_shard_size"):
        weightsmith.merge(str(recipe), out, out_shard_size="20KB", resume=True)
    # An input model rewritten with other weights: same names, shapes and sizes.
    state = perturb(load_folder(models[0]), seed=7)
    for f in models[0].glob("*.safetensors"):
        f.unlink()
    save_model(models[0], state, LLAMA_CONFIG, shards=2)
    with pytest.raises(OutputError, match="input models"):
        weightsmith.merge(str(recipe), out, out_shard_size="30KB", resume=True)
    assert not out.exists() and tmp.is_dir()  # refused before touching anything


def test_a_journaled_block_whose_bytes_changed_is_redone(setup, tmp_path, capfd):
    _, _, recipe, reference = setup
    out = tmp_path / "out"
    tmp = killed_merge(recipe, out, 6, "--out-shard-size", "30KB")
    lines = (tmp / JOURNAL_NAME).read_text().splitlines()
    second = json.loads(lines[2])
    with open(tmp / second["shard"], "r+b") as f:
        f.seek(second["offset"] + 1)
        byte = f.read(1)
        f.seek(second["offset"] + 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(tmp / JOURNAL_NAME, "a") as f:
        f.write('{"tensor": "torn by a power lo')  # a torn last line is ignored
    capfd.readouterr()
    weightsmith.merge(str(recipe), out, out_shard_size="30KB", resume=True)
    assert "resume: 5 written blocks check out" in capfd.readouterr().err
    assert_same_output(out, reference)


def test_resume_under_another_memory_budget_redoes_the_blocks_that_moved(family, tmp_path):
    """The budget is not part of the fingerprint (an OOM-killed merge resumes with a smaller
    one); whole tensors journaled before are redone as row blocks, the rest is reused."""
    base, models = family
    recipe = tmp_path / "ta.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
        "parameters": {"lambda": 0.8},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }))
    reference = tmp_path / "ref" / "out"
    weightsmith.merge(str(recipe), reference)
    out = tmp_path / "out"
    killed_merge(recipe, out, 20)
    result = weightsmith.merge(str(recipe), out, memory_budget="6KB", resume=True)
    assert len(result.plan.units) > len(result.plan.tasks)  # really split
    assert 0 < result.stats.reused_blocks < 20
    assert_same_output(out, reference, stats_rel=1e-6)


def test_resume_with_nothing_to_resume_starts_afresh(setup, tmp_path, capfd):
    _, _, recipe, reference = setup
    weightsmith.merge(str(recipe), tmp_path / "out", out_shard_size="30KB", resume=True)
    assert "nothing to resume" in capfd.readouterr().err
    assert_same_output(tmp_path / "out", reference)


def test_a_folder_in_use_by_a_running_merge_is_not_reported(setup, tmp_path, capfd):
    _, _, recipe, _ = setup
    busy = tmp_path / ".out.weightsmith-tmp-running"
    busy.mkdir()
    journal = Journal.create(busy, {"fingerprint": "x", "parts": {}})  # holds the lock
    try:
        capfd.readouterr()
        weightsmith.merge(str(recipe), tmp_path / "out", out_shard_size="30KB")
        assert str(busy) not in capfd.readouterr().err
    finally:
        journal.close()
    assert busy.is_dir()


def test_disk_full_counts_the_space_stale_folders_hold(family, tmp_path, monkeypatch, capfd):
    base, models = family
    stale = tmp_path / ".out.weightsmith-tmp-dead0000"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 200_000)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match="disk full") as e:
        weightsmith.merge(ties_recipe(base, models), tmp_path / "out")
    assert "Interrupted merges" in str(e.value) and "hold 2" in str(e.value)
    assert str(stale) in capfd.readouterr().err and stale.is_dir()


def test_blocks_are_checksummed_only_when_a_journal_records_them(family, tmp_path, monkeypatch):
    # The crc32 pass exists for the resume journal: a run without one (the in-memory writer of
    # `weightsmith search`, a direct execute()) must not pay for it.
    from weightsmith.engine.executor import execute
    from weightsmith.io import journal as journal_module
    from weightsmith.io.writer import ShardWriter

    base, models = family
    plan = weightsmith.plan_merge(ties_recipe(base, models[:2]))
    layout = [(t.name, t.out_dtype, t.shape) for t in plan.tasks]
    summed: list[int] = []
    real = journal_module.checksum
    monkeypatch.setattr(journal_module, "checksum", lambda data: summed.append(len(data)) or real(data))

    (tmp_path / "plain").mkdir()
    writer = ShardWriter(tmp_path / "plain", layout, 1 << 30)
    execute(plan, writer)
    writer.close()
    assert summed == []

    (tmp_path / "journaled").mkdir()
    writer = ShardWriter(tmp_path / "journaled", layout, 1 << 30)
    journal = Journal.create(tmp_path / "journaled", {"fingerprint": "x", "parts": {}})
    execute(plan, writer, journal=journal)
    writer.close()
    journal.close()
    assert len(summed) == len(journal.entries) == len(plan.units)
    for e in journal.entries:  # and the recorded crc32 is that of the bytes on disk
        with open(tmp_path / "journaled" / e.shard, "rb") as f:
            f.seek(e.offset)
            assert e.crc32 == real(f.read(e.nbytes)), e.tensor
