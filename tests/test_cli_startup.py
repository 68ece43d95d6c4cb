"""Start-up: `weightsmith --help` loads neither torch nor the engine (issue 15: it took ~3 s
with torch imported up front); `weightsmith methods` loads the operators but not numba or
transformers. No timings are asserted: which modules load is what decides them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "numba", "transformers", "numpy", "weightsmith.pipeline", "weightsmith.engine.plan")


def loaded_after(code: str) -> set[str]:
    """The modules of HEAVY that are loaded after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(run.stdout.strip().splitlines()[-1]))


def test_importing_the_cli_loads_no_torch() -> None:
    assert loaded_after("import weightsmith.cli") == set()


def test_help_of_every_command_loads_no_torch() -> None:
    code = (
        "from click.testing import CliRunner\nfrom weightsmith.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0 and 'merge' in r.output, r.output\n"
        "for name in main.commands:\n"
        "    r = CliRunner().invoke(main, [name, '--help'])\n"
        "    assert r.exit_code == 0, (name, r.output)"
    )
    assert loaded_after(code) == set()


def test_methods_loads_the_operators_but_not_numba_or_transformers() -> None:
    code = (
        "from click.testing import CliRunner\nfrom weightsmith.cli import main\n"
        "r = CliRunner().invoke(main, ['methods'])\nassert 'task_arithmetic' in r.output, r.output"
    )
    loaded = loaded_after(code)
    assert "torch" in loaded  # the operators are torch functions: the check above is real
    assert not loaded & {"numba", "transformers"}, loaded


def test_the_facade_still_gives_the_public_api() -> None:
    # Loaded on first use, checkpoint arithmetic included (attached by weightsmith.lazy).
    import weightsmith

    assert callable(weightsmith.merge) and callable(weightsmith.plan_merge)
    assert hasattr(weightsmith.Checkpoint, "__sub__")
    assert set(weightsmith.__all__) == set(weightsmith._EXPORTS) | {"__version__"}
    with pytest.raises(AttributeError):
        weightsmith.no_such_name  # noqa: B018


def test_cli_default_budget_is_the_pipelines() -> None:
    from weightsmith import cli, pipeline

    for command in ("merge", "plan"):
        (option,) = [p for p in cli.main.commands[command].params if p.name == "memory_budget"]
        assert option.default == pipeline.DEFAULT_MEMORY_BUDGET


def test_the_finetune_facade_lists_what_it_gives() -> None:
    import weightsmith.finetune as ft

    assert set(ft.__all__) == set(ft._EXPORTS)
    assert ft.TASKS and callable(ft.load_jsonl)


def test_extract_lora_command_names_agree_with_the_library() -> None:
    # The command module keeps copies so `--help` need not load torch through the library.
    from weightsmith import lora_extraction
    from weightsmith.commands import extract_lora

    assert extract_lora.REPORT == lora_extraction.REPORT
