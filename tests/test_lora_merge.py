"""LoRA adapters as merge inputs and ``out_format: lora`` outputs (weightsmith/lora_output.py).

The identity cases are the ones peft's ``add_weighted_adapter`` has got wrong: one adapter at
weight 1 must come back, weights [1, 0] give the first, a negative weight negates, and rsLoRA /
rank / alpha patterns keep their scale. peft (a test dependency) loads every adapter we write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.models import LLAMA_CONFIG, load_folder

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import weightsmith  # noqa: E402
from weightsmith.errors import CheckpointError, OutputError, RecipeError  # noqa: E402
from weightsmith.io.checkpoint import Checkpoint  # noqa: E402
from weightsmith.recipe import load_recipe  # noqa: E402

LLAMA = {k: v for k, v in LLAMA_CONFIG.items() if k != "dtype"}
TARGETS = ["q_proj", "v_proj", "down_proj"]
VARIANTS = {
    "plain": {"r": 4, "lora_alpha": 8},
    "rslora": {"r": 4, "lora_alpha": 16, "use_rslora": True},
    "patterns": {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2},
                 "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 3}},
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama") / "base"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(folder)
    return folder


def _model(base: Path) -> torch.nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)


def _adapter(base: Path, folder: Path, seed: int, **config: object) -> Path:
    torch.manual_seed(seed)
    cfg = {"target_modules": TARGETS, **config}
    peft.get_peft_model(_model(base), peft.LoraConfig(init_lora_weights=False, **cfg)).save_pretrained(folder)
    return folder


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    merged = peft.PeftModel.from_pretrained(_model(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _recipe(base: Path, adapters: list[Path], weights: list[float], method: str = "task_arithmetic",
            **extra: object) -> dict:
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": f"{base}+{a}", "parameters": {"weight": w}} for a, w in zip(adapters, weights)],
        **extra,
    }


def _deltas(folder: Path) -> dict[str, torch.Tensor]:
    """module -> ΔW = scale · B @ A of an adapter folder, through weightsmith's reader."""
    ckpt = Checkpoint.open(f"{folder}")  # the adapter weights
    config = json.loads((folder / "adapter_config.json").read_text())
    from weightsmith.io.peft_format import lora_scale

    out = {}
    for key in ckpt.keys():
        if key.endswith("lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = ckpt.read(key.replace("lora_A", "lora_B")).float()
            out[module] = lora_scale(config, module)[1] * (b @ ckpt.read(key).float())
    return out


def _factors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(folder)
    return {k: ckpt.read(k) for k in ckpt.keys()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_adapter_at_weight_one_returns_it(llama: Path, tmp_path: Path, variant: str) -> None:
    ad = _adapter(llama, tmp_path / "ad", 3, **VARIANTS[variant])
    weightsmith.merge(_recipe(llama, [ad], [1.0], out_format="lora"), tmp_path / "out", log=lambda s: None)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"]  # scale 1
    want, got = _deltas(ad), _deltas(tmp_path / "out")
    assert sorted(want) == sorted(got) and len(got) == 3 * len(TARGETS)
    for module, delta in want.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-6, atol=1e-7, msg=module)
    # the factors: A's bytes are the input's; B is the input's times its scale (folded)
    src, out = _factors(ad), _factors(tmp_path / "out")
    in_config = json.loads((ad / "adapter_config.json").read_text())
    from weightsmith.io.peft_format import lora_scale

    for key, a in src.items():
        if "lora_A" in key:
            assert torch.equal(out[key], a.float()), key
        else:
            module = key[len("base_model.model."):-len(".lora_B.weight")]
            scale = lora_scale(in_config, module)[1]
            assert torch.equal(out[key], a.float() * scale), key
    # peft reads our adapter and merges it into the same model as the input adapter
    mine, theirs = _peft_merged(llama, tmp_path / "out"), _peft_merged(llama, ad)
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_weights_one_zero_give_the_first(llama: Path, tmp_path: Path) -> None:
    a1 = _adapter(llama, tmp_path / "a1", 3, r=4, lora_alpha=8)
    a2 = _adapter(llama, tmp_path / "a2", 4, r=2, lora_alpha=2)
    weightsmith.merge(_recipe(llama, [a1], [1.0], out_format="lora"), tmp_path / "one", log=lambda s: None)
    weightsmith.merge(_recipe(llama, [a1, a2], [1.0, 0.0], out_format="lora"), tmp_path / "two",
                      log=lambda s: None)
    one, two = _factors(tmp_path / "one"), _factors(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key  # rank 4, not 6: the zero-weight adapter is dropped
    assert json.loads((tmp_path / "two" / "adapter_config.json").read_text())["r"] == 4


def test_negative_weight_negates(llama: Path, tmp_path: Path) -> None:
    ad = _adapter(llama, tmp_path / "ad", 3, r=4, lora_alpha=16, use_rslora=True)
    weightsmith.merge(_recipe(llama, [ad], [-1.0], out_format="lora"), tmp_path / "out", log=lambda s: None)
    want, got = _deltas(ad), _deltas(tmp_path / "out")
    for module, delta in want.items():
        torch.testing.assert_close(got[module], -delta, rtol=1e-6, atol=1e-7, msg=module)
    assert float(next(iter(got.values())).abs().max()) > 0


def test_concatenation_matches_full_merge_and_rank_grows(llama: Path, tmp_path: Path) -> None:
    a1 = _adapter(llama, tmp_path / "a1", 3, r=4, lora_alpha=8)
    a2 = _adapter(llama, tmp_path / "a2", 4, r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj"])
    notes: list[str] = []
    recipe = _recipe(llama, [a1, a2], [0.7, -0.4], parameters={"lambda": 0.5})
    weightsmith.merge({**recipe, "out_format": "lora"}, tmp_path / "lora", log=notes.append)
    assert any("rank grows" in n for n in notes)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 6,
                                                            r"model\.layers\.1\.self_attn\.q_proj": 6,
                                                            r"model\.layers\.2\.self_attn\.q_proj": 6}
    weightsmith.merge(recipe, tmp_path / "full")
    full = load_folder(tmp_path / "full")
    mine = _peft_merged(llama, tmp_path / "lora")
    base = load_folder(llama)
    d1, d2 = _deltas(a1), _deltas(a2)
    for key, value in full.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-6, atol=1e-6, msg=key)
        # and the full merge is base + lambda * sum w_i s_i B_i A_i to float32 rounding
        module = key.removesuffix(".weight")
        want = base[key].float() + 0.5 * (0.7 * d1.get(module, 0) - 0.4 * d2.get(module, 0))
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6, msg=key)


