"""JSONL loading and validation for the two supported tasks.

Every problem is reported as a :class:`DataError` naming the file and the 1-based line, because
the usual fix is to open the file at that line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from weightsmith.errors import DataError

TASKS = ("classification", "causal-lm")

# Required string fields per task; "label" is validated separately (it must be an int).
_TEXT_FIELDS = {
    "classification": ("text",),
    "causal-lm": ("prompt", "response"),
}
_OPTIONAL_TEXT_FIELDS = {"classification": ("text_pair",), "causal-lm": ()}


@dataclass(frozen=True)
class Example:
    """One validated JSONL row; ``line`` is kept so later checks (length) can name it."""

    line: int
    text: str = ""
    text_pair: str | None = None
    label: int = -1
    prompt: str = ""
    response: str = ""


@dataclass(frozen=True)
class Dataset:
    path: Path
    task: str
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_labels(self) -> int:
        """Number of classes implied by the data (largest label + 1)."""
        return max(ex.label for ex in self.examples) + 1

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"


def check_task(task: str) -> str:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    return task


def _parse_row(path: Path, lineno: int, raw: str, task: str) -> Example:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    fields: dict[str, object] = {}
    for name in _TEXT_FIELDS[task]:
        if name not in row:
            raise DataError(f"{where}: missing field {name!r} (task {task} needs it)")
        if not isinstance(row[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {row[name]!r}")
        fields[name] = row[name]
    for name in _OPTIONAL_TEXT_FIELDS[task]:
        if row.get(name) is not None:
            if not isinstance(row[name], str):
                raise DataError(f"{where}: field {name!r} must be a string, got {row[name]!r}")
            fields[name] = row[name]
    if task == "classification":
        if "label" not in row:
            raise DataError(f"{where}: missing field 'label' (task classification needs it)")
        label = row["label"]
        # bool is a subclass of int in Python, but true/false labels are almost always a bug.
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f"{where}: label must be an integer class id, got {label!r}")
        if label < 0:
            raise DataError(f"{where}: label must be >= 0, got {label}")
        fields["label"] = label
    return Example(line=lineno, **fields)  # type: ignore[arg-type]


def load_jsonl(path: str | Path, task: str, num_labels: int | None = None) -> Dataset:
    """Read and validate a JSONL file for ``task``.

    Blank lines are skipped (but still counted, so line numbers match an editor's).
    ``num_labels``, when the model already has a head, bounds the labels.
    """
    check_task(task)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read data file ({err})") from None
    examples = [
        _parse_row(path, lineno, raw, task)
        for lineno, raw in enumerate(text.splitlines(), start=1)
        if raw.strip()
    ]
    if not examples:
        raise DataError(f"{path}: data file is empty (no JSONL rows)")
    data = Dataset(path=path, task=task, examples=tuple(examples))
    if num_labels is not None and task == "classification":
        check_label_range(data, num_labels)
    return data


def check_label_range(data: Dataset, num_labels: int) -> None:
    for ex in data.examples:
        if ex.label >= num_labels:
            raise DataError(
                f"{data.where(ex.line)}: label {ex.label} is out of range: the model has "
                f"{num_labels} classes (valid labels 0..{num_labels - 1})"
            )
