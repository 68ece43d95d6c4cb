"""Linear warmup followed by cosine decay to zero."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``.

    ``step`` is the number of optimizer steps already taken. Warmup ramps through
    ``1/(w+1) ... w/(w+1)`` so no update is wasted at LR zero, the peak is hit exactly once (at
    update ``w + 1``), and cosine decay then never quite reaches zero on the last update.
    """

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
