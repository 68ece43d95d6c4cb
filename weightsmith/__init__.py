"""weightsmith: model merging and weight surgery, streamed tensor by tensor.

import weightsmith as ws
ws.merge("recipe.yaml", "out/")                     # a mergekit-format recipe (multi-stage too)
base = ws.Checkpoint.open("org/base")
merged = base + 0.4 * ((ws.Checkpoint.open("org/ft-a") - base)
                       + (ws.Checkpoint.open("org/ft-b") - base))
merged.save("out2/")                                # lazy, streamed
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from weightsmith.version import __version__

if TYPE_CHECKING:
    from weightsmith.io.checkpoint import Checkpoint
    from weightsmith.lazy import TaskVector
    from weightsmith.pipeline import MergeResult, plan_merge
    from weightsmith.recipe import Recipe, load_recipe
    from weightsmith.stages import merge, plan_stages

# The public names load on first use (PEP 562): `weightsmith --help` imports this package and
# must not pay for torch. Anything that loads them loads weightsmith.lazy too, which attaches
# checkpoint arithmetic (base + 0.4 * (ft - base)) to Checkpoint.
_EXPORTS = {
    "Checkpoint": "weightsmith.io.checkpoint",
    "MergeResult": "weightsmith.pipeline",
    "Recipe": "weightsmith.recipe",
    "TaskVector": "weightsmith.lazy",
    "load_recipe": "weightsmith.recipe",
    "merge": "weightsmith.stages",  # one-document recipes as pipeline.merge, multi-stage too
    "plan_merge": "weightsmith.pipeline",
    "plan_stages": "weightsmith.stages",
}

__all__ = [  # a literal list, so linters see the re-exports
    "Checkpoint",
    "MergeResult",
    "Recipe",
    "TaskVector",
    "__version__",
    "load_recipe",
    "merge",
    "plan_merge",
    "plan_stages",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weightsmith' has no attribute {name!r}")
    importlib.import_module("weightsmith.lazy")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
