"""LoRA references ``BASE+ADAPTER``: our lazily adapted tensors against peft's merge_and_unload.

peft is a test dependency only; weightsmith reads the adapter files itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.models import LLAMA_CONFIG, load_folder

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from weightsmith.errors import CheckpointError, RecipeError  # noqa: E402
from weightsmith.io.checkpoint import Checkpoint  # noqa: E402
from weightsmith.io.lora import LoraCheckpoint  # noqa: E402
from weightsmith.model_ref import ModelRef, parse_model_ref  # noqa: E402

LLAMA = {k: v for k, v in LLAMA_CONFIG.items() if k != "dtype"}


def _llama_base(folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(dtype)
    model.save_pretrained(folder)
    return folder


def _gpt2_base(folder: Path) -> Path:
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _load(base: Path) -> torch.nn.Module:
    config = json.loads((base / "config.json").read_text())
    cls = transformers.GPT2LMHeadModel if config["model_type"] == "gpt2" else transformers.LlamaForCausalLM
    return cls.from_pretrained(base, torch_dtype="auto")


def _adapter(base: Path, folder: Path, seed: int = 3, **config: object) -> Path:
    """A peft LoRA adapter with random nonzero A and B (init_lora_weights=False), saved."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(_load(base), peft.LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(folder)
    return folder


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    merged = peft.PeftModel.from_pretrained(_load(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _compare(base: Path, adapter: Path) -> tuple[int, int]:
    """Every tensor of base+adapter equals peft's merged model; returns (exact, changed) counts."""
    ours = Checkpoint.open(f"{base}+{adapter}")
    assert isinstance(ours, LoraCheckpoint)
    want = _peft_merged(base, adapter)
    plain = Checkpoint.open(base)
    exact = changed = 0
    for key in ours.keys():
        got = ours.read(key)
        assert got.dtype == plain.entry(key).dtype and tuple(got.shape) == plain.entry(key).shape
        ref = want[key]
        # float32 rounding: the product B @ A may be blocked differently by peft's call and ours
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, msg=key)
        exact += torch.equal(got, ref)
        changed += not torch.equal(got, plain.read(key))
    assert changed > 0
    return exact, changed


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _llama_base(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _gpt2_base(tmp_path_factory.mktemp("gpt2") / "base")


def test_plain_lora_matches_peft_merge(llama: Path, tmp_path: Path) -> None:
    adapter = _adapter(llama, tmp_path / "ad", r=4, lora_alpha=8,
                       target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    exact, changed = _compare(llama, adapter)
    assert changed == 3 * 4  # four modules in each of three layers
    assert exact == len(Checkpoint.open(llama).keys())  # bit-identical on this CPU


def test_rslora_scale(llama: Path, tmp_path: Path) -> None:
    adapter = _adapter(llama, tmp_path / "ad", r=4, lora_alpha=16, use_rslora=True,
                       target_modules=["q_proj", "up_proj"])
    _compare(llama, adapter)
    ours = Checkpoint.open(f"{llama}+{adapter}")
    assert ours.adapter.patches["model.layers.0.self_attn.q_proj.weight"].scale == 16 / 2  # alpha/sqrt(r)


def test_rank_and_alpha_patterns(llama: Path, tmp_path: Path) -> None:
    adapter = _adapter(
        llama, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6},
        alpha_pattern={"gate_proj": 3, r"layers\.2\.self_attn\.q_proj": 20},
    )
    _compare(llama, adapter)
    patches = Checkpoint.open(f"{llama}+{adapter}").adapter.patches
    assert patches["model.layers.0.self_attn.q_proj.weight"].scale == 8 / 2
    assert patches["model.layers.1.self_attn.q_proj.weight"].scale == 8 / 4
    assert patches["model.layers.2.self_attn.q_proj.weight"].scale == 20 / 4
    assert patches["model.layers.1.self_attn.v_proj.weight"].scale == 8 / 6
    assert patches["model.layers.1.mlp.gate_proj.weight"].scale == 3 / 4


def test_modules_to_save_and_embedding_lora(llama: Path, tmp_path: Path) -> None:
    adapter = _adapter(llama, tmp_path / "ad", r=4, lora_alpha=8,
                       target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    # make the saved copies differ from the base, as training would
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lm_head.weight"] += 0.5
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] -= 0.25
    save_file(tensors, path)
    _compare(llama, adapter)
    ours = Checkpoint.open(f"{llama}+{adapter}")
    torch.testing.assert_close(ours.read("lm_head.weight"), tensors["base_model.model.lm_head.weight"])
    emb = ours.adapter.patches["model.embed_tokens.weight"]
    assert emb.embedding and emb.transposed and emb.replacement is not None


@pytest.mark.parametrize("fan_in_fan_out", [True, False])
def test_gpt2_conv1d_fan_in_fan_out(gpt2: Path, tmp_path: Path, fan_in_fan_out: bool) -> None:
    # c_proj is square (16 x 16): only the architecture tells that it is stored transposed;
    # peft switches fan_in_fan_out on for Conv1D even when the config says False.
    adapter = _adapter(gpt2, tmp_path / "ad", r=2, lora_alpha=4, fan_in_fan_out=fan_in_fan_out,
                       target_modules=["c_attn", "c_proj", "c_fc"])
    _, changed = _compare(gpt2, adapter)
    assert changed == 2 * 3 + 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer ("c_proj" matches both)


def test_bfloat16_base_rounds_once_like_peft(tmp_path: Path) -> None:
    base = _llama_base(tmp_path / "base", torch.bfloat16)
    adapter = _adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])
    exact, _ = _compare(base, adapter)
    assert exact == len(Checkpoint.open(base).keys())


