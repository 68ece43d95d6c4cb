"""extract-lora: a PEFT adapter from FINE_TUNE - BASE, checked by loading it with peft."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.models import LLAMA_CONFIG, save_model
from weightsmith.errors import OutputError, RecipeError
from weightsmith.ops.lowrank import rank_for_energy, relative_error, tail_error, truncated_svd

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from weightsmith.lora_extraction import REPORT, extract_lora  # noqa: E402

LLAMA = {k: v for k, v in LLAMA_CONFIG.items() if k != "dtype"}


def _low_rank(g: torch.Generator, shape: tuple[int, int], rank: int, scale: float) -> torch.Tensor:
    return scale * torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A float32 tiny Llama and a fine-tune whose changes have known ranks."""
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    model.save_pretrained(root / "base")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for n in range(LLAMA["num_hidden_layers"]):
        p = f"model.layers.{n}."
        state[p + "self_attn.q_proj.weight"] += _low_rank(g, (32, 32), 2, 0.05)  # rank 2
        state[p + "mlp.down_proj.weight"] += _low_rank(g, (32, 48), 1, 0.05)  # rank 1
        state[p + "self_attn.v_proj.weight"] += 0.01 * torch.randn(16, 32, generator=g)  # full rank
        state[p + "input_layernorm.weight"] += 0.1
    state["model.embed_tokens.weight"] += _low_rank(g, (64, 32), 3, 0.05)
    state["lm_head.weight"] += 0.01 * torch.randn(64, 32, generator=g)
    config = json.loads((root / "base" / "config.json").read_text())
    save_model(root / "ft", state, config, shards=2, tokenizer=False)
    return root / "base", root / "ft", state


def _merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _base_state(base: Path) -> dict[str, torch.Tensor]:
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_peft_loads_adapter_and_matches_within_reported_error(pair, tmp_path: Path) -> None:
    base, ft, state = pair
    result = extract_lora(ft, base, tmp_path / "ad", rank=2)
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    merged, before = _merged(base, tmp_path / "ad"), _base_state(base)
    report = {m.module: m for m in result.modules}
    lora = [m for m in result.modules if m.kind == "lora"]
    assert {m.module.rsplit(".", 1)[-1] for m in lora} == {"q_proj", "down_proj", "v_proj", "lm_head"}
    for m in lora:
        key = m.module + ".weight"
        want = state[key] - before[key]
        got = merged[key] - before[key]
        err = float(torch.linalg.matrix_norm(want - got) / torch.linalg.matrix_norm(want))
        # the merged model's error is the reported one (up to float32 rounding of W + BA)
        assert abs(err - m.relative_error) < 1e-4 + 1e-3 * m.relative_error, m.module
    assert report["model.layers.0.self_attn.q_proj"].relative_error < 1e-5  # rank 2 captured
    assert report["model.layers.0.mlp.down_proj"].rank == 2  # a fixed rank keeps rounding-noise directions
    assert report["model.layers.0.mlp.down_proj"].relative_error < 1e-5
    assert report["model.layers.0.self_attn.v_proj"].relative_error > 0.3  # full-rank change
    assert report["model.layers.0.input_layernorm"].kind == "not-captured"
    assert report["model.embed_tokens"].kind == "not-captured"
    written = json.loads((tmp_path / "ad" / REPORT).read_text())
    assert {m["module"] for m in written["modules"]} == set(report)


def test_full_rank_gives_the_fine_tune_back(pair, tmp_path: Path) -> None:
    base, ft, state = pair
    result = extract_lora(ft, base, tmp_path / "ad", rank=64, embed_lora=True, save_modules=["norm"],
                          svd="auto")
    merged = _merged(base, tmp_path / "ad")
    for key, want in state.items():
        torch.testing.assert_close(merged[key], want, rtol=1e-5, atol=2e-6, msg=key)
    assert all(m.relative_error < 1e-5 for m in result.modules if m.rank)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "model.norm" in config["modules_to_save"] and "model.embed_tokens" in config["target_modules"]
    # weightsmith's own reader applies the adapter the same way
    from weightsmith.io.checkpoint import Checkpoint

    ours = Checkpoint.open(f"{base}+{tmp_path / 'ad'}")
    for key in ours.keys():
        torch.testing.assert_close(ours.read(key), merged[key], rtol=1e-6, atol=1e-6, msg=key)


def test_energy_selects_rank_per_module(pair, tmp_path: Path) -> None:
    base, ft, _ = pair
    result = extract_lora(ft, base, tmp_path / "ad", energy=0.999, include=["q_proj", "down_proj"])
    ranks = {m.module.rsplit(".", 1)[-1]: m.rank for m in result.modules if m.rank}
    assert ranks == {"q_proj": 2, "down_proj": 1}
    config = result.config
    assert config["r"] in (1, 2) and len(config["rank_pattern"]) == 3
    assert config["alpha_pattern"] == config["rank_pattern"]
    merged, before = _merged(base, tmp_path / "ad"), _base_state(base)
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(merged[key], before[key])
    assert all(m.relative_error < 1e-5 for m in result.modules if m.rank)
    v_proj = "model.layers.1.self_attn.v_proj.weight"  # excluded by --include: left as the base
    assert merged[v_proj].equal(before[v_proj])


