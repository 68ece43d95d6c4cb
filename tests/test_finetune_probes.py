"""Evaluator (in-memory scoring), feature_norms and parameter_gradients against references."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file  # noqa: E402

from weightsmith.errors import CheckpointError  # noqa: E402
from weightsmith.finetune import (  # noqa: E402
    Evaluator,
    OptionError,
    evaluate,
    feature_norms,
    parameter_gradients,
)
from weightsmith.testbeds import seq_tasks as st  # noqa: E402
from weightsmith.testbeds.tiny import make_tiny_bert, make_tiny_llama  # noqa: E402


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("probes")


@pytest.fixture(scope="module")
def cls_data(root: Path) -> Path:
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "violin", "tiger", "lamp", "zebra"]
    rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 10))),
             "label": rng.randrange(3)} for _ in range(40)]
    return write_jsonl(root / "cls.jsonl", rows)


@pytest.fixture(scope="module")
def lm_data(root: Path) -> Path:
    return write_jsonl(root / "lm.jsonl", st.sample(st.reverse, 12, seed=5)
                       + st.sample(st.add, 12, seed=6))


@pytest.fixture(scope="module")
def heads(root: Path) -> tuple[Path, Path]:
    return (make_tiny_bert(root / "a", num_labels=3, seed=1),
            make_tiny_bert(root / "b", num_labels=3, seed=2))


def test_evaluator_matches_evaluate(heads: tuple[Path, Path], cls_data: Path) -> None:
    a, b = heads
    ev = Evaluator(a, cls_data, "classification", batch_size=8)
    assert ev.evaluate() == evaluate(a, cls_data, "classification", batch_size=8)
    other = load_file(str(b / "model.safetensors"))
    assert ev.evaluate(other) == evaluate(b, cls_data, "classification", batch_size=8)
    assert ev.score(other) == ev.evaluate(other)["accuracy"]
    assert ev.score(lambda: iter(other.items())) == ev.score(other)  # streamed source
    assert ev.evaluate() == evaluate(a, cls_data, "classification", batch_size=8)  # reset


def test_evaluator_unprovided_keys_revert_to_folder(
    tmp_path: Path, heads: tuple[Path, Path], cls_data: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    a, b = heads
    other = load_file(str(b / "model.safetensors"))
    head_only = {k: v for k, v in other.items() if k.startswith("classifier.")}
    # Reference: folder a with b's head, written to disk and evaluated the ordinary way.
    model = AutoModelForSequenceClassification.from_pretrained(a)
    model.load_state_dict(head_only, strict=False)
    model.save_pretrained(tmp_path / "mixed")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (a / name).exists():
            (tmp_path / "mixed" / name).write_bytes((a / name).read_bytes())
    expected = evaluate(tmp_path / "mixed", cls_data, "classification", batch_size=8)

    ev = Evaluator(a, cls_data, "classification", batch_size=8)
    ev.evaluate(other)  # everything from b first ...
    assert ev.evaluate(head_only) == expected  # ... then only the head: the rest reverts to a
    # A bare backbone's names (no "bert." prefix) address the same tensors.
    backbone = {k[len("bert."):]: v for k, v in other.items() if k.startswith("bert.")}
    prefixed = {k: v for k, v in other.items() if k.startswith("bert.")}
    assert ev.evaluate(backbone) == ev.evaluate(prefixed)


def test_evaluator_is_strict_on_provided_keys(heads: tuple[Path, Path], cls_data: Path) -> None:
    ev = Evaluator(heads[0], cls_data, "classification", metric="loss")
    assert ev.higher_is_better is False
    with pytest.raises(CheckpointError, match="does not exist"):
        ev.score({"encoder.layer.9.output.dense.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="shape"):
        ev.score({"classifier.weight": torch.zeros(2, 2)})
    with pytest.raises(OptionError, match="exact_match"):
        Evaluator(heads[0], cls_data, "classification", metric="exact_match")


def test_evaluator_causal_lm(root: Path, lm_data: Path) -> None:
    llama = make_tiny_llama(root / "llama", seed=0)
    ev = Evaluator(llama, lm_data, "causal-lm", metric="loss")
    assert ev.score() == pytest.approx(evaluate(llama, lm_data, "causal-lm")["loss"], rel=1e-6)
    zeros = {k: torch.zeros_like(v) for k, v in ev.model.state_dict().items()
             if k == "lm_head.weight"}
    # All-zero logits: uniform next-token distribution, loss = log(vocab size).
    assert ev.score(zeros) == pytest.approx(float(torch.log(torch.tensor(len(ev.loaded.tokenizer)))))


def manual_input_sumsq(model: torch.nn.Module, inputs: list[dict[str, torch.Tensor]],
                       prefix: str = "") -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[prefix + name] = sums.get(prefix + name, 0) + x.pow(2).sum(0)
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for enc in inputs:  # one example at a time: no padding to exclude
            model(**enc)
    for h in hooks:
        h.remove()
    return sums


@pytest.mark.slow  # one unpadded forward pass per example
def test_feature_norms_match_unpadded_reference(root: Path, cls_data: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    bare = make_tiny_bert(root / "bare", seed=3)  # a BertModel: names without "bert."
    norms = feature_norms(bare, cls_data, "classification", batch_size=7)
    model = AutoModel.from_pretrained(bare).eval()
    tokenizer = AutoTokenizer.from_pretrained(bare)
    rows = [json.loads(line) for line in cls_data.read_text().splitlines()]
    sums = manual_input_sumsq(model, [tokenizer(r["text"], return_tensors="pt") for r in rows])
    assert "encoder.layer.0.attention.self.query" in sums
    # The new classification head is a Linear too; everything else matches the file's names.
    assert set(norms) == set(sums) | {"classifier"}
    for name, s in sums.items():
        torch.testing.assert_close(norms[name], s.sqrt().float(), rtol=1e-4, atol=1e-5)


def test_parameter_gradients_match_full_batch_reference(root: Path, lm_data: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama = make_tiny_llama(root / "llama-g", seed=4)
    grads = parameter_gradients(llama, lm_data, "causal-lm", batch_size=5)
    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama)
    rows = [json.loads(line) for line in lm_data.read_text().splitlines()]
    total, count = 0.0, 0
    for r in rows:
        prompt = [tokenizer.bos_token_id] + tokenizer(r["prompt"],
                                                      add_special_tokens=False)["input_ids"]
        target = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        target = target + [tokenizer.eos_token_id]
        logp = model(torch.tensor([prompt + target])).logits[0].log_softmax(-1)
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target))
        total = total - logp[positions, torch.tensor(target)].sum()
        count += len(target)
    (total / count).backward()
    expected = dict(model.named_parameters())
    assert set(grads) == set(expected)
    for name, p in expected.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_parameter_gradients_use_checkpoint_names(root: Path, cls_data: Path) -> None:
    bare = make_tiny_bert(root / "bare-g", seed=5)
    grads = parameter_gradients(bare, cls_data, "classification")
    file_keys = set(load_file(str(bare / "model.safetensors")))
    assert set(grads) == file_keys | {"classifier.weight", "classifier.bias"}
    assert grads["classifier.weight"].abs().sum() > 0
    assert grads["encoder.layer.1.output.dense.weight"].abs().sum() > 0
