"""SPACE.yaml: which numbers of a recipe a search may change, and within which bounds.

Each entry maps a path into the recipe to bounds::

    models[0].parameters.weight: [0, 1]
    parameters.lambda: [0.2, 1.5]
    parameters.density: {bounds: [0.1, 0.9], points: 3}   # a per-layer gradient of 3 points

The optimizer works in the unit cube (every dimension scaled to [0, 1]); ``Space`` maps its
points to recipe values and back.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from weightsmith.errors import RecipeError

_STEP = re.compile(r"^([A-Za-z_][\w-]*)((?:\[\d+\])*)$")


@dataclass(frozen=True)
class Dimension:
    """One searched value: ``path`` into the recipe; ``point`` is its index in a gradient."""

    path: str
    low: float
    high: float
    point: int | None = None  # None: a scalar; else this gradient point of ``points``
    points: int = 1

    @property
    def name(self) -> str:
        return self.path if self.point is None else f"{self.path}[{self.point}]"

    def value(self, unit: float) -> float:
        return self.low + min(max(unit, 0.0), 1.0) * (self.high - self.low)

    def unit(self, value: float) -> float:
        return min(max((value - self.low) / (self.high - self.low), 0.0), 1.0)


def _steps(path: str) -> list[str | int]:
    steps: list[str | int] = []
    for part in path.split("."):
        match = _STEP.match(part)
        if not match:
            raise RecipeError(f"search space: {path!r} is not a path like models[0].parameters.weight")
        steps.append(match.group(1))
        steps += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]
    return steps


def _get(recipe: dict[str, Any], path: str) -> Any:
    node: Any = recipe
    for step in _steps(path):
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _set(recipe: dict[str, Any], path: str, value: Any) -> None:
    steps = _steps(path)
    node: Any = recipe
    for i, step in enumerate(steps[:-1]):
        try:
            node = node[step]
        except KeyError:  # a missing `parameters:` block is created; a missing model is not
            if isinstance(steps[i + 1], int):
                raise RecipeError(f"search space: {path!r}: the recipe has no {step!r} list") from None
            node[step] = {}
            node = node[step]
        except (IndexError, TypeError):
            raise RecipeError(f"search space: {path!r} does not exist in the recipe") from None
    node[steps[-1]] = value


class Space:
    def __init__(self, dimensions: list[Dimension]) -> None:
        if not dimensions:
            raise RecipeError("search space: no parameters to search; list at least one path")
        self.dimensions = dimensions

    @classmethod
    def parse(cls, entries: dict[str, Any], where: str = "search space") -> Space:
        dims: list[Dimension] = []
        for path, spec in entries.items():
            points = 1
            gradient = isinstance(spec, dict)
            if gradient:
                points = int(spec.get("points", 1))
                spec = spec.get("bounds")
            numbers = isinstance(spec, list) and all(isinstance(v, int | float) for v in spec)
            if not (numbers and len(spec) == 2 and spec[0] < spec[1]) or points < 1:
                raise RecipeError(
                    f"{where}: {path}: give bounds as [low, high] with low < high, or "
                    "{bounds: [low, high], points: N} for a gradient"
                )
            _steps(path)  # fail early on a malformed path
            low, high = float(spec[0]), float(spec[1])
            if gradient:
                dims += [Dimension(path, low, high, i, points) for i in range(points)]
            else:
                dims.append(Dimension(path, low, high))
        return cls(dims)

    @classmethod
    def load(cls, path: str | Path) -> Space:
        try:
            entries = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RecipeError(f"{path}: cannot read the search space: {e}") from None
        if not isinstance(entries, dict):
            raise RecipeError(f"{path}: a search space is a mapping of recipe paths to [low, high]")
        return cls.parse(entries, str(path))

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def values(self, unit: list[float]) -> dict[str, float]:
        return {d.name: d.value(u) for d, u in zip(self.dimensions, unit, strict=True)}

    def apply(self, recipe: dict[str, Any], unit: list[float]) -> dict[str, Any]:
        """A copy of ``recipe`` with the point's values written at their paths."""
        out = copy.deepcopy(recipe)
        gradients: dict[str, list[float]] = {}
        for d, u in zip(self.dimensions, unit, strict=True):
            if d.point is None:
                _set(out, d.path, d.value(u))
            else:
                gradients.setdefault(d.path, []).append(d.value(u))
        for path, points in gradients.items():
            _set(out, path, points)
        return out

    def default(self, recipe: dict[str, Any]) -> list[float]:
        """The recipe's own values in the unit cube (clipped); the middle where it has none."""
        unit = []
        for d in self.dimensions:
            value = _get(recipe, d.path)
            if isinstance(value, list) and d.point is not None and value:
                # A gradient of another length: sample it where this one's points lie.
                pos = d.point * (len(value) - 1) / max(d.points - 1, 1)
                value = value[round(pos)]
            unit.append(d.unit(float(value)) if isinstance(value, int | float) else 0.5)
        return unit
