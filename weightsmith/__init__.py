"""weightsmith: model merging and weight surgery, streamed tensor by tensor.

import weightsmith as ws
ws.merge("recipe.yaml", "out/")                     # a mergekit-format recipe
base = ws.Checkpoint.open("org/base")
merged = base + 0.4 * ((ws.Checkpoint.open("org/ft-a") - base)
                       + (ws.Checkpoint.open("org/ft-b") - base))
merged.save("out2/")                                # lazy, streamed
"""

__version__ = "0.1.0"

from weightsmith.io.checkpoint import Checkpoint  # noqa: E402
from weightsmith.lazy import TaskVector  # noqa: E402
from weightsmith.pipeline import MergeResult, merge, plan_merge  # noqa: E402
from weightsmith.recipe import Recipe, load_recipe  # noqa: E402

__all__ = [
    "Checkpoint",
    "MergeResult",
    "Recipe",
    "TaskVector",
    "__version__",
    "load_recipe",
    "merge",
    "plan_merge",
]
