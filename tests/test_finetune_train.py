"""Training-loop guarantees on seconds-fast random models: reproducibility, masks, freezing."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file, save_file  # noqa: E402

from weightsmith.errors import CheckpointError, OutputError  # noqa: E402
from weightsmith.finetune import OptionError, finetune  # noqa: E402
from weightsmith.testbeds import seq_tasks as st  # noqa: E402
from weightsmith.testbeds.tiny import make_tiny_bert, make_tiny_llama  # noqa: E402


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "base", seed=0)


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = st.sample(st.copy, 64, seed=3) + st.sample(st.reverse, 64, seed=4)
    return write_jsonl(tmp_path_factory.mktemp("data") / "lm.jsonl", rows)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "base")  # bare BertModel, no head


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = ["red", "green", "blue"]
    rows = [{"text": f"the {w} one number {i}", "label": j}
            for i in range(20) for j, w in enumerate(words)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "cls.jsonl", rows)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# One torch thread: immune to OpenMP spin contention on a busy shared machine (see runtime.py).
LM_OPTS = {"steps": 6, "lr": 1e-2, "batch_size": 16, "quiet": True, "max_length": 32, "threads": 1}


def test_same_seed_gives_identical_bytes(tmp_path: Path, llama: Path, lm_data: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        finetune(llama, tmp_path / name, lm_data, "causal-lm", seed=seed, warmup_steps=2,
                 weight_decay=0.1, **LM_OPTS)
    a, b, c = ((tmp_path / n / "model.safetensors").read_bytes() for n in "abc")
    assert a == b
    assert a != c
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (
        llama / "model.safetensors").read_bytes()


def test_classification_seed_reproducible_with_dropout_mixup(
    tmp_path: Path, bert: Path, cls_data: Path
) -> None:
    opts = {"steps": 4, "lr": 1e-3, "batch_size": 8, "quiet": True, "max_length": 16,
            "label_smoothing": 0.1, "mixup": 0.4, "grad_accum": 2, "threads": 1}
    for name in ("a", "b"):
        finetune(bert, tmp_path / name, cls_data, "classification", seed=5, **opts)
    finetune(bert, tmp_path / "plain", cls_data, "classification", seed=5, steps=4, lr=1e-3,
             batch_size=8, quiet=True, max_length=16, grad_accum=2, threads=1)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "plain" / "model.safetensors").read_bytes()  # mixup/LS are live
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["new_head"] is True and log["num_labels"] == 3
    assert log["options"]["mixup"] == 0.4


def test_mask_changes_exactly_the_masked_entries(
    tmp_path: Path, llama: Path, lm_data: Path
) -> None:
    base = weights(llama)
    gen = torch.Generator().manual_seed(0)
    masked = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    mask = {k: (torch.rand(base[k].shape, generator=gen) < 0.3).to(torch.uint8) for k in masked}
    mask["lm_head.weight"] = torch.zeros_like(base["lm_head.weight"])  # present but all zero
    save_file(mask, str(tmp_path / "mask.safetensors"))
    # Weight decay would move every entry it touches: the mask must hold regardless.
    finetune(llama, tmp_path / "out", lm_data, "causal-lm", mask=tmp_path / "mask.safetensors",
             weight_decay=0.5, **LM_OPTS)
    tuned = weights(tmp_path / "out")
    assert tuned.keys() == base.keys()
    for key, before in base.items():
        after = tuned[key]
        if key in masked:
            on = mask[key].bool()
            assert torch.equal(after[~on], before[~on]), key  # bitwise
            assert bool((after[on] != before[on]).all()), key
        else:
            assert torch.equal(after, before), key


def test_mask_errors(tmp_path: Path, llama: Path, lm_data: Path) -> None:
    save_file({"no.such.weight": torch.ones(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="no.such.weight"):
        finetune(llama, tmp_path / "o1", lm_data, "causal-lm", mask=tmp_path / "bad.safetensors",
                 **LM_OPTS)
    save_file({"lm_head.weight": torch.ones(3, 3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match="shape"):
        finetune(llama, tmp_path / "o2", lm_data, "causal-lm",
                 mask=tmp_path / "shape.safetensors", **LM_OPTS)


def test_freeze_and_train_only(tmp_path: Path, llama: Path, lm_data: Path) -> None:
    base = weights(llama)
    finetune(llama, tmp_path / "only", lm_data, "causal-lm", train_only=["lm_head"], **LM_OPTS)
    tuned = weights(tmp_path / "only")
    assert [k for k in base if not torch.equal(base[k], tuned[k])] == ["lm_head.weight"]

    finetune(llama, tmp_path / "frz", lm_data, "causal-lm", freeze=["embed_tokens", r"layers\.1\."],
             **LM_OPTS)
    tuned = weights(tmp_path / "frz")
    for key in base:
        frozen = "embed_tokens" in key or ".layers.1." in key
        assert torch.equal(base[key], tuned[key]) == frozen, key
    with pytest.raises(OptionError, match="no parameter is left trainable"):
        finetune(llama, tmp_path / "none", lm_data, "causal-lm", train_only=["nothing"],
                 **LM_OPTS)


def test_half_freeze_freezes_half_of_each_block(
    tmp_path: Path, llama: Path, lm_data: Path
) -> None:
    base = weights(llama)
    finetune(llama, tmp_path / "hft", lm_data, "causal-lm", half_freeze=True, seed=3,
             weight_decay=0.1, **LM_OPTS)
    tuned = weights(tmp_path / "hft")
    for layer in (0, 1):
        mats = [k for k in base if f"layers.{layer}." in k and base[k].dim() == 2]
        unchanged = [k for k in mats if torch.equal(base[k], tuned[k])]
        assert len(mats) == 7 and len(unchanged) == len(mats) // 2
    # Outside the blocks nothing is frozen.
    assert not torch.equal(base["lm_head.weight"], tuned["lm_head.weight"])


def test_init_from_starts_from_other_weights(tmp_path: Path, llama: Path, lm_data: Path) -> None:
    other = make_tiny_llama(tmp_path / "other", seed=7)
    finetune(llama, tmp_path / "out", lm_data, "causal-lm", init_from=other,
             train_only=["lm_head"], **LM_OPTS)
    start, tuned = weights(other), weights(tmp_path / "out")
    for key in start:
        assert torch.equal(start[key], tuned[key]) == (key != "lm_head.weight"), key


def test_init_from_accepts_bare_backbone_names(
    tmp_path: Path, bert: Path, cls_data: Path
) -> None:
    """A merged BertModel (keys without 'bert.') initialises a classification fine-tune."""
    other = make_tiny_bert(tmp_path / "other", seed=9)
    with pytest.warns(UserWarning, match="2 tensors not provided, kept from the base"):
        finetune(bert, tmp_path / "out", cls_data, "classification", init_from=other,
                 train_only=["classifier"], steps=2, lr=1e-3, batch_size=8, quiet=True,
                 max_length=16, threads=1)
    start, tuned = weights(other), weights(tmp_path / "out")
    for key, value in start.items():
        assert torch.equal(tuned[f"bert.{key}"], value), key


def test_train_log_and_schedule(tmp_path: Path, llama: Path, lm_data: Path) -> None:
    finetune(llama, tmp_path / "out", lm_data, "causal-lm", steps=10, warmup_steps=4, lr=1e-2,
             batch_size=16, grad_accum=2, quiet=True, max_length=32, threads=1)
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())
    lrs = [s["lr"] for s in log["steps"]]
    assert [s["step"] for s in log["steps"]] == list(range(1, 11))
    assert lrs[:5] == pytest.approx([2e-3, 4e-3, 6e-3, 8e-3, 1e-2])  # linear warmup to peak
    assert all(a > b > 0 for a, b in zip(lrs[4:], lrs[5:], strict=False))  # cosine decay
    assert all(s["loss"] > 0 and s["elapsed_s"] >= 0 for s in log["steps"])
    assert log["wall_time_s"] > 0 and log["total_steps"] == 10
    assert log["versions"]["torch"] and log["options"]["grad_accum"] == 2
    # The output is a complete transformers folder with the tokenizer copied byte for byte.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (llama / name).read_bytes()


def test_loss_curve_png_or_warning(tmp_path: Path, llama: Path, lm_data: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="matplotlib is not installed"):
            finetune(llama, tmp_path / "out", lm_data, "causal-lm", **LM_OPTS)
        assert not (tmp_path / "out" / "loss_curve.png").exists()
    else:
        finetune(llama, tmp_path / "out", lm_data, "causal-lm", **LM_OPTS)
        assert (tmp_path / "out" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_refuses_to_clobber_and_bad_options(tmp_path: Path, llama: Path, lm_data: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="--overwrite"):
        finetune(llama, out, lm_data, "causal-lm", **LM_OPTS)
    with pytest.raises(OptionError, match="mixup"):
        finetune(llama, tmp_path / "o", lm_data, "causal-lm", mixup=0.2, **LM_OPTS)
    with pytest.raises(OptionError, match=re.escape("unknown fine-tuning option(s): lrr")):
        finetune(llama, tmp_path / "o", lm_data, "causal-lm", lrr=1.0)
    with pytest.raises(OutputError, match="base model folder"):
        finetune(llama, llama, lm_data, "causal-lm", **LM_OPTS)