def test_rank_for_energy_and_tail_error() -> None:
    s = torch.tensor([4.0, 3.0, 0.0])  # energies 16/25, 25/25
    assert rank_for_energy(s, 0.6) == 1
    assert rank_for_energy(s, 0.64) == 1
    assert rank_for_energy(s, 0.7) == 2
    assert rank_for_energy(s, 1.0) == 2  # zero singular values are never kept
    assert rank_for_energy(torch.zeros(3), 0.9) == 0
    assert math.isclose(tail_error(s, 1), 3 / 5)
    with pytest.raises(ValueError):
        rank_for_energy(s, 0.0)


def test_randomized_svd_close_to_exact_on_decaying_spectrum() -> None:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    v, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    m = (u * torch.arange(1, 201, dtype=torch.float32) ** -1.0) @ v.T
    exact = truncated_svd(m, 8, "exact")
    rand = truncated_svd(m, 8, "randomized")
    e_exact, e_rand = relative_error(m, exact.b, exact.a), relative_error(m, rand.b, rand.a)
    assert math.isclose(e_exact, tail_error(exact.singular_values, 8), rel_tol=1e-4)
    assert e_exact * (1 - 1e-5) <= e_rand < 1.01 * e_exact  # optimal up to float32 rounding
    assert rand.rank == exact.rank == 8


def test_gpt2_conv1d_adapter_loads_in_peft(tmp_path: Path) -> None:
    torch.manual_seed(1)
    # an untied lm_head: nn.Linear ([out, in]) beside the Conv1D layers ([in, out])
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16,
                                     tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    state["transformer.h.0.attn.c_attn.weight"] += _low_rank(g, (16, 48), 2, 0.1)  # [in, out]
    state["transformer.h.0.mlp.c_proj.weight"] += _low_rank(g, (64, 16), 1, 0.1)
    state["lm_head.weight"] += _low_rank(g, (40, 16), 2, 0.1)
    save_model(tmp_path / "ft", state, json.loads((tmp_path / "base" / "config.json").read_text()), shards=1)
    result = extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "ad", rank=2)
    assert result.config["fan_in_fan_out"] is True
    merged = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "ad"
    ).merge_and_unload().state_dict()
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(merged[key], state[key], rtol=1e-5, atol=1e-6, msg=key)


def test_out_refusals_leave_nothing_behind(pair, tmp_path: Path) -> None:
    base, ft, _ = pair
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        extract_lora(ft, base, tmp_path / "taken", rank=2)
    # the merge path's checks (output_checks.check_clear_of_inputs), symlinks resolved
    with pytest.raises(OutputError, match="is inside the input model .* folder"):
        extract_lora(ft, base, base / "adapter", rank=2)
    with pytest.raises(OutputError, match="is or contains an input .--overwrite would delete"):
        extract_lora(ft, base, ft, rank=2, overwrite=True)
    with pytest.raises(OutputError, match="is or contains an input"):
        extract_lora(ft, base, base.parent, rank=2, overwrite=True)
    (tmp_path / "link").symlink_to(ft)
    with pytest.raises(OutputError, match="is or contains an input"):
        extract_lora(ft, base, tmp_path / "link", rank=2, overwrite=True)
    (tmp_path / "link").unlink()
    with pytest.raises(RecipeError, match="exactly one"):
        extract_lora(ft, base, tmp_path / "x", rank=2, energy=0.9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert sorted(p.name for p in base.iterdir()) == sorted(["config.json", "generation_config.json",
                                                             "model.safetensors"])


def test_cli_prints_table_and_overwrites_on_request(pair, tmp_path: Path) -> None:
    from weightsmith.cli import main

    base, ft, _ = pair
    out = tmp_path / "ad"
    args = ["extract-lora", str(ft), str(base), str(out), "--rank", "2", "--exclude", "lm_head"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "model.layers.2.self_attn.q_proj" in first.output and "worst relative error" in first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == OutputError.exit_code and "already exists" in again.output
    third = CliRunner().invoke(main, [*args, "--overwrite", "--energy", "0.9"])
    assert third.exit_code == RecipeError.exit_code and "exactly one" in third.output
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert "lm_head" not in config["target_modules"]


def test_randomized_svd_option(pair, tmp_path: Path) -> None:
    base, ft, _ = pair
    result = extract_lora(ft, base, tmp_path / "ad", rank=2, svd="randomized", include=["q_proj"])
    rows = [m for m in result.modules if m.rank]
    assert len(rows) == 3 and all(m.note == "svd randomized" and m.relative_error < 1e-5 for m in rows)
    with pytest.raises(RecipeError, match="every singular value"):
        extract_lora(ft, base, tmp_path / "ad2", energy=0.9, svd="randomized")


def test_save_above_error_keeps_full_rank_changes_whole(pair, tmp_path: Path) -> None:
    base, ft, state = pair
    result = extract_lora(ft, base, tmp_path / "ad", rank=2, save_above_error=0.1, save_modules=["norm"])
    kinds = {m.module: m.kind for m in result.modules}
    assert kinds["model.layers.0.self_attn.v_proj"] == "saved"  # full-rank change: error ~0.9
    assert kinds["model.layers.0.self_attn.q_proj"] == "lora"  # rank-2 change: error ~0
    assert "model.layers.0.self_attn.v_proj" in result.config["modules_to_save"]
    assert "model.layers.0.self_attn.v_proj" not in result.config["target_modules"]
    merged = _merged(base, tmp_path / "ad")
    whole = ["model.layers.2.self_attn.v_proj.weight", "lm_head.weight"]
    whole.append("model.layers.1.input_layernorm.weight")
    for key in whole:  # saved whole: exactly the fine-tune's values
        torch.testing.assert_close(merged[key], state[key], rtol=0, atol=0, msg=key)
