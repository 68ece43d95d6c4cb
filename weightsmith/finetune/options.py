"""Fine-tuning options: one validated record, shared by the library API, the CLI and the log."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from weightsmith.errors import RecipeError


class OptionError(RecipeError):
    """A fine-tuning option is out of range or incompatible with the task."""


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: float = 3.0
    steps: int | None = None  # optimizer steps; overrides epochs when set
    lr: float = 5e-5
    warmup_steps: int = 0
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_length: int = 128
    truncate: bool = False
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha) mixing of input embeddings; 0 disables
    freeze: tuple[str, ...] = field(default_factory=tuple)
    train_only: tuple[str, ...] = field(default_factory=tuple)
    mask: str | None = None
    half_freeze: bool = False
    init_from: str | None = None
    num_labels: int | None = None  # size of a new head; default: largest label in the data + 1
    threads: int | None = None  # torch intra-op threads while training; None keeps the default
    quiet: bool = False
    overwrite: bool = False

    def validate(self, task: str) -> FinetuneOptions:
        def bad(msg: str) -> OptionError:
            return OptionError(f"invalid fine-tuning option: {msg}")

        if self.steps is None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise bad(f"epochs must be > 0, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise bad(f"steps must be >= 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise bad(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise bad(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise bad(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup < 0:
            raise bad(f"mixup alpha must be >= 0, got {self.mixup}")
        if self.mixup > 0 and task != "classification":
            raise bad("mixup mixes input embeddings of whole examples; it needs classification")
        if self.threads is not None and self.threads < 1:
            raise bad(f"threads must be >= 1, got {self.threads}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise bad(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        return self

    @classmethod
    def from_kwargs(cls, **options: object) -> FinetuneOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionError(
                f"unknown fine-tuning option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        for name in ("freeze", "train_only"):
            value = options.get(name)
            if isinstance(value, str):
                options[name] = (value,)  # a single pattern is a common, harmless slip
            elif value is not None:
                options[name] = tuple(value)  # type: ignore[arg-type]
        for name in ("mask", "init_from"):
            if options.get(name) is not None:
                options[name] = str(options[name])
        return cls(**options)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["freeze"] = list(self.freeze)
        d["train_only"] = list(self.train_only)
        return d
