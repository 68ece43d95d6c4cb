"""``chat_template``: a named template (alpaca, chatml, llama3, mistral, exaone) or raw Jinja is
written into the output's tokenizer_config.json; ``auto`` (or none) keeps the tokenizer
source's template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizer_family import make_model
from transformers import AutoTokenizer

import weightsmith
from weightsmith.errors import RecipeError
from weightsmith.io.chat_templates import NAMED_TEMPLATES, resolve_chat_template

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "w5 w6"},
    {"role": "assistant", "content": "w7"},
    {"role": "user", "content": "w8"},
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("chat")
    return make_model(root / "one", "base", 1), make_model(root / "two", "base", 2)


def merged(pair: tuple[Path, Path], tmp_path: Path, chat_template: str | None) -> Path:
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in pair],
    }
    if chat_template is not None:
        recipe["chat_template"] = chat_template
    out = tmp_path / "out"
    weightsmith.merge(recipe, out, fsync=False)
    return out


def test_named_template_is_written_into_tokenizer_config(pair, tmp_path):
    out = merged(pair, tmp_path, "chatml")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == NAMED_TEMPLATES["chatml"]
    assert not (out / "chat_template.jinja").exists()  # it would win over tokenizer_config.json
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template(CONVERSATION[1:3], tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<|im_start|>user\nw5 w6<|im_end|>\n<|im_start|>assistant\nw7<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "alpaca",
            "<s>be brief\n\n### Instruction:\nw5 w6\n\n### Response:\nw7</s>\n\n### Instruction:\nw8\n\n"
            "### Response:\n",
        ),
        (
            "llama3",
            "<s><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\nw5 w6<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            "w7<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nw8<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        ("mistral", "<s>[INST] be brief\n\nw5 w6 [/INST]w7</s>[INST] w8 [/INST]"),
        (
            "exaone",
            "[|system|]be brief[|endofturn|]\n[|user|]w5 w6\n[|assistant|]w7[|endofturn|]\n[|user|]w8\n"
            "[|assistant|]",
        ),
    ],
)
def test_each_named_template_renders_its_format(name, expected, pair):
    tok = AutoTokenizer.from_pretrained(str(pair[0]))
    tok.chat_template = resolve_chat_template(name)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == expected


def test_raw_jinja_is_written_as_given(pair, tmp_path):
    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    out = merged(pair, tmp_path, jinja)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == jinja
    assert tok.apply_chat_template(CONVERSATION[1:2], tokenize=False) == "user: w5 w6\n"


def test_auto_keeps_the_source_template(pair, tmp_path):
    out = merged(pair, tmp_path, "auto")
    source = AutoTokenizer.from_pretrained(str(pair[0])).chat_template
    assert source and AutoTokenizer.from_pretrained(str(out)).chat_template == source


def test_unknown_name_is_refused_at_plan_time(pair):
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in pair],
        "chat_template": "vicuna",
    }
    with pytest.raises(RecipeError, match="'vicuna' is neither a known template"):
        weightsmith.plan_merge(recipe)
