"""Tiny local checkpoints that stand in for the Hub models published recipes name.

Each checkpoint has the tensor names of its transformers architecture (llama, mistral, qwen2,
gemma2, stablelm), a ``config.json`` written by that architecture's own config class (so
per-layer config lists such as Gemma-2's ``layer_types`` have the right length), tokenizer
files, and random bfloat16 weights: one shared base per (architecture, depth) plus a small
per-checkpoint perturbation, so merges see fine-tunes of one base as they do in real life.
LoRA adapters are written in PEFT's on-disk format (``adapter_config.json`` +
``adapter_model.safetensors``) without needing peft.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 16, 32, 2, 1, 8, 64

# Per-layer tensors (name -> shape) of each architecture, as transformers names them
# (checked against the meta-device models of transformers 5).
_ATTN = {
    "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
}
_MLP = {
    "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
}
_NORMS = {"input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,)}
LAYER_TENSORS: dict[str, dict[str, tuple[int, ...]]] = {
    "llama": {**_ATTN, **_MLP, **_NORMS},
    "mistral": {**_ATTN, **_MLP, **_NORMS},
    "qwen2": {
        **_ATTN,
        "self_attn.q_proj.bias": (HEADS * HEAD_DIM,),
        "self_attn.k_proj.bias": (KV_HEADS * HEAD_DIM,),
        "self_attn.v_proj.bias": (KV_HEADS * HEAD_DIM,),
        **_MLP,
        **_NORMS,
    },
    "gemma2": {
        **_ATTN,
        **_MLP,
        **_NORMS,
        "pre_feedforward_layernorm.weight": (HIDDEN,),
        "post_feedforward_layernorm.weight": (HIDDEN,),
    },
    "stablelm": {
        **_ATTN,
        **_MLP,
        **_NORMS,
        "input_layernorm.bias": (HIDDEN,),
        "post_attention_layernorm.bias": (HIDDEN,),
    },
}
ARCHITECTURE_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "stablelm": "StableLmForCausalLM",
}
_EXTRA_CONFIG = {"gemma2": {"query_pre_attn_scalar": HEAD_DIM}}
LORA_RANK, LORA_ALPHA = 2, 4
LORA_TARGETS = ("q_proj", "v_proj")
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


def make_config(architecture: str, layers: int) -> dict:
    """config.json of a tiny model, from transformers' own config class for the architecture."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        architecture,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_hidden_layers=layers,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **_EXTRA_CONFIG.get(architecture, {}),
    )
    out = config.to_dict()
    out["architectures"] = [ARCHITECTURE_CLASS[architecture]]
    out["torch_dtype"] = "bfloat16"
    return out


def tensor_shapes(architecture: str, layers: int, tied: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        for name, shape in LAYER_TENSORS[architecture].items():
            shapes[f"model.layers.{i}.{name}"] = shape
    shapes["model.norm.weight"] = (HIDDEN,)
    if architecture == "stablelm":
        shapes["model.norm.bias"] = (HIDDEN,)
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _random(shapes: dict[str, tuple[int, ...]], seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=g) for name, shape in shapes.items()}


def write_tokenizer(folder: Path) -> None:
    """A word-level fast tokenizer with the model's 64-token vocabulary and a ChatML template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))


class CheckpointZoo:
    """Builds tiny checkpoints on first request under ``root`` and reuses them afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._bases: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def _base(self, architecture: str, layers: int) -> dict[str, torch.Tensor]:
        key = (architecture, layers)
        if key not in self._bases:
            config = make_config(architecture, layers)
            shapes = tensor_shapes(architecture, layers, bool(config.get("tie_word_embeddings")))
            state = _random(shapes, _seed(architecture, layers, "base"), 0.05)
            for name in state:
                if "norm" in name and name.endswith("weight"):
                    state[name] += 1.0
            self._bases[key] = state
        return self._bases[key]

    def model(self, architecture: str, layers: int, name: str) -> Path:
        """The checkpoint ``<architecture>-<layers>-<name>``: the shared base plus noise."""
        folder = self.root / f"{architecture}-{layers}-{name}"
        if (folder / "model.safetensors").exists():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        base = self._base(architecture, layers)
        noise = _random({k: tuple(v.shape) for k, v in base.items()}, _seed(architecture, layers, name), 0.01)
        state = {k: (base[k] + noise[k]).to(torch.bfloat16).contiguous() for k in base}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(make_config(architecture, layers), indent=2))
        write_tokenizer(folder)
        return folder

    def lora(self, architecture: str, layers: int, name: str) -> Path:
        """A PEFT LoRA adapter (rank 2 on q_proj and v_proj of every layer) for that base."""
        folder = self.root / f"{architecture}-{layers}-{name}"
        if (folder / "adapter_model.safetensors").exists():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(layers):
            for target in LORA_TARGETS:
                out_dim, in_dim = LAYER_TENSORS[architecture][f"self_attn.{target}.weight"]
                prefix = f"base_model.model.model.layers.{i}.self_attn.{target}"
                shapes[f"{prefix}.lora_A.weight"] = (LORA_RANK, in_dim)
                shapes[f"{prefix}.lora_B.weight"] = (out_dim, LORA_RANK)
        state = _random(shapes, _seed(architecture, layers, name), 0.02)
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": None,
            "r": LORA_RANK,
            "lora_alpha": LORA_ALPHA,
            "lora_dropout": 0.0,
            "target_modules": list(LORA_TARGETS),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
        }, indent=2))
        return folder

    def resolve(self, architecture: str, layers: int, local: str) -> str:
        """A manifest target (``a``, ``a+lora1``, ``model:a``) as the path(s) it stands for."""
        prefix = ""
        if local.startswith("model:"):
            prefix, local = "model:", local[len("model:"):]
        parts = local.split("+")
        paths = [str(self.model(architecture, layers, parts[0]))]
        paths += [str(self.lora(architecture, layers, p)) for p in parts[1:]]
        return prefix + "+".join(paths)
