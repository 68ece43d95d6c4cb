"""The statistics protocol: model-wide numbers a method needs before it can write any tensor.

Some methods need a statistic over the whole model (TIES with ``scope: model`` needs, per task,
the k-th largest |delta| over every parameter, then the model-wide majority sign). A method
returns a ``GlobalStatistics`` from its ``prepare`` hook; the engine (engine/passes.py) streams
the inputs through it: for each work unit it asks for a small partial statistic (``collect``),
reduces the partials (``combine``) and hands the total back (``absorb``). The method decides
after each pass whether it needs another one (``wants_pass``), since a later statistic may
depend on an earlier one. The engine never knows the math; the method never knows how the
inputs were read or split.

Contract for ``collect``: its partials must add up over any split of a tensor into row blocks
and over tensors (histograms, counts, sums), so the total does not depend on the budget.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from weightsmith.ops.registry import MergeInputs


class GlobalStatistics(ABC):
    """A method's model-wide statistics, filled by streamed passes before the output pass."""

    #: How many passes the method expects (shown by ``weightsmith plan``); informative only.
    planned_passes: int = 1
    #: Model-wide statistics count a tied or aliased tensor once. Per-tensor statistics (keyed
    #: by output name) need every output tensor they visit, aliases included.
    count_aliases_once: bool = True
    #: What the passes are for, in ``weightsmith plan``'s note.
    purpose: str = "model-wide statistics"

    def visits(self, name: str) -> bool:
        """Whether the passes read this output tensor (default: all of them)."""
        return True

    @abstractmethod
    def wants_pass(self) -> bool:
        """True while another pass over the inputs is needed."""

    @abstractmethod
    def collect(self, inputs: MergeInputs, **params: Any) -> Any:
        """The partial statistic of one tensor or row block (additive, small)."""

    def combine(self, a: Any, b: Any) -> Any:
        """Reduce two partials; the default adds them (tensors, numbers, or lists of them)."""
        if isinstance(a, (list, tuple)):
            return type(a)(self.combine(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return {k: self.combine(a[k], b[k]) for k in a}
        if a is None:
            return b
        if b is None:
            return a
        return a + b

    @abstractmethod
    def absorb(self, total: Any) -> None:
        """End of a pass: take the reduced statistic (None if nothing was visited)."""

    @abstractmethod
    def result(self) -> Any:
        """What the output pass receives as ``inputs.context``."""
