"""Bad training/evaluation data: every case is a DataError naming the file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from click.testing import CliRunner  # noqa: E402

from weightsmith.errors import DataError  # noqa: E402
from weightsmith.finetune.cli import eval_cmd, finetune_cmd  # noqa: E402
from weightsmith.finetune.data import load_jsonl  # noqa: E402

GOOD = {"text": "a fine sentence", "label": 1}


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("task", "bad_line", "message"),
    [
        ("classification", '{"text": "oops", "label": 1', "invalid JSON"),
        ("classification", '{"label": 1}', "missing field 'text'"),
        ("classification", '{"text": "no label"}', "missing field 'label'"),
        ("classification", '{"text": "x", "label": "1"}', "label must be an integer"),
        ("classification", '{"text": "x", "label": 1.5}', "label must be an integer"),
        ("classification", '{"text": "x", "label": true}', "label must be an integer"),
        ("classification", '{"text": "x", "label": -1}', "label must be >= 0"),
        ("classification", '{"text": 3, "label": 0}', "must be a string"),
        ("classification", '["text", 0]', "expected a JSON object"),
        ("causal-lm", '{"prompt": "p"}', "missing field 'response'"),
    ],
)
def test_bad_row_names_its_line(tmp_path: Path, task: str, bad_line: str, message: str) -> None:
    good = json.dumps(GOOD if task == "classification" else {"prompt": "p", "response": "r"})
    path = write(tmp_path / "d.jsonl", [good, "", bad_line, good])
    with pytest.raises(DataError) as err:
        load_jsonl(path, task)
    # Line 3: the blank line 2 is skipped but still counted, like an editor counts it.
    assert f"{path}:3:" in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty"):
        load_jsonl(path, "classification")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_jsonl(tmp_path / "nope.jsonl", "classification")


def test_label_out_of_range_when_classes_known(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps({"text": "t", "label": 2})])
    assert load_jsonl(path, "classification").num_labels == 3
    with pytest.raises(DataError, match=r"d\.jsonl:2: label 2 is out of range.*2 classes"):
        load_jsonl(path, "classification", num_labels=2)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from weightsmith.testbeds.tiny import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "m", num_labels=2)


def test_too_long_names_line_unless_truncate(tmp_path: Path, tiny_bert: Path) -> None:
    from weightsmith.finetune.encoding import encode
    from weightsmith.finetune.modeling import load_tokenizer

    long_text = " ".join(["word"] * 40)
    path = write(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps({"text": long_text,
                                                                       "label": 0})])
    data = load_jsonl(path, "classification")
    tokenizer = load_tokenizer(tiny_bert)
    with pytest.raises(DataError, match=r"d\.jsonl:2: example is 42 tokens, longer than "
                                        r"max_length=16"):
        encode(data, tokenizer, max_length=16)
    features = encode(data, tokenizer, max_length=16, truncate=True)
    assert [len(f.input_ids) for f in features] == [5, 16]


def test_causal_lm_too_long(tmp_path: Path) -> None:
    from weightsmith.finetune.encoding import encode
    from weightsmith.testbeds.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer("abc=")
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "ab=", "response": "ba"}),
                                        json.dumps({"prompt": "abcabc=", "response": "cbacba"})])
    data = load_jsonl(path, "causal-lm")
    with pytest.raises(DataError, match=r"d\.jsonl:2: example is 15 tokens"):
        encode(data, tokenizer, max_length=10)
    short, cut = encode(data, tokenizer, max_length=10, truncate=True)
    # BOS + prompt are never loss targets; EOS is.
    assert short.labels == [-100, -100, -100, -100, 5, 4, tokenizer.eos_token_id]
    assert len(cut.input_ids) == 10 and cut.labels[:8] == [-100] * 8


def test_cli_reports_data_errors_without_traceback(tmp_path: Path, tiny_bert: Path) -> None:
    bad = write(tmp_path / "bad.jsonl", [json.dumps(GOOD), '{"text": "x", "label": "neg"}'])
    runner = CliRunner()
    result = runner.invoke(
        finetune_cmd,
        [str(tiny_bert), str(tmp_path / "out"), "--data", str(bad), "--task", "classification",
         "--quiet"],
    )
    assert result.exit_code == DataError.exit_code
    assert f"{bad}:2: label must be an integer" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()

    out_of_range = write(tmp_path / "oor.jsonl", [json.dumps(GOOD), '{"text": "x", "label": 5}'])
    result = runner.invoke(
        eval_cmd, [str(tiny_bert), "--data", str(out_of_range), "--task", "classification"]
    )
    assert result.exit_code == DataError.exit_code
    assert f"{out_of_range}:2: label 5 is out of range" in result.stderr
    assert "Traceback" not in result.output