def test_row_blocks_equal_whole_reads(llama: Path, gpt2: Path, tmp_path: Path) -> None:
    a1 = _adapter(llama, tmp_path / "a1", r=4, target_modules=["q_proj", "embed_tokens", "down_proj"])
    a2 = _adapter(gpt2, tmp_path / "a2", r=2, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])
    for ckpt in (Checkpoint.open(f"{llama}+{a1}"), Checkpoint.open(f"{gpt2}+{a2}")):
        for key, patch in ckpt.adapter.patches.items():
            whole = ckpt.read(key)
            n = whole.shape[0]
            blocks = [ckpt.read(key, (r0, min(r0 + 5, n))) for r0 in range(0, n, 5)]
            # A[:, r0:r1] (transposed layouts) may be multiplied in another blocking than A
            atol = 1e-6 * float(whole.abs().max())
            torch.testing.assert_close(torch.cat(blocks), whole, rtol=1e-6, atol=atol, msg=key)
            assert patch.a_key is not None


def test_recipe_with_lora_reference_merges(llama: Path, tmp_path: Path) -> None:
    import weightsmith

    adapter = _adapter(llama, tmp_path / "ad", r=4, target_modules=["q_proj", "v_proj"])
    recipe = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            {"model": f"{llama}+{adapter}", "parameters": {"weight": 0.5}},
            {"model": str(llama), "parameters": {"weight": 0.5}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    weightsmith.merge(str(path), tmp_path / "out")
    out = load_folder(tmp_path / "out")
    want = _peft_merged(llama, adapter)
    base = Checkpoint.open(llama)
    key = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(out[key], 0.5 * want[key] + 0.5 * base.read(key), rtol=1e-6, atol=1e-6)
    key = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(out[key], base.read(key))
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_overwrite_onto_the_adapter_folder_is_refused(llama: Path, tmp_path: Path) -> None:
    import weightsmith
    from weightsmith.errors import OutputError

    adapter = _adapter(llama, tmp_path / "ad", r=4, target_modules=["q_proj"])
    before = sorted(p.name for p in adapter.iterdir())
    model = {"model": f"{llama}+{adapter}", "parameters": {"weight": 1.0}}
    recipe = {"merge_method": "linear", "models": [model]}
    with pytest.raises(OutputError, match="adapter"):
        weightsmith.merge(recipe, adapter, overwrite=True)
    assert sorted(p.name for p in adapter.iterdir()) == before


def test_recipe_lora_reference_forms(tmp_path: Path) -> None:
    from weightsmith.recipe import load_recipe

    recipe = load_recipe({
        "merge_method": "linear",
        "models": [
            {"model": "org/base@v1+org/adapter@abc", "parameters": {"weight": 1.0}},
            {"model": {"model": {"path": "org/base", "revision": "r1"}, "lora": {"path": "org/ad"}},
             "parameters": {"weight": 1.0}},
        ],
    })
    assert [m.ref for m in recipe.models] == ["org/base@v1+org/adapter@abc", "org/base@r1+org/ad"]
    parsed = parse_model_ref("org/base@v1+org/adapter@abc")
    assert parsed == ModelRef("org/base", "v1", ModelRef("org/adapter", "abc"))
    with pytest.raises(RecipeError, match="exactly one"):
        load_recipe({"merge_method": "linear", "models": [{"model": "a+b+c", "parameters": {"weight": 1}}]})


def _edit_config(adapter: Path, **fields: object) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"init_lora_weights": "pissa"}, "residual base"),
        ({"target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"some_future_variant": {"k": 1}}, "some_future_variant"),
    ],
)
def test_unsupported_variants_are_refused_by_name(
    llama: Path, tmp_path: Path, fields: dict, message: str
) -> None:
    adapter = _adapter(llama, tmp_path / "ad", r=2, target_modules=["q_proj"])
    _edit_config(adapter, **fields)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(f"{llama}+{adapter}")


