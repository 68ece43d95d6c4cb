"""The training record: ``train_log.json`` and an optional ``loss_curve.png``."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

LOG_NAME = "train_log.json"
PLOT_NAME = "loss_curve.png"


def package_versions() -> dict[str, str]:
    """Versions that affect the numbers; recorded so a run can be reproduced later."""
    from importlib import metadata

    out = {}
    for name in ("weightsmith", "torch", "transformers", "tokenizers", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class TrainLog:
    meta: dict[str, object]
    steps: list[dict[str, float]] = field(default_factory=list)

    def record(self, step: int, loss: float, lr: float, elapsed: float) -> None:
        self.steps.append({"step": step, "loss": loss, "lr": lr, "elapsed_s": round(elapsed, 4)})

    def write(self, out_dir: Path, wall_time: float) -> Path:
        body = dict(self.meta)
        body["wall_time_s"] = round(wall_time, 3)
        body["final_loss"] = self.steps[-1]["loss"] if self.steps else None
        body["steps"] = self.steps
        path = out_dir / LOG_NAME
        path.write_text(json.dumps(body, indent=2) + "\n")
        return path


def plot_loss(log: TrainLog, out_dir: Path) -> Path | None:
    """Loss (raw and smoothed) and LR against step; skipped with a warning without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # never needs a display; safe on headless machines
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "matplotlib is not installed; skipping the loss-curve PNG (pip install 'weightsmith[train]')",
            stacklevel=2,
        )
        return None
    if not log.steps:
        return None
    steps = [s["step"] for s in log.steps]
    losses = [s["loss"] for s in log.steps]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"loss (mean of {window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [s["lr"] for s in log.steps], color="gray", linestyle=":", label="lr")
    lr_ax.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = out_dir / PLOT_NAME
    fig.savefig(path)
    plt.close(fig)
    return path
