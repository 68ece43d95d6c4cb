"""Build synthetic Llama-shaped bf16 checkpoints for speed and memory benchmarks.

    python benchmarks/make_checkpoints.py .bench/ckpt --params 0.84B --models 4

Writes ``base/`` and ``ft0/``..``ft{N-2}/`` (N models in all, the base included), each a
sharded safetensors folder with an index and a ``config.json`` that transformers (and
mergekit) accept. Fine-tunes are the base plus small seeded noise, so task vectors are small
relative to the weights, as in real fine-tunes. Deterministic for a given size and seed; an
existing folder with the same recipe is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from weightsmith.io.safetensors_format import build_header  # noqa: E402
from weightsmith.units import format_size, parse_size  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "dtype": "bfloat16",
    }


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    head_dim = HIDDEN // HEADS
    kv = KV_HEADS * head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for n in range(layers):
        p = f"model.layers.{n}."
        out.update(
            {
                p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": (kv, HIDDEN),
                p + "self_attn.v_proj.weight": (kv, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
                p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
                p + "input_layernorm.weight": (HIDDEN,),
                p + "post_attention_layernorm.weight": (HIDDEN,),
            }
        )
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def layers_for(params: int) -> int:
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    per_layer = sum(math.prod(s) for s in shapes(1).values()) - fixed
    return max(1, round((params - fixed) / per_layer))


def write_model(folder: Path, layers: int, seed: int, noise: float, shard_bytes: int) -> None:
    """Stream tensors to shards: never more than one tensor in memory."""
    folder.mkdir(parents=True, exist_ok=True)
    items = list(shapes(layers).items())
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in items:
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        prefix, _ = build_header([(n, torch.bfloat16, s) for n, s in group], {"format": "pt"})
        with open(folder / fname, "wb") as f:
            f.write(prefix)
            for name, shape in group:
                # The base is a pure function of (name); a fine-tune adds noise seeded by (seed, name).
                g = torch.Generator().manual_seed(hash_name(name))
                t = torch.randn(shape, generator=g).mul_(0.02)
                if name.endswith("norm.weight"):
                    t.add_(1.0)
                if noise:
                    g2 = torch.Generator().manual_seed(hash_name(name) ^ (seed * 7919))
                    t.add_(torch.randn(shape, generator=g2).mul_(noise))
                f.write(t.bfloat16().view(torch.uint8).numpy().tobytes())
                weight_map[name] = fname
    total = sum(math.prod(s) * 2 for _, s in items)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(llama_config(layers), indent=2))


def hash_name(name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little")


def build(out: Path, params: int, models: int, shard_bytes: int = 2 * 10**9) -> list[Path]:
    layers = layers_for(params)
    recipe = {"layers": layers, "models": models, "shard_bytes": shard_bytes, "version": 1}
    stamp = out / "recipe.json"
    folders = [out / "base"] + [out / f"ft{i}" for i in range(models - 1)]
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return folders
    out.mkdir(parents=True, exist_ok=True)
    for i, folder in enumerate(folders):
        start = time.perf_counter()
        write_model(folder, layers, seed=i, noise=0.0 if i == 0 else 0.002, shard_bytes=shard_bytes)
        print(f"built {folder} in {time.perf_counter() - start:.1f}s", flush=True)
    stamp.write_text(json.dumps(recipe))
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--params", default="0.84B", help="parameters per model, e.g. 0.84B, 300M")
    ap.add_argument("--models", type=int, default=4, help="checkpoints in all, the base included")
    args = ap.parse_args()
    params = parse_size(args.params.replace("B", "G"))
    folders = build(args.out, params, args.models)
    layers = layers_for(params)
    n = sum(math.prod(s) for s in shapes(layers).values())
    print(f"{len(folders)} checkpoints of {n / 1e9:.2f}B params ({format_size(2 * n)}) in {args.out}")


if __name__ == "__main__":
    main()
