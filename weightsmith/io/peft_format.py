"""PEFT's LoRA adapter format (peft 0.21): file names, key naming, which adapter_config.json
fields weightsmith accepts or refuses by name, and the per-module rank and scale. Shared by the
reader (io/lora.py), the writer (io/lora_writer.py) and LoRA extraction."""

from __future__ import annotations

import math
import re
from typing import Any

from weightsmith.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# transformers architectures whose linear layers are Conv1D (weights stored as [in, out]): a
# square LoRA target there is transposed even when the adapter config says fan_in_fan_out=False,
# because peft switches it on for Conv1D modules (and off for nn.Linear) whatever the config says.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_MODULE_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})  # their Conv1D layers


def is_conv1d(model_type: Any, module: str) -> bool:
    """Whether ``module`` is a transformers Conv1D layer (weight stored ``[in, out]``)."""
    return model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_MODULE_NAMES

# adapter_config.json fields that do not change the merged weights (or only select modules,
# which the saved keys already reflect).
_HARMLESS_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
    "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "runtime_config", "ensure_weight_tying",
})

# Fields whose non-default value makes the merged weight something other than W + s B A.
_REFUSED_FIELDS = {
    "use_dora": "DoRA (use_dora) rescales each column by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias to the base layer's bias",
    "target_parameters": "target_parameters adapts nn.Parameters (e.g. MoE experts) directly",
    "layer_replication": "layer_replication duplicates base layers",
    "trainable_token_indices": "trainable_token_indices trains single embedding rows",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) depends on the input",
    "use_qalora": "QALoRA (use_qalora) pools inputs in groups",
    "megatron_config": "megatron_config builds Megatron-parallel LoRA layers",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config) mixes adapters per token",
    "kasa_config": "KaSA (kasa_config)",
}

# init_lora_weights values that subtract the initial B A from the base (the adapter then belongs
# to a residual model, not to the base), or that are peft LoRA variants.
_RESIDUAL_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?!weight$)(?P<adapter>[^.]+))?(?P<weight>\.weight)?$"
)


def check_supported(config: dict[str, Any], where: str) -> None:
    """Refuse, by name, every adapter whose merge is not exactly ``W + scale * B @ A``."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{where}: peft_type {peft_type!r} is not supported; weightsmith applies plain LoRA "
            "adapters (peft_type LORA) only — merge this adapter with peft's merge_and_unload first"
        )
    for name, what in _REFUSED_FIELDS.items():
        if config.get(name):
            raise CheckpointError(
                f"{where}: {what}; weightsmith applies plain LoRA exactly and does not approximate "
                f"this variant ({name}={config[name]!r}). Merge it with peft's merge_and_unload first"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise CheckpointError(
            f"{where}: init_lora_weights={init!r}: this adapter belongs to a residual base (peft "
            "subtracted its initial B A from the weights), so base + B A is not the fine-tune. "
            "Convert it with save_pretrained(path_initial_model_for_weight_conversion=...) first"
        )
    if init not in (True, False, "gaussian", "eva", "orthogonal"):
        raise CheckpointError(f"{where}: init_lora_weights={init!r} is not a LoRA init weightsmith knows")
    for name, value in config.items():
        if name not in _HARMLESS_FIELDS and name not in _REFUSED_FIELDS and value not in (
            None, False, {}, [], ""
        ):
            raise CheckpointError(
                f"{where}: field {name!r}={value!r} is unknown to weightsmith and may change the "
                "adapter's math; refusing rather than guessing (merge it with peft first)"
            )
    for name in ("r", "lora_alpha"):
        value = config.get(name, 8)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{where}: {name} must be a positive number, got {value!r}")


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern that matches the end of the module name
    at a dot boundary (the pattern is a regular expression) gives the value."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def lora_scale(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(rank, scale) of one module: rank_pattern / alpha_pattern as peft resolves them."""
    r = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def _base_key(name: str) -> str:
    """A saved non-LoRA key -> the base tensor it replaces (peft wraps targeted layers in
    ``base_layer`` and modules_to_save copies in ``modules_to_save.<adapter>``)."""
    name = name.replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
