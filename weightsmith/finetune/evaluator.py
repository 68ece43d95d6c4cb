"""Score in-memory weights without touching disk (what greedy soups and merge searches call)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from weightsmith.finetune.data import Dataset
from weightsmith.finetune.encoding import encode
from weightsmith.finetune.evaluation import evaluate_features, prepare
from weightsmith.finetune.modeling import KeyResolver, load_weights
from weightsmith.finetune.options import OptionError

WeightSource = Mapping[str, torch.Tensor] | Callable[[], Iterable[tuple[str, torch.Tensor]]]

METRICS = {
    "classification": ("accuracy", "loss", "ece"),
    "causal-lm": ("exact_match", "loss"),
}
LOWER_IS_BETTER = ("loss", "ece")


class Evaluator:
    """Build the model and tokenize the data once; then ``score(weights)`` many times.

    ``weights`` is a state dict, or a zero-argument callable returning ``(name, tensor)`` pairs
    (e.g. a generator reading a merge result). Names may be the task model's keys or the bare
    backbone's (``encoder.layer.0...``); every name provided must exist with the right shape.
    Tensors not provided take the values of the folder the evaluator was built from, whatever
    earlier calls loaded, so each score depends only on its own arguments.
    """

    def __init__(
        self,
        model_dir: str | Path,
        data: str | Path | Dataset,
        task: str,
        metric: str | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        truncate: bool = False,
    ) -> None:
        self.loaded, self.dataset = prepare(model_dir, data, task, max_length, truncate)
        self.task = task
        self.metric = metric or METRICS[task][0]
        if self.metric not in METRICS[task]:
            raise OptionError(
                f"metric {self.metric!r} is not available for {task}; "
                f"choose one of: {', '.join(METRICS[task])}"
            )
        self.higher_is_better = self.metric not in LOWER_IS_BETTER
        self.batch_size = batch_size
        self.features = encode(self.dataset, self.loaded.tokenizer, max_length, truncate)
        self._resolver = KeyResolver(self.loaded.model)
        self._originals: dict[str, torch.Tensor] = {}  # folder values of keys we overwrote

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def load(self, weights: WeightSource) -> None:
        pairs = list(weights.items() if isinstance(weights, Mapping) else weights())
        state = self.model.state_dict()
        provided = set()
        for name, _ in pairs:
            key = self._resolver.resolve(name)
            if key is not None:
                provided.add(key)
                if key not in self._originals:  # snapshot lazily: memory only for touched keys
                    self._originals[key] = state[key].detach().clone()
        stale = {k: v for k, v in self._originals.items() if k not in provided}
        if stale:
            self.model.load_state_dict(stale, strict=False)
        load_weights(self.model, pairs, source="weights passed to Evaluator")

    def reset(self) -> None:
        """Put back the folder's weights."""
        if self._originals:
            self.model.load_state_dict(self._originals, strict=False)

    def evaluate(self, weights: WeightSource | None = None) -> dict[str, float]:
        """All metrics for ``weights`` (or for the folder's own weights when None)."""
        if weights is None:
            self.reset()
        else:
            self.load(weights)
        return evaluate_features(
            self.loaded,
            self.task,
            self.features,
            self.batch_size,
            exact_match=self.metric == "exact_match",
        )

    def score(self, weights: WeightSource | None = None) -> float:
        """The chosen metric; see ``higher_is_better`` for its direction."""
        return float(self.evaluate(weights)[self.metric])
