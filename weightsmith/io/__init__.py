"""Readers and writers of checkpoints, adapters and output folders."""

# Registers the BASE+ADAPTER opener with Checkpoint.open (the reader does not import it back).
from weightsmith.io import lora as _lora  # noqa: F401
