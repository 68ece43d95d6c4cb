"""The package's layers (docs/architecture.md): every import, function-level ones included, goes
to the importer's own layer or one below it, and no chain of imports comes back to its start."""

import ast
import os
import shutil
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "weightsmith"
# Top-level module or folder -> layer. `engine` and `finetune`/`testbeds` stand side by side.
LAYER = {"errors": 0, "units": 0, "version": 0, "progress": 0, "notices": 0, "model_ref": 0,
         "dtype_names": 0, "finished_outputs": 0,
         "cli_errors": 0,  # cli_errors: so finetune's commands share it
         "recipe": 1, "recipe_slices": 1, "recipe_settings": 1, "recipe_refs": 1,
         "recipe_tokenizer": 1, "io": 1, "ops": 2, "engine": 3, "finetune": 3, "testbeds": 3,
         "cli": 5}  # anything else (pipeline, lazy, ...) is 4
NEVER = {("engine", "finetune"), ("engine", "testbeds"), ("finetune", "engine"),
         ("testbeds", "engine"), ("io", "recipe"), ("recipe", "io")}
ENGINE_USES_FROM_OPS = {"weightsmith.ops.registry", "weightsmith.ops.statistics"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("weightsmith", *parts)).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import, at any depth
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                targets |= subs or {node.module}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def group(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_import_goes_down_or_sideways():
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            a, b = group(module), group(target)
            up = LAYER.get(b, 4) > LAYER.get(a, 4) or (a, b) in NEVER
            engine_math = a == "engine" and b == "ops" and target not in ENGINE_USES_FROM_OPS
            if up or engine_math:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports running up the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph, done, path = import_graph(), set(), []

    def visit(module: str) -> None:
        assert module not in path, "import cycle: " + " -> ".join([*path[path.index(module):], module])
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_rules_catch_a_wrong_import(tmp_path, monkeypatch):
    # The two tests above must be able to fail: an io module importing the pipeline breaks both.
    fake = tmp_path / "weightsmith"
    shutil.copytree(PACKAGE, fake, ignore=shutil.ignore_patterns("__pycache__"))
    reader = fake / "io" / "checkpoint.py"
    reader.write_text(reader.read_text() + "\n\ndef _up():\n    from weightsmith.pipeline import merge\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    for rule in (test_every_import_goes_down_or_sideways, test_no_import_cycle):
        try:
            rule()
        except AssertionError as e:
            assert "io.checkpoint" in str(e)
        else:
            raise AssertionError(f"{rule.__name__} missed io/checkpoint.py importing the pipeline")


def test_a_new_method_is_one_file(tmp_path):
    # Dropped into ops/, a method module registers itself: no list or import elsewhere to edit.
    import subprocess

    shutil.copytree(PACKAGE, tmp_path / "weightsmith", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "weightsmith" / "ops" / "halfway.py").write_text(
        "from weightsmith.ops.registry import MergeInputs, MergeMethod, register\n\n"
        "def halfway(inputs: MergeInputs):\n    return (inputs.base + inputs.models[0]) / 2\n\n"
        "register(MergeMethod('halfway', halfway, (), 'required', 'the midpoint'))\n"
    )
    check = (
        "import torch\nfrom weightsmith.ops import MergeInputs, get_method\n"
        "x = get_method('halfway')(MergeInputs('w', torch.ones(1, 2), torch.zeros(2)))\n"
        "assert x.tolist() == [0.5, 0.5], x\nprint('found')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert run.stdout.strip() == "found", run.stderr


MAX_LINES = 400


def long_modules(package: Path, limit: int = MAX_LINES) -> list[str]:
    return sorted(
        f"{p.relative_to(package)} ({n} lines)"
        for p in package.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > limit
    )


def test_no_module_is_over_400_lines(tmp_path):
    # Small rooms: a module that grows past ~400 lines holds more than one concept; split it.
    assert not long_modules(PACKAGE), "modules over 400 lines:\n" + "\n".join(long_modules(PACKAGE))
    # ...and the check can fail: a long module in a copy of the package is named.
    (tmp_path / "io").mkdir()
    (tmp_path / "io" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_modules(tmp_path) == [f"io/long.py ({MAX_LINES + 1} lines)"]
