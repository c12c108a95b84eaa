"""Tests of ``qpeft pack | inspect | verify`` (cli/files.py) through click's CliRunner and real files."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qpeft_deploy.cli.main import cli
from qpeft_deploy.core.attach import attach
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.io.qpeft_file import read_adapter
from qpeft_deploy.models import load_task_model, resolve_base
from tests.helpers import assert_one_line_error, run


@pytest.fixture(scope="module")
def qpeft():
    return cli


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    model = load_task_model("minilm", {0: "neg", 1: "pos"})
    attach(model, "all-linear", rank=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("spectrum.lam"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return save_adapter(model, tmp_path_factory.mktemp("a") / "fp32.qpeft", base="minilm")


def test_pack_requantises_and_keeps_what_is_not_asked(qpeft, adapter, tmp_path):
    out = tmp_path / "four.qpeft"
    result = run(qpeft, "pack", adapter, "-o", out, "--bits", "4", "--lambda-dtype", "fp16")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and f"{out.stat().st_size:,} bytes" in result.output
    packed = read_adapter(out)
    assert packed.stored.bits == 4 and packed.stored.lambda_dtype == "fp16" and len(packed.fingerprint) == 37
    again = tmp_path / "nohead.qpeft"
    result = run(qpeft, "pack", out, "-o", again, "--drop-head", "--quiet")
    assert result.exit_code == 0 and result.output == ""
    dropped = read_adapter(again)
    assert dropped.stored.bits == 4 and dropped.config.head is None
    assert again.stat().st_size < out.stat().st_size < adapter.stat().st_size / 3
    back = tmp_path / "fp32.qpeft"
    assert run(qpeft, "pack", out, "-o", back, "--bits", "32", "--quiet").exit_code == 0
    assert read_adapter(back).stored.bits is None


def test_pack_errors(qpeft, adapter, tmp_path):
    assert_one_line_error(
        run(qpeft, "pack", tmp_path / "missing.qpeft", "-o", tmp_path / "x.qpeft"),
        "missing.qpeft",
        "cannot read",
    )
    result = run(qpeft, "pack", adapter, "-o", tmp_path / "x.qpeft", "--bits", "9")
    assert result.exit_code == 2 and "9" in result.stderr  # click's own usage error
    assert_one_line_error(run(qpeft, "pack", adapter, "-o", tmp_path / "no" / "x.qpeft"), "cannot write")
    assert not (tmp_path / "x.qpeft").exists()


def test_inspect_text_and_json(qpeft, adapter, tmp_path):
    out = tmp_path / "four.qpeft"
    assert run(qpeft, "pack", adapter, "-o", out, "--bits", "4", "--lambda-dtype", "fp16").exit_code == 0
    result = run(qpeft, "inspect", out)
    assert result.exit_code == 0, result.output
    for text in (
        "qpeft version 2",
        "integrity     blake2b-16 digest ok",
        "pauli (split2-right-v1), L=1",
        "targets       37, K=8",
        "encoder.layer.{0-5}.attention.self.{key,query,value}.weight:384x384:8",
        "angles 4-bit",
        "header",
        "lambda 592",
        "head 1,540",
        "blake2b-8 over 37",
    ):
        assert text in result.output, text
    data = json.loads(run(qpeft, "inspect", out, "--json").output)
    assert data["targets"] == 37 and data["bits"] == 4 and data["format_version"] == 2
    assert data["bytes"]["total"] == out.stat().st_size
    assert data["bytes"]["header"] <= 0.2 * data["bytes"]["total"]
    assert data["parameters"] == {"angles": 3252, "lambda": 296, "head": 770, "total": 4318}


def test_verify_ok_and_fingerprint_mismatch(qpeft, adapter, tmp_path):
    result = run(qpeft, "verify", adapter, "--base", "minilm")
    assert result.exit_code == 0 and result.output.startswith("ok: ") and "matches minilm" in result.output
    assert run(qpeft, "verify", adapter, "--quiet").output == ""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_bytes((resolve_base("minilm") / "config.json").read_bytes())
    weights = load_file(str(resolve_base("minilm") / "model.safetensors"))
    weights = {k: v for k, v in weights.items() if k.startswith(("encoder.", "pooler."))}
    weights["encoder.layer.4.attention.self.value.weight"] *= 1.001  # fingerprints need no other tensor
    save_file(weights, str(base / "model.safetensors"))
    assert_one_line_error(
        run(qpeft, "verify", adapter, "--base", base), "encoder.layer.4.attention.self.value.weight"
    )


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda d: b"", ["too short"]),
        (lambda d: d[: len(d) // 2], ["data"]),
        (lambda d: struct.pack("<Q", 100 << 20) + d[8:], ["past the end"]),
        (lambda d: d[:20] + bytes([d[20] ^ 0xFF]) + d[21:], ["JSON"]),
    ],
)
def test_bad_files_exit_2_with_one_line(qpeft, adapter, tmp_path, damage, words):
    bad = tmp_path / "bad.qpeft"
    bad.write_bytes(damage(adapter.read_bytes()))
    for command in (["inspect"], ["verify"], ["inspect", "--json"], ["pack", "-o", tmp_path / "o.qpeft"]):
        result = run(qpeft, command[0], bad, *command[1:])
        assert_one_line_error(result, str(bad), *words)


def test_lora_file_passed_by_mistake(qpeft, tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        load_task_model("minilm", {0: "a", 1: "b"}), LoraConfig(r=2, target_modules=["key"])
    )
    lora.save_pretrained(str(tmp_path))
    assert_one_line_error(run(qpeft, "inspect", tmp_path / "adapter_model.safetensors"), "PEFT LoRA")


def as_version_1(data: bytes) -> bytes:
    """The same adapter in the format-version-1 layout (no digest)."""
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"].pop("digest")
    header["__metadata__"]["format_version"] = "1"
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def test_verify_and_inspect_report_the_digest(qpeft, adapter, tmp_path):
    result = run(qpeft, "verify", adapter, "--base", "minilm")
    assert "blake2b-16 digest ok, values within bounds" in result.output, result.output
    data = adapter.read_bytes()
    at = 8 + struct.unpack("<Q", data[:8])[0] + 100  # one bit of the angles
    flipped = tmp_path / "flipped.qpeft"
    flipped.write_bytes(data[:at] + bytes([data[at] ^ 4]) + data[at + 1 :])
    for command in (["verify"], ["verify", "--base", "minilm"], ["inspect"]):
        assert_one_line_error(
            run(qpeft, *command[:1], flipped, *command[1:]), str(flipped), "integrity digest"
        )
    old = tmp_path / "v1.qpeft"
    old.write_bytes(as_version_1(data))
    assert "integrity     no integrity digest (format version 1)" in run(qpeft, "inspect", old).output
    result = run(qpeft, "verify", old, "--base", "minilm")
    assert result.exit_code == 0 and "no integrity digest (format version 1)" in result.output


def _qpeft(*args: object, **env: str) -> subprocess.CompletedProcess:
    """The real ``qpeft`` in a new process (its own stdout encoding, signals, blocking reads)."""
    command = [sys.executable, "-m", "qpeft_deploy.cli.main", *map(str, args)]
    return subprocess.run(command, check=False, capture_output=True, timeout=120, env=os.environ | env)


def test_pack_refuses_an_existing_output_unless_overwrite(qpeft, adapter, tmp_path):
    out = tmp_path / "out.qpeft"
    out.write_bytes(b"mine")
    assert_one_line_error(
        run(qpeft, "pack", adapter, "-o", out, "--bits", "4"), "out.qpeft", "already exists"
    )
    assert out.read_bytes() == b"mine"
    assert run(qpeft, "pack", adapter, "-o", out, "--bits", "4", "--overwrite").exit_code == 0
    assert read_adapter(out).stored.bits == 4 and sorted(os.listdir(tmp_path)) == ["out.qpeft"]


def test_pack_never_writes_over_or_into_an_input(qpeft, adapter, tmp_path):
    source = tmp_path / "a.qpeft"
    source.write_bytes(adapter.read_bytes())
    base = tmp_path / "base"
    shutil.copytree(resolve_base("minilm"), base)
    cases = [
        (["-o", source], "must not be or contain the input file"),
        (["-o", base / "a.qpeft", "--base", base], "must lie outside the input folder"),
    ]
    for args, words in cases:
        assert_one_line_error(run(qpeft, "pack", source, *args, "--bits", "4", "--overwrite"), words)
    assert source.read_bytes() == adapter.read_bytes() and "a.qpeft" not in os.listdir(base)


def test_pack_into_a_read_only_or_full_destination_is_one_line(qpeft, adapter, tmp_path):
    if Path("/sys").is_dir():
        assert_one_line_error(run(qpeft, "pack", adapter, "-o", "/sys/a.qpeft"), "/sys/a.qpeft: cannot write")
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    limit += "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); "
    code = limit + "from qpeft_deploy.cli.main import main; import sys; sys.argv[0] = 'qpeft'; main()"
    out = tmp_path / "a.qpeft"
    result = subprocess.run(
        [sys.executable, "-c", code, "pack", str(adapter), "-o", str(out)], check=False, capture_output=True
    )
    assert (
        result.returncode == 2
        and result.stderr.decode().strip() == f"qpeft: error: {out}: cannot write: File too large"
    )
    assert os.listdir(tmp_path) == []


def test_inspect_refuses_a_fifo_at_once(tmp_path):
    os.mkfifo(tmp_path / "pipe.qpeft")
    result = _qpeft("inspect", tmp_path / "pipe.qpeft")  # reading it would block forever
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"qpeft: error: {tmp_path / 'pipe.qpeft'}: cannot read: is a FIFO (named pipe), not a regular file"
    ]


@pytest.mark.parametrize(
    "encoding", [{"PYTHONIOENCODING": "latin-1"}, {"PYTHONIOENCODING": "ascii"}, {"LC_ALL": "C"}]
)
def test_inspect_prints_on_a_stdout_that_is_not_utf8(qpeft, tmp_path, encoding):
    model = attach(load_task_model("minilm", {0: "négatif", 1: "позитив"}), ["query"], rank=2)
    path = save_adapter(model, tmp_path / "λ.qpeft")
    for args in ([], ["--json"]):
        result = _qpeft("inspect", path, *args, **encoding)
        assert result.returncode == 0 and result.stderr == b"", result.stderr.decode(errors="replace")
        out = result.stdout  # UTF-8 where Python or click chose it, else escapes: never an exception
        assert b"\\u03bb" in out or "λ".encode() in out
        assert b"\\u043f" in out or "позитив".encode() in out
    missing = _qpeft("inspect", tmp_path / "gone-λ.qpeft", **encoding)
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1


def test_pack_lambda_bits_and_back(qpeft, adapter, tmp_path):
    coded = tmp_path / "l4.qpeft"
    result = run(
        qpeft, "pack", adapter, "-o", coded, "--bits", "4", "--lambda-bits", "4", "--lambda-dtype", "fp16"
    )
    assert result.exit_code == 0, result.output
    text = run(qpeft, "inspect", coded).output
    for part in (
        "qpeft version 4",
        "angles 4-bit, λ 4-bit codes + fp32 scale per target, head fp16",
        "lambda 148",
        "scales 148",
    ):
        assert part in text, part
    data = json.loads(run(qpeft, "inspect", coded, "--json").output)
    assert data["format_version"] == 4 and data["lambda_bits"] == 4 and data["bytes"]["scales"] == 4 * 37
    assert run(qpeft, "verify", coded, "--base", "minilm").exit_code == 0
    kept = tmp_path / "kept.qpeft"
    assert run(qpeft, "pack", coded, "-o", kept, "--bits", "8", "--quiet").exit_code == 0
    assert read_adapter(kept).stored.lambda_bits == 4  # not asked: kept
    back = tmp_path / "back.qpeft"
    assert (
        run(
            qpeft, "pack", coded, "-o", back, "--lambda-bits", "32", "--lambda-dtype", "fp32", "--quiet"
        ).exit_code
        == 0
    )
    restored, source = read_adapter(back), read_adapter(coded)
    assert restored.stored.format_version == 2 and restored.stored.lambda_bits is None
    assert all(torch.equal(restored.state[k], t) for k, t in source.state.items() if k.endswith("lam"))
    result = run(qpeft, "pack", adapter, "-o", tmp_path / "x.qpeft", "--lambda-bits", "16")
    assert result.exit_code == 2 and "16" in result.stderr and not (tmp_path / "x.qpeft").exists()


def test_pack_head_bits_inspect_and_back(qpeft, adapter, tmp_path):
    coded = tmp_path / "h8.qpeft"
    assert (
        run(qpeft, "pack", adapter, "-o", coded, "--head-bits", "8", "--lambda-dtype", "fp16").exit_code == 0
    )
    text = run(qpeft, "inspect", coded).output
    assert "qpeft version 5" in text and "head 8-bit weight codes + fp32 scale per row" in text
    data = json.loads(run(qpeft, "inspect", coded, "--json").output)
    assert data["head_bits"] == 8 and data["bytes"]["head_codes"] == 2 * 384
    assert data["bytes"]["head_scales"] == 2 * 4 and data["bytes"]["head"] == 2 * 2  # the fp16 bias
    assert run(qpeft, "verify", coded, "--base", "minilm").exit_code == 0
    source, coded_head = read_adapter(adapter), read_adapter(coded)
    weight, back = source.state["classifier.weight"], coded_head.state["classifier.weight"]
    assert (weight - back).abs().max() <= weight.abs().amax() / 127 / 2 + 1e-7  # half a step of the row grid
    plain = tmp_path / "plain.qpeft"
    assert run(qpeft, "pack", coded, "-o", plain, "--head-bits", "32", "--quiet").exit_code == 0
    assert read_adapter(plain).stored.head_bits is None
    assert torch.equal(read_adapter(plain).state["classifier.weight"], back.half().float())
    dropped = tmp_path / "dropped.qpeft"
    assert (
        run(qpeft, "pack", coded, "-o", dropped, "--drop-head", "--quiet").exit_code == 0
    )  # kept bits: no head
    result = run(qpeft, "pack", dropped, "-o", tmp_path / "x.qpeft", "--head-bits", "4")
    assert result.exit_code == 2 and "no head" in result.stderr and not (tmp_path / "x.qpeft").exists()