def test_real_dora_and_lora_bias_adapters_are_refused(llama: Path, tmp_path: Path) -> None:
    dora = _adapter(llama, tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        Checkpoint.open(f"{llama}+{dora}")
    _edit_config(dora, use_dora=False)  # a config that lies: the magnitude tensor still refuses it
    with pytest.raises(CheckpointError, match="DoRA magnitude"):
        Checkpoint.open(f"{llama}+{dora}")
    bias = _adapter(llama, tmp_path / "bias", r=2, target_modules=["q_proj"], lora_bias=True)
    _edit_config(bias, lora_bias=False)  # the lora_B.bias tensor still refuses it
    with pytest.raises(CheckpointError, match="LoRA bias"):
        Checkpoint.open(f"{llama}+{bias}")
    torch.manual_seed(0)
    loha = peft.get_peft_model(_load(llama), peft.LoHaConfig(r=2, target_modules=["q_proj"]))
    loha.save_pretrained(tmp_path / "loha")
    with pytest.raises(CheckpointError, match="LOHA"):
        Checkpoint.open(f"{llama}+{tmp_path / 'loha'}")


def test_adapter_for_another_base_is_refused(llama: Path, gpt2: Path, tmp_path: Path) -> None:
    adapter = _adapter(llama, tmp_path / "ad", r=2, target_modules=["q_proj"])
    with pytest.raises(CheckpointError, match="has no tensor 'model.layers.0.self_attn.q_proj.weight'"):
        Checkpoint.open(f"{gpt2}+{adapter}")
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        Checkpoint.open(f"{llama}+{llama}")


def test_hub_ids_with_revisions_on_both_sides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    from tests.models import random_state, save_model
    from tests.test_lora_parity import ADAPTERS, write_adapter

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sha_base, sha_lora = "1" * 40, "2" * 40
    state = random_state(LLAMA_CONFIG, seed=5)
    base = save_model(cache / "models--acme--base" / "snapshots" / sha_base, state, LLAMA_CONFIG, shards=1)
    (cache / "models--acme--base" / "refs").mkdir()
    (cache / "models--acme--base" / "refs" / "main").write_text(sha_base)
    adapter = write_adapter(cache / "models--acme--lora" / "snapshots" / sha_lora, state, 7, ADAPTERS["ad1"])
    (cache / "models--acme--lora" / "refs").mkdir()
    (cache / "models--acme--lora" / "refs" / "v2").write_text(sha_lora)

    hub = Checkpoint.open(f"acme/base@{sha_base}+acme/lora@v2")
    local = Checkpoint.open(f"{base}+{adapter}")
    key = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(hub.read(key), local.read(key)) and not torch.equal(hub.read(key), state[key])
    info = hub.provenance()
    assert info["revision"] == sha_base and info["adapter"]["revision"] == sha_lora
    assert info["adapter"]["model"] == "acme/lora@v2"
    with pytest.raises(CheckpointError, match="acme/nothing"):
        Checkpoint.open("acme/base+acme/nothing")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_replace_the_base_biases(gpt2: Path, tmp_path: Path, bias: str) -> None:
    from safetensors.torch import load_file, save_file

    adapter = _adapter(gpt2, tmp_path / "ad", r=2, fan_in_fan_out=True, target_modules=["c_attn"], bias=bias)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    biases = [k for k in tensors if k.endswith(".bias")]
    assert biases  # peft saved the biases it trains
    for k in biases:  # as training would have changed them
        tensors[k] = tensors[k] + 0.25
    save_file(tensors, path)
    _, changed = _compare(gpt2, adapter)
    assert changed >= len(biases)
    ours = Checkpoint.open(f"{gpt2}+{adapter}")
    assert ours.adapter.patches["transformer.h.0.attn.c_attn.bias"].replacement is not None
