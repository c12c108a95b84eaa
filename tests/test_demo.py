"""The README's end-to-end demo (samples/demo.py) on a tiny budget: real MiniLM, real data, real PEFT LoRA r=8
trained in the same run, real ORT session."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_EXAMPLES = 40


def test_demo_runs_end_to_end_beside_lora_r8_and_the_packed_files_score_like_the_trained_models(tmp_path):
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / "rt.onnx_adapter").write_bytes(b"left by an earlier run")  # a rerun replaces its own outputs
    args = [
        "--train-examples",
        "32",
        "--test-examples",
        str(TEST_EXAMPLES),
        "--epochs",
        "1",
        "--max-length",
        "24",
        "--out",
        str(out),
        "--quiet",
    ]
    done = subprocess.run(
        [sys.executable, "samples/demo.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    for task in ("rt", "trec6", "sms"):
        assert (out / f"{task}.onnx_adapter").stat().st_size > 1000
    assert (out / "rt-merged" / "model.safetensors").is_file() and (out / "onnx" / "model.onnx").is_file()
    rows = {
        line.split()[0]: line.split()
        for line in done.stdout.splitlines()
        if line.split()[:1] in (["rt"], ["trec6"], ["sms"]) and len(line.split()) == 11
    }
    assert set(rows) == {"rt", "trec6", "sms"}, done.stdout
    for task, row in rows.items():
        torch_acc, ort_acc, lora_acc, head_acc = map(float, row[1:5])
        qpeft_params, lora_params, head_params, qpeft_bytes, lora_bytes = (
            int(c.replace(",", "")) for c in row[5:10]
        )
        # quantisation-aware training: the packed file is the trained model (its fp16 bias may flip one example)
        assert abs(torch_acc - ort_acc) <= 1 / TEST_EXAMPLES + 1e-9, (task, row)
        # LoRA r=8 trained in the same run: a real accuracy, PEFT's own trainable count, its saved file's bytes
        assert 0 <= lora_acc <= 1 and 0 <= head_acc <= 1, (task, row)
        assert abs(lora_acc * TEST_EXAMPLES - round(lora_acc * TEST_EXAMPLES)) < 1e-6, (task, row)
        assert lora_params == 337_920 + head_params, (task, row)  # r=8 on 37 layers + the head copy
        assert qpeft_params == 17_460 + head_params, (task, row)  # full rank, L=1: 3,252 angles + 14,208 λ
        assert qpeft_bytes == (out / f"{task}.qpeft").stat().st_size < 12_000, (task, row)  # 8-bit head codes
        assert lora_bytes == (out / f"{task}-lora" / "adapter_model.safetensors").stat().st_size, (task, row)
        assert row[10] == f"{lora_bytes / qpeft_bytes:.0f}×" and lora_bytes / qpeft_bytes > 100, (task, row)


def test_llm_demo_trains_two_adapters_beside_lora_and_serves_both_from_one_base(tmp_path):
    out = tmp_path / "llm"
    args = ["--train-examples", "8", "--test-examples", "4", "--threads", "1", "--out", str(out), "--quiet"]
    done = subprocess.run(
        [sys.executable, "samples/demo_llm.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    assert (out / "sms.qpeft").stat().st_size < 30_000 and (out / "rt.qpeft").is_file()
    lora_bytes = (out / "lora-r8" / "adapter_model.safetensors").stat().st_size
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:3]): line
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| task")
    }
    assert set(rows) == {
        ("rt", "Q-PEFT K=8"),
        ("sms", "Q-PEFT K=8"),
        ("sms", "PEFT LoRA r=8"),
        ("rt", "untuned"),
        ("sms", "untuned"),
    }
    assert (
        f"{lora_bytes:,}" in rows[("sms", "PEFT LoRA r=8")] and "2,442,240" in rows[("sms", "PEFT LoRA r=8")]
    )
    assert "20,040" in rows[("sms", "Q-PEFT K=8")]
    served = [line for line in done.stdout.splitlines() if line.startswith("  [")]
    assert {line.split("]")[0][3:] for line in served} == {
        "sms",
        "rt",
        "base",
    }  # one batch, three kinds of row
