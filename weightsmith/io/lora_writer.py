"""Writing PEFT LoRA adapters: the ``adapter_config.json`` for per-module ranks, the factor
names peft loads. (OUT's checks are the merge path's: weightsmith/output_checks.py.)

Shared by ``extract-lora`` (commands/extract_lora.py) and ``out_format: lora`` (lora_output.py);
the factors themselves are appended with ``AppendingSafetensorsWriter`` (ranks are known only
as each module is computed) inside an ``OutputDir`` (atomic).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from weightsmith.io.checkpoint import Checkpoint
from weightsmith.io.peft_format import PEFT_PREFIX


def factor_names(module: str, embedding: bool) -> tuple[str, str]:
    """The (A, B) tensor names peft saves for ``module``: Linear/Conv1D or Embedding LoRA."""
    if embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def adapter_config(
    ranks: dict[str, int], saved: list[str], base: str, ft: Checkpoint, conv1d: bool
) -> dict[str, Any]:
    """A LoraConfig for these per-module ranks: the most common rank as ``r``, the rest as
    exact-name patterns; ``alpha == rank`` everywhere so the scale is 1."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k)) if counts else 1
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    archs = (ft.config or {}).get("architectures") or []
    causal = any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal else None,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "modules_to_save": sorted(saved) or None,
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
    }