def test_linear_normalized_concatenates(llama: Path, tmp_path: Path) -> None:
    ad = _adapter(llama, tmp_path / "ad", 3, r=4, lora_alpha=8)
    recipe = _recipe(llama, [ad], [3.0], method="linear")
    # mergekit's object form of a LoRA reference
    recipe["models"][0]["model"] = {"model": {"path": str(llama)}, "lora": {"path": str(ad)}}
    recipe["models"].append({"model": str(llama), "parameters": {"weight": 1.0}})
    weightsmith.merge({**recipe, "out_format": "lora"}, tmp_path / "lora", log=lambda s: None)
    got, want = _deltas(tmp_path / "lora"), _deltas(ad)
    for module, delta in want.items():  # 3/4 of the adapter
        torch.testing.assert_close(got[module], 0.75 * delta, rtol=1e-6, atol=1e-7, msg=module)


def test_other_methods_refactor_by_svd(llama: Path, tmp_path: Path) -> None:
    a1 = _adapter(llama, tmp_path / "a1", 3, r=4, lora_alpha=8)
    a2 = _adapter(llama, tmp_path / "a2", 4, r=4, lora_alpha=8)
    recipe = _recipe(llama, [a1, a2], [1.0, 1.0], method="ties", parameters={"density": 0.5})
    with pytest.raises(RecipeError, match="--out-rank"):
        weightsmith.merge({**recipe, "out_format": "lora"}, tmp_path / "x", log=lambda s: None)
    lines: list[str] = []
    result = weightsmith.merge(recipe, tmp_path / "lora", out_format="lora", out_rank=48, log=lines.append)
    assert result.path == "svd" and any("q_proj" in line for line in lines)
    report = json.loads((tmp_path / "lora" / "extract_report.json").read_text())
    lora = [m for m in report["modules"] if m["kind"] == "lora"]
    assert len(lora) == 3 * len(TARGETS) and max(m["relative_error"] for m in lora) < 1e-5  # full rank
    weightsmith.merge(recipe, tmp_path / "full")
    full, mine = load_folder(tmp_path / "full"), _peft_merged(llama, tmp_path / "lora")
    for key, value in full.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-5, msg=key)
    # a low rank: the error is reported, and it is what the factors really leave out
    result = weightsmith.merge(recipe, tmp_path / "r2", out_format="lora", out_rank=2, log=lambda s: None)
    errors = {m.module: m.relative_error for m in result.modules if m.rank}
    assert all(0 < e < 1 for e in errors.values())
    key = "model.layers.1.self_attn.q_proj.weight"
    delta = full[key] - load_folder(llama)[key]
    got = _deltas(tmp_path / "r2")["model.layers.1.self_attn.q_proj"]
    err = float(torch.linalg.matrix_norm(delta - got) / torch.linalg.matrix_norm(delta))
    assert err == pytest.approx(errors["model.layers.1.self_attn.q_proj"], rel=1e-3)


def test_unsupported_variant_refused_by_name(llama: Path, tmp_path: Path) -> None:
    ad = _adapter(llama, tmp_path / "ad", 3, r=4, lora_alpha=8)
    config = json.loads((ad / "adapter_config.json").read_text())
    config["use_dora"] = True
    (ad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="DoRA"):
        weightsmith.merge(_recipe(llama, [ad], [1.0], out_format="lora"), tmp_path / "out")


def test_out_inside_an_adapter_refused(llama: Path, tmp_path: Path) -> None:
    ad = _adapter(llama, tmp_path / "ad", 3, r=4, lora_alpha=8)
    with pytest.raises(OutputError, match="inside the input model .* folder"):
        weightsmith.merge(_recipe(llama, [ad], [1.0], out_format="lora"), ad / "out")
    assert not (ad / "out").exists()


def test_recipe_field_and_cli(llama: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="out_format"):
        load_recipe({"merge_method": "linear", "models": ["a"], "out_format": "gguf"})
    assert load_recipe({"merge_method": "linear", "models": ["a"], "out_format": "lora"}).out_format == "lora"
    from weightsmith.cli import main

    ad = _adapter(llama, tmp_path / "ad", 3, r=4, lora_alpha=8)
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(llama, [ad], [1.0])))
    res = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "out"), "--out-format", "lora"])
    assert res.exit_code == 0, res.output
    assert "wrote LoRA adapter" in res.output and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "model.safetensors").exists()
