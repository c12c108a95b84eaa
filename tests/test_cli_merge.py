"""Tests of ``qpeft merge | unmerge`` (cli/merge.py) through click's CliRunner, on the real MiniLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from qpeft_deploy.cli.main import cli
from qpeft_deploy.core.attach import attach
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.io.safetensors import INDEX_FILE, SINGLE_FILE
from qpeft_deploy.models import load_task_model, resolve_base
from tests.helpers import assert_one_line_error, run

MINILM = resolve_base("minilm")


@pytest.fixture(scope="module")
def qpeft():
    return cli


def _adapter(path, labels, targets, seed):
    model = attach(load_task_model("minilm", labels), targets, rank=4, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("spectrum.lam") or name.startswith("classifier."):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    return save_adapter(model, path, base="minilm")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two head adapters: a.qpeft (2 labels, all-linear) and b.qpeft (3 labels, value layers)."""
    folder = tmp_path_factory.mktemp("adapters")
    return (
        _adapter(folder / "a.qpeft", {0: "neg", 1: "pos"}, "all-linear", 1),
        _adapter(folder / "b.qpeft", {0: "x", 1: "y", 2: "z"}, ["value"], 2),
    )


def test_merge_then_unmerge_round_trip(qpeft, adapters, tmp_path):
    merged, back = tmp_path / "merged", tmp_path / "back"
    result = run(qpeft, "merge", "--base", "minilm", "--adapter", adapters[0], "-o", merged)
    assert result.exit_code == 0, result.output
    size = (merged / SINGLE_FILE).stat().st_size
    assert result.stdout.strip() == f"wrote {merged} (1 safetensors file, {size:,} bytes)"
    assert "merge" in result.stderr and "100%" in result.stderr  # the progress bar over bytes
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    result = run(qpeft, "unmerge", "--merged", merged, "--adapter", adapters[0], "-o", back, "--quiet")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == "", result.output
    base, restored = load_file(MINILM / SINGLE_FILE), load_file(back / SINGLE_FILE)
    assert restored.keys() == base.keys()
    for key, tensor in base.items():
        error = float((restored[key].double() - tensor.double()).norm())
        assert error <= 1e-6 * float(tensor.double().norm()), key


def test_weights_head_from_dtype_and_shards(qpeft, adapters, tmp_path):
    merged = tmp_path / "merged"
    result = run(
        qpeft,
        "merge",
        "--adapter",
        adapters[0],
        "--adapter",
        adapters[1],
        "--weight",
        "0.5",
        "--weight",
        "-1",
        "--head-from",
        "b.qpeft",
        "--dtype",
        "bf16",
        "--max-shard-size",
        "10MB",
        "-o",
        merged,
        "--quiet",
    )
    assert result.exit_code == 0 and result.stdout == "", result.output
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {"0": "x", "1": "y", "2": "z"} and config["torch_dtype"] == "bfloat16"
    index = json.loads((merged / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2 and "classifier.weight" in index["weight_map"]
    result = run(qpeft, "merge", "--adapter", adapters[0], "-o", merged, "--overwrite", "--quiet")
    assert result.exit_code == 0 and not (merged / INDEX_FILE).exists()


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing base", ["nowhere", "not found"]),
        ("dtype", ["--dtype", "int8"]),
        ("two heads", ["a.qpeft", "b.qpeft", "--head-from"]),
        ("exists", ["already exists"]),
        ("weights", ["1 --adapter but 2 --weight"]),
        ("shard size", ["--max-shard-size"]),
        ("missing adapter", ["gone.qpeft"]),
        ("wrong unmerge", ["was merged from a.qpeft", "b.qpeft"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(qpeft, adapters, tmp_path, case, words):
    a, b = adapters
    out = tmp_path / "out"
    args = {
        "missing base": ["merge", "--base", tmp_path / "nowhere", "--adapter", a, "-o", out],
        "dtype": ["merge", "--adapter", a, "--dtype", "int8", "-o", out],
        "two heads": ["merge", "--adapter", a, "--adapter", b, "-o", out],
        "exists": ["merge", "--adapter", a, "-o", tmp_path],
        "weights": ["merge", "--adapter", a, "--weight", "1", "--weight", "2", "-o", out],
        "shard size": ["merge", "--adapter", a, "--max-shard-size", "big", "-o", out],
        "missing adapter": ["merge", "--adapter", tmp_path / "gone.qpeft", "-o", out],
        "wrong unmerge": ["unmerge", "--merged", tmp_path / "merged", "--adapter", b, "-o", out],
    }[case]
    if case == "wrong unmerge":
        assert run(qpeft, "merge", "--adapter", a, "-o", tmp_path / "merged", "--quiet").exit_code == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(run(qpeft, *args), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_sigterm_removes_the_temporary_folder(adapters, tmp_path):
    output = tmp_path / "merged"
    code = (
        "import sys; from qpeft_deploy.cli.merge import merge_command; "
        "merge_command([*sys.argv[1:], '--max-shard-size', '2MB', '--quiet'])"
    )
    process = subprocess.Popen([sys.executable, "-c", code, "--adapter", str(adapters[0]), "-o", str(output)])
    deadline, temp = time.monotonic() + 120, None
    while temp is None or len(list(temp.glob("model-*.safetensors"))) < 3:
        assert process.poll() is None, "the merge finished before it could be stopped"
        assert time.monotonic() < deadline
        temp = next((p for p in tmp_path.iterdir() if p.name.startswith(".merged.qpeft-tmp-")), None)
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_merge_and_unmerge_never_write_over_or_around_an_input(qpeft, adapters, tmp_path):
    holder = tmp_path / "holder"
    holder.mkdir()
    adapter = holder / "a.qpeft"
    adapter.write_bytes(adapters[0].read_bytes())
    result = run(qpeft, "merge", "--adapter", adapter, "-o", holder, "--overwrite", "--quiet")
    assert_one_line_error(result, "must not be or contain the input file")
    assert os.listdir(holder) == ["a.qpeft"] and adapter.read_bytes() == adapters[0].read_bytes()
    merged = tmp_path / "merged"
    assert run(qpeft, "merge", "--adapter", adapters[0], "-o", merged, "--quiet").exit_code == 0
    before = sorted(os.listdir(merged))
    for output in (merged, merged / "back"):
        result = run(
            qpeft, "unmerge", "--merged", merged, "--adapter", adapters[0], "-o", output, "--overwrite"
        )
        assert_one_line_error(result, "input folder")
    assert sorted(os.listdir(merged)) == before and sorted(os.listdir(tmp_path)) == ["holder", "merged"]
