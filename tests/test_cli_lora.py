"""Tests of ``qpeft export lora | import lora`` (cli/lora.py): what they refuse to write, through the CLI."""

from __future__ import annotations

import json
import os
import re

import pytest

from qpeft_deploy.cli.lora import import_summary
from qpeft_deploy.cli.main import cli
from tests.helpers import assert_one_line_error, make_adapter, run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(adapter, its PEFT export) of a small MiniLM adapter."""
    folder = tmp_path_factory.mktemp("lora")
    adapter = make_adapter(
        folder / "a.qpeft", {0: "neg", 1: "pos"}, 4, targets=["query"], rank=2, variant="taylor"
    )
    result = run(cli, "export", "lora", adapter, "-o", folder / "peft", "--quiet")
    assert result.exit_code == 0, result.output
    return adapter, folder / "peft"


def test_export_lora_refuses_an_existing_output_and_its_input(files, tmp_path):
    adapter, peft = files
    before = {p.name: p.read_bytes() for p in peft.iterdir()}
    assert_one_line_error(run(cli, "export", "lora", adapter, "-o", peft), "already exists")
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "a.qpeft").write_bytes(adapter.read_bytes())
    result = run(cli, "export", "lora", holder / "a.qpeft", "-o", holder, "--overwrite")
    assert_one_line_error(result, "must not be or contain the input file")
    assert {p.name: p.read_bytes() for p in peft.iterdir()} == before and os.listdir(holder) == ["a.qpeft"]
    assert run(cli, "export", "lora", adapter, "-o", peft, "--overwrite", "--quiet").exit_code == 0


def test_import_lora_refuses_an_existing_output_and_writing_into_its_input(files, tmp_path):
    _, peft = files
    names = sorted(os.listdir(peft))
    (tmp_path / "b.qpeft").write_bytes(b"mine")
    for args, words in (
        (["-o", tmp_path / "b.qpeft"], "already exists"),
        (["-o", peft / "b.qpeft", "--overwrite"], "must lie outside the input folder"),
    ):
        assert_one_line_error(
            run(cli, "import", "lora", peft, *args, "--variant", "taylor", "--quiet"), *words.split(",")
        )
    assert sorted(os.listdir(peft)) == names and (tmp_path / "b.qpeft").read_bytes() == b"mine"


def test_import_lora_prints_one_summary_line_and_the_report_with_json(files, tmp_path):
    _, peft = files
    result = run(cli, "import", "lora", peft, "-o", tmp_path / "a.qpeft", "--variant", "taylor")
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert len(line.splitlines()) == 1, result.stdout
    size = (tmp_path / "a.qpeft").stat().st_size
    assert re.fullmatch(
        rf"wrote {re.escape(str(tmp_path / 'a.qpeft'))} \(taylor, 6 targets, {size:,} bytes; LoRA weights "
        r"[\d,]+ bytes, [\d.]+x; relative ΔW error max \S+, mean \S+; [\d.]+ s\)",
        line,
    ), line
    args = ["-o", tmp_path / "b.qpeft", "--variant", "taylor", "--quiet", "--json"]
    report = json.loads(run(cli, "import", "lora", peft, *args).stdout)
    assert report["targets"] == 6 and report["qpeft_bytes"] == (tmp_path / "b.qpeft").stat().st_size
    assert len(report["relative_error"]["per_layer"]) == 6
    quiet = run(cli, "import", "lora", peft, "-o", tmp_path / "c.qpeft", "--variant", "taylor", "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and (tmp_path / "c.qpeft").is_file()


def test_import_summary_of_a_calibrated_import():
    report = {
        "output": "a.qpeft",
        "variant": "pauli",
        "targets": 12,
        "relative_error": {"max": 0.991, "mean": 0.98, "worst": "x", "per_layer": {}},
        "accuracy": {"lora": 0.8, "before": 0.5, "after": 0.75, "task": "rt"},
        "calibrated_relative_error": {"max": 1.2, "mean": 1.1},
        "lora_bytes": 294912,
        "qpeft_bytes": 3210,
        "compression_ratio": 294912 / 3210,
        "seconds": 12.3,
    }
    assert import_summary(report) == (
        "wrote a.qpeft (pauli, 12 targets, 3,210 bytes; LoRA weights 294,912 bytes, 91.9x; relative ΔW error "
        "max 0.99, mean 0.98; rt accuracy: LoRA 0.8000, fit 0.5000, calibrated 0.7500; 12.3 s)"
    )
