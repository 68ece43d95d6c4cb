"""Tiny checkpoints built locally for tests: Llama-shaped, random, sharded safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_hidden_layers": 3,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "bfloat16",
}


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def random_state(config: dict, seed: int, dtype: torch.dtype = torch.bfloat16,
                 scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in llama_shapes(config).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.01 * torch.randn(shape, generator=g)
        else:
            t = scale * torch.randn(shape, generator=g)
        out[name] = t.to(dtype)
    return out


def perturb(state: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A 'fine-tune': the base plus small seeded noise, in the base's dtype."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype)
        if v.dtype.is_floating_point else v.clone()
        for k, v in state.items()
    }


def save_model(folder: Path, state: dict[str, torch.Tensor], config: dict | None = None,
               shards: int = 2, tokenizer: bool = True) -> Path:
    """Write ``state`` as ``shards`` safetensors files with an index (one file: no index)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards <= 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            part = names[i * per:(i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k].contiguous() for k in part}, str(folder / fname),
                      metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder


def make_family(root: Path, n_models: int = 3, dtype: torch.dtype = torch.bfloat16,
                config: dict | None = None, shards: int = 2) -> tuple[Path, list[Path]]:
    """A base and ``n_models`` perturbed fine-tunes under ``root``."""
    config = dict(config or LLAMA_CONFIG)
    base_state = random_state(config, seed=0, dtype=dtype)
    base = save_model(root / "base", base_state, config, shards=shards)
    models = [
        save_model(root / f"ft{i}", perturb(base_state, seed=100 + i), config, shards=shards)
        for i in range(n_models)
    ]
    return base, models


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def save_pair(root: Path, config: dict, seed: int = 0) -> tuple[Path, Path]:
    """Two one-shard checkpoints of ``config``: ``root/a`` (seeded random) and ``root/b`` (a
    perturbed copy of it), the usual pair for planning tests."""
    state = random_state(config, seed=seed)
    a = save_model(root / "a", state, config, shards=1)
    b = save_model(root / "b", perturb(state, 1), config, shards=1)
    return a, b
