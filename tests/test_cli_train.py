"""`qpeft train` and `qpeft eval` end to end on real MiniLM and real SMS messages (tiny budget)."""

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from qpeft_deploy.cli.main import cli
from qpeft_deploy.io.qpeft_file import read_adapter
from tests.helpers import assert_one_line_error, make_adapter
from tests.test_models import CORRUPTIONS, corrupt_base

TINY = [
    "--task",
    "sms",
    "--targets",
    "query,value",
    "--rank",
    "4",
    "--epochs",
    "1",
    "--max-examples",
    "24",
    "--max-test",
    "16",
    "--max-length",
    "24",
    "--batch-size",
    "8",
    "--quiet",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "sms.qpeft"
    options = [
        "--bits",
        "4",
        "--lambda-bits",
        "3",
        "--head-bits",
        "6",
        "--threads",
        "1",
    ]  # the file's grids (QAT)
    result = CliRunner().invoke(cli, ["train", "--base", "minilm", *TINY, *options, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output)


def test_train_writes_an_adapter_and_reports(trained):
    path, report = trained
    assert path.is_file() and report["file_bytes"] == path.stat().st_size
    assert report["trainable_parameters"] == 12 * (42 + 42 + 4) + 2 * 384 + 2
    assert 0.0 <= report["test_accuracy"] <= 1.0 and report["test_examples"] == 16
    stored = read_adapter(path).stored
    assert (stored.format_version, stored.bits, stored.lambda_bits, stored.head_bits) == (5, 4, 3, 6)
    assert "mask" not in stored.nbytes  # unpruned: no mask
    assert report["torch_threads"] == 1


def test_eval_reproduces_the_training_accuracy(trained):
    path, report = trained
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            "--adapter",
            str(path),
            "--task",
            "sms",
            "--max-examples",
            "16",
            "--max-length",
            "24",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["test_accuracy"] == pytest.approx(report["test_accuracy"])


def test_eval_refuses_a_task_with_other_labels(trained):
    path, _ = trained
    result = CliRunner().invoke(cli, ["eval", "--adapter", str(path), "--task", "trec6", "--quiet"])
    assert result.exit_code == 2
    assert "do not match" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--task", "imdb", "-o", "x.qpeft"], "imdb"),
        (["train", "--task", "sms", "--targets", "nothing_like_this", "-o", "x.qpeft"], "matches"),
        (["train", "--task", "sms", "--rank", "999", "-o", "x.qpeft"], "rank"),
        (["eval", "--adapter", "missing.qpeft", "--task", "sms"], "missing.qpeft"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "x.qpeft").exists()


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_eval_on_a_corrupt_base_is_one_line_and_exit_2(trained, tmp_path, kind):
    path, _ = trained
    folder = corrupt_base(tmp_path / f"base-{kind}", kind)
    args = ["eval", "--base", folder, "--adapter", path, "--task", "sms", "--max-examples", "8", "--quiet"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert_one_line_error(result, str(folder))
    assert "Traceback" not in result.output


def test_train_refuses_its_output_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("x.qpeft").write_bytes(b"mine")
    Path("data.csv").write_text("text,label\ngood,1\nbad,0\n")
    cases = [
        (["-o", "x.qpeft"], "already exists"),
        (
            ["-o", "data.csv", "--task", "csv:data.csv", "--overwrite"],
            "must not be or contain the input file",
        ),
    ]
    for args, message in cases:
        start = time.monotonic()
        result = CliRunner().invoke(cli, ["train", "--task", "sms", *args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
        assert time.monotonic() - start < 30  # refused before loading data or training
    assert Path("x.qpeft").read_bytes() == b"mine" and sorted(os.listdir()) == ["data.csv", "x.qpeft"]


STYLE = [
    {"prompt": f"Say {w}.", "response": f"{w.title()}, arr!"}
    for w in ("apple", "river", "candle", "violin", "tiger")
]
CAUSAL = ["--targets", r"re:model\.layers\.29\..*", "--rank", "4", "--epochs", "1", "--batch-size", "2"]
CAUSAL += ["--max-length", "64", "--threads", "1", "--quiet"]


def test_train_and_eval_a_causal_adapter_on_smollm2(tmp_path):
    """SmolLM2's tokenizer has no pad token: training pads with eos; the file is CAUSAL_LM, headless, and
    `qpeft eval` of the 4-bit file reproduces the exact match and answer loss measured after training."""
    data = tmp_path / "style.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in STYLE))
    task, out = f"jsonl:{data}", tmp_path / "style.qpeft"
    args = [
        "train",
        "--base",
        "smollm2",
        "--task",
        task,
        *CAUSAL,
        "--bits",
        "4",
        "--max-test",
        "1",
        "-o",
        out,
    ]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (
        report["task_type"] == "CAUSAL_LM" and report["train_examples"] == 4 and report["test_examples"] == 1
    )
    assert 0 < report["trainable_parameters"] < report["lora_r8_parameters"] / 10
    adapter = read_adapter(out)
    assert adapter.config.is_causal_lm() and adapter.config.head is None and adapter.stored.bits == 4
    assert len(adapter.config.targets) == 7 and not any("lm_head" in key for key in adapter.config.targets)
    args = ["eval", "--base", "smollm2", "--adapter", out, "--task", task, "--max-examples", "1"]
    result = CliRunner().invoke(cli, [str(a) for a in [*args, "--max-length", "64", "--quiet"]])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output)
    assert evaluated["test_exact_match"] == report["test_exact_match"]
    assert evaluated["test_loss"] == pytest.approx(report["test_loss"], abs=1e-4)


def test_classification_inputs_on_a_causal_base_and_back_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("labels.csv").write_text("text,label\ngood,1\nbad,0\n")
    Path("qa.jsonl").write_text(json.dumps(STYLE[0]) + "\n")
    make_adapter(tmp_path / "cls.qpeft", {0: "a", 1: "b"}, seed=0)
    cases = [
        (["train", "--base", "smollm2", "--task", "csv:labels.csv", "-o", "x.qpeft"], "need prompt,response"),
        (
            ["eval", "--base", "smollm2", "--adapter", "cls.qpeft", "--task", "jsonl:qa.jsonl"],
            "classification adapter",
        ),
        (["train", "--base", "minilm", "--task", "jsonl:qa.jsonl", "-o", "x.qpeft"], "unknown task"),
    ]
    for args, message in cases:
        assert_one_line_error(CliRunner().invoke(cli, args), message)
    assert not Path("x.qpeft").exists()
