"""dtype names, in one place: the spellings recipes, the API and the CLI accept (``bf16``,
``half``, ...), and the name a dtype has in messages, reports and configs (``bfloat16``).

The tables are plain strings so that command modules can offer them without importing torch
(``weightsmith --help`` loads no torch); only ``parse_dtype`` imports it. The safetensors
header codes (``BF16``, ``F32``, ...) are the file format's own vocabulary and stay with the
format (io/safetensors_format.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weightsmith.errors import RecipeError

if TYPE_CHECKING:
    import torch

# Accepted spelling (lower case) -> torch's name for the dtype.
ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
    # Storage only: arithmetic still runs in float32 (see Recipe.compute_dtype).
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
}
NAMES = tuple(dict.fromkeys(ALIASES.values()))  # torch's names, in the order above
# What extract-lora writes LoRA factors in (PEFT loads these).
FACTOR_DTYPES = ("bfloat16", "float16", "float32")


def canonical_name(name: Any) -> str | None:
    """torch's name for an accepted spelling (any case), or None."""
    return ALIASES.get(name.lower()) if isinstance(name, str) else None


def parse_dtype(name: Any, where: str, allowed: tuple[str, ...] = NAMES) -> torch.dtype:
    """The dtype ``name`` spells (an alias, any case), if it is one of ``allowed``; else one
    error naming ``where`` and the choices."""
    import torch  # here, not at the top: see the module's doc

    canonical = canonical_name(name)
    if canonical is None:
        raise RecipeError(f"{where}: unknown dtype {name!r}; use one of {', '.join(allowed)}")
    if canonical not in allowed:
        raise RecipeError(f"{where}: {name!r} is not offered here; use one of {', '.join(allowed)}")
    return getattr(torch, canonical)


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``bfloat16`` (also for dtypes without an alias, like int64)."""
    return str(dtype).removeprefix("torch.")
