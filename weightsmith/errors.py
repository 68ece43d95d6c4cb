"""Errors that reach users: each names the file, tensor or field at fault and the fix."""

from __future__ import annotations


class WeightsmithError(Exception):
    """Base class: the CLI prints ``str(err)`` alone (no traceback) and exits non-zero."""

    exit_code = 1


class RecipeError(WeightsmithError):
    """A recipe field is missing, unknown or of the wrong type."""

    exit_code = 2


class CheckpointError(WeightsmithError):
    """An input checkpoint is missing, corrupt, truncated or not readable safely."""

    exit_code = 3


class MergeError(WeightsmithError):
    """Inputs are readable but cannot be merged (shape mismatch, NaN produced, ...)."""

    exit_code = 4


class NonFiniteInput(MergeError):
    """A method found NaN/Inf in its inputs that its arithmetic might otherwise hide (a TIES
    trim or sign election can drop a NaN); the engine names the checkpoint that holds it."""


class OutputError(WeightsmithError):
    """The output cannot be written (exists without --overwrite, disk full, ...)."""

    exit_code = 5


class DataError(WeightsmithError):
    """A training or evaluation data file is malformed."""

    exit_code = 6
