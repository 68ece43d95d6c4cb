"""Reproducible model families for merge experiments, built offline on a CPU.

``build(name, out_dir)`` produces a base model, fine-tunes of it and their data, and records
provenance in ``OUT/testbed.json``; a second call with the same recipe is a cache hit.
"""

from __future__ import annotations

from pathlib import Path

from weightsmith.errors import WeightsmithError

NAMES = ("minilm", "tinylm")


def build(
    name: str, out_dir: str | Path, force: bool = False, quiet: bool = False
) -> dict[str, object]:
    """Build testbed ``name`` into ``out_dir``; returns the testbed.json content (+ "cached")."""
    if name == "minilm":
        from weightsmith.testbeds.minilm import build as build_minilm

        return build_minilm(out_dir, force=force, quiet=quiet)
    if name == "tinylm":
        from weightsmith.testbeds.tinylm import build as build_tinylm

        return build_tinylm(out_dir, force=force, quiet=quiet)
    raise WeightsmithError(f"unknown testbed {name!r}; choose one of: {', '.join(NAMES)}")


__all__ = ["NAMES", "build"]
