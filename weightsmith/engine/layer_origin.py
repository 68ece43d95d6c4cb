"""Where an output layer of a sliced (or ``modules:``) merge comes from: the plan keeps one per
output layer, and ``weightsmith plan`` shows them as the layer map."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerOrigin:
    """Output layer ``layer`` of module ``module`` (None: a text model's one layer stack) is
    the merge of these (model ref, input layer) sources, in the recipe's source order."""

    module: str | None
    layer: int
    sources: tuple[tuple[str, int], ...]
