"""Tests of ``qpeft export onnx | onnx-adapter`` (cli/onnx.py): what they refuse to write, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qpeft_deploy.cli.main import cli
from tests.helpers import assert_one_line_error, make_adapter, run


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    return make_adapter(folder / "a.qpeft", {0: "neg", 1: "pos"}, 3, targets=["query", "value"], rank=2)


def test_onnx_adapter_refuses_an_existing_output_unless_overwrite(adapter, tmp_path):
    out = tmp_path / "a.onnx_adapter"
    out.write_bytes(b"mine")
    assert_one_line_error(run(cli, "export", "onnx-adapter", adapter, "-o", out), "already exists")
    assert out.read_bytes() == b"mine"
    result = run(cli, "export", "onnx-adapter", adapter, "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["bytes"] == out.stat().st_size > 4 and os.listdir(tmp_path) == [out.name]


def test_onnx_adapter_never_replaces_its_input(adapter, tmp_path):
    source = tmp_path / "a.qpeft"
    source.write_bytes(adapter.read_bytes())
    result = run(cli, "export", "onnx-adapter", source, "-o", source, "--overwrite")
    assert_one_line_error(result, "must not be or contain the input file")
    assert source.read_bytes() == adapter.read_bytes()


def test_onnx_adapter_into_a_read_only_or_full_destination_is_one_line(adapter, tmp_path):
    if Path("/sys").is_dir():
        result = run(cli, "export", "onnx-adapter", adapter, "-o", "/sys/a.onnx_adapter")
        assert_one_line_error(result, "/sys/a.onnx_adapter: cannot write")
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); "
        "from qpeft_deploy.cli.main import main; sys.argv[0] = 'qpeft'; main()"
    )
    out = tmp_path / "a.onnx_adapter"
    command = [sys.executable, "-c", code, "export", "onnx-adapter", str(adapter), "-o", str(out)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"qpeft: error: {out}: cannot write: ") and ".cc" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_export_onnx_refuses_before_loading_anything(adapter, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")  # enough to name a base; the refusals come first
    (tmp_path / "exists").mkdir()
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "a.qpeft").write_bytes(adapter.read_bytes())
    cases = [
        (["--adapter", adapter, "-o", tmp_path / "exists"], "already exists"),
        (["--adapter", adapter, "-o", base / "onnx", "--overwrite"], "must lie outside the input folder"),
        (
            ["--adapter", holder / "a.qpeft", "-o", holder, "--overwrite"],
            "must not be or contain the input file",
        ),
        (["--adapter", adapter, "-o", "/sys/qpeft-onnx"], "cannot write"),
    ]
    for args, words in cases:
        assert_one_line_error(run(cli, "export", "onnx", "--base", base, *args, "--quiet"), words)
    assert sorted(os.listdir(tmp_path)) == ["base", "exists", "holder"]
    assert os.listdir(base) == ["config.json"] and os.listdir(holder) == ["a.qpeft"]


def test_an_int8_export_prints_nothing_but_its_report(adapter, tmp_path):
    """onnxruntime's quantiser advises pre-processing through the root logger (and so would install a stderr
    handler on it for good): a child process, since pytest's own log handlers would hide both."""
    code = "from qpeft_deploy.cli.main import main; import sys; sys.argv[0] = 'qpeft'; main()"
    args = ["export", "onnx", "--adapter", str(adapter), "-o", str(tmp_path / "q"), "--quantize", "int8"]
    result = subprocess.run(
        [sys.executable, "-c", code, *args, "--quiet"], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert json.loads(result.stdout)["output"] == str(tmp_path / "q")


def test_export_onnx_runtime_decoder_then_a_wrong_swap_adapter_is_one_line(tmp_path):
    from qpeft_deploy.runtime.ort_session import OrtAdapterSession
    from tests.helpers import tiny_llama_adapter, tiny_llama_folder

    base = tiny_llama_folder(tmp_path / "base")
    tiny_llama_adapter(base, tmp_path / "a.qpeft", 1)
    args = ("export", "onnx", "--base", base, "--adapter", tmp_path / "a.qpeft", "--quiet")
    result = run(cli, *args, "--mode", "runtime", "-o", tmp_path / "rt")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["task"] == "text-generation" and report["apply"] == {"dense": 14}
    assert report["greedy_tokens_equal"] is True and report["max_abs_diff_vs_torch"] <= 1e-4
    assert (
        len(OrtAdapterSession(tmp_path / "rt" / "model.onnx").generate("Hi", max_new_tokens=4)[0].tokens) == 4
    )
    result = run(cli, *args, "--check-task", "rt", "-o", tmp_path / "checked")
    assert_one_line_error(result, "checked by generating")
    assert not (tmp_path / "checked").exists()
