"""weightsmith: model merging and weight surgery, streamed tensor by tensor.

import weightsmith as ws
ws.merge("recipe.yaml", "out/")                     # a mergekit-format recipe (multi-stage too)
base = ws.Checkpoint.open("org/base")
merged = base + 0.4 * ((ws.Checkpoint.open("org/ft-a") - base)
                       + (ws.Checkpoint.open("org/ft-b") - base))
merged.save("out2/")                                # lazy, streamed
"""

from weightsmith.io.checkpoint import Checkpoint
from weightsmith.lazy import TaskVector
from weightsmith.pipeline import MergeResult, plan_merge
from weightsmith.recipe import Recipe, load_recipe
from weightsmith.stages import merge, plan_stages
from weightsmith.version import __version__

__all__ = [
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
