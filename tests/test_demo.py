"""The README's end-to-end demo (samples/demo.py) on a tiny budget: real MiniLM, real data, real ORT session."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_EXAMPLES = 40


def test_demo_runs_end_to_end_and_the_packed_files_score_like_the_trained_models(tmp_path):
    out = tmp_path / "demo-out"
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
        assert (out / f"{task}.qpeft").stat().st_size < 10_000
        assert (out / f"{task}.onnx_adapter").is_file()
    assert (out / "rt-merged" / "model.safetensors").is_file() and (out / "onnx" / "model.onnx").is_file()
    rows = {
        line.split()[0]: line.split()
        for line in done.stdout.splitlines()
        if line.split()[:1] in (["rt"], ["trec6"], ["sms"]) and len(line.split()) == 8
    }
    assert set(rows) == {"rt", "trec6", "sms"}, done.stdout
    for task, row in rows.items():
        torch_acc, ort_acc = float(row[1]), float(row[2])
        # quantisation-aware training: the 4-bit file is the trained model (fp16 λ/head may flip one example)
        assert abs(torch_acc - ort_acc) <= 1 / TEST_EXAMPLES + 1e-9, (task, row)
