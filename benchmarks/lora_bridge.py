"""The LoRA bridge on real data: a PEFT LoRA r=8 trained on Rotten Tomatoes, imported both ways and back.

The peer, measured in the same run, is the PEFT LoRA itself (r=8, lora_alpha=16, all-linear, SEQ_CLS on
all-MiniLM-L6-v2, trained with the same loop as qpeft). Rows of the table:
  PEFT LoRA r=8                  the peer: its adapter_model.safetensors and its test accuracy
  import taylor                  ``qpeft import lora --variant taylor``: exact, about LoRA's size
  import pauli                   ``--variant pauli``: circuit angles fitted to each ΔW, nothing else
  import pauli + calibrate       the same fit, then fine-tuned on RT training data (``--calibrate rt``)
  taylor -> export lora          the Taylor import exported back with ``qpeft export lora`` and loaded in PEFT
Columns: bytes of the adapter tensors file, size ratio to the LoRA, the max / mean over layers of the relative
ΔW error ‖ΔW − ΔW_LoRA‖_F / ‖ΔW_LoRA‖_F (for the calibrated row: after calibration), and test accuracy.
Torch runs on ``--threads`` threads (1 by default: on a shared 2-core machine more threads were slower).

    python -m benchmarks.lora_bridge [--max-train 2000] [--max-test 500] [--calibrate-examples 2000]
writes benchmarks/results/lora_bridge.json and benchmarks/results/lora_bridge.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from benchmarks.common import machine_info, markdown_table, write_results
from qpeft_deploy.data.text import load_task
from qpeft_deploy.export.lora.calibrate import Calibration
from qpeft_deploy.export.lora.export import export_lora
from qpeft_deploy.export.lora.importer import import_lora
from qpeft_deploy.export.lora.peft_folder import WEIGHTS_FILE, read_lora
from qpeft_deploy.io.model_io import load_adapted_model
from qpeft_deploy.models import load_task_model, load_tokenizer
from qpeft_deploy.training.train import evaluate, fit

MAX_LENGTH = 64


def train_lora(data, tokenizer, folder: Path, args: argparse.Namespace) -> dict:
    """Train the peer PEFT LoRA on RT, save it to ``folder``; returns its accuracy and training time."""
    model = load_task_model("minilm", dict(enumerate(data.labels)), seed=args.seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config)
    start = time.perf_counter()
    fit(
        peft_model,
        tokenizer,
        data.train,
        epochs=args.epochs,
        lr=args.lr,
        head_lr=args.lr,
        batch_size=32,
        max_length=MAX_LENGTH,
        seed=args.seed,
    )
    seconds = time.perf_counter() - start
    peft_model.save_pretrained(str(folder))
    accuracy = evaluate(peft_model, tokenizer, data.test, max_length=MAX_LENGTH)["accuracy"]
    return {"accuracy": accuracy, "train_seconds": round(seconds, 1)}


def round_trip_errors(original: Path, exported: Path) -> dict[str, float]:
    """Relative ΔW error per module of an exported LoRA against the original LoRA (dense, float64)."""
    before, after = read_lora(original).layers, read_lora(exported).layers
    errors = {}
    for name, layer in before.items():
        delta = layer.delta().numpy()
        errors[name] = float(np.linalg.norm(after[name].delta().numpy() - delta) / np.linalg.norm(delta))
    return errors


def row(name: str, path: Path, lora_bytes: int, errors: dict | None, accuracy: float) -> dict:
    """One result row: size, size ratio to the LoRA, max/mean relative ΔW error, accuracy."""
    size = path.stat().st_size
    return {
        "method": name,
        "file": path.name,
        "bytes": size,
        "lora_over_this": lora_bytes / size,
        "max_relative_error": errors["max"] if errors else 0.0,
        "mean_relative_error": errors["mean"] if errors else 0.0,
        "accuracy": accuracy,
    }


def summary(errors: dict[str, float]) -> dict:
    """max and mean of per-layer errors."""
    return {"max": max(errors.values()), "mean": sum(errors.values()) / len(errors)}


def run(args: argparse.Namespace, work: Path) -> dict:
    """Train the peer, import it both ways, export the Taylor import back; evaluate everything on RT."""
    data = load_task("rt", max_train=args.max_train, max_test=args.max_test, seed=args.seed)
    tokenizer = load_tokenizer("minilm")
    lora_dir = work / "lora"
    peer = train_lora(data, tokenizer, lora_dir, args)
    lora_bytes = (lora_dir / WEIGHTS_FILE).stat().st_size

    def accuracy_of(path: Path) -> float:
        return evaluate(load_adapted_model("minilm", path), tokenizer, data.test, max_length=MAX_LENGTH)[
            "accuracy"
        ]

    taylor = import_lora(lora_dir, work / "taylor.qpeft", variant="taylor", seed=args.seed)
    pauli = import_lora(lora_dir, work / "pauli.qpeft", variant="pauli", seed=args.seed)
    calibration = Calibration(
        "rt", max_examples=args.calibrate_examples, max_test=args.max_test, max_length=MAX_LENGTH
    )
    calibrated = import_lora(
        lora_dir, work / "calibrated.qpeft", variant="pauli", calibration=calibration, seed=args.seed
    )
    export_lora(work / "taylor.qpeft", work / "exported")
    exported = PeftModel.from_pretrained(
        load_task_model("minilm", dict(enumerate(data.labels))), str(work / "exported")
    )
    round_trip = round_trip_errors(lora_dir, work / "exported")
    rows = [
        row("PEFT LoRA r=8 (peer)", lora_dir / WEIGHTS_FILE, lora_bytes, None, peer["accuracy"]),
        row(
            "import taylor",
            work / "taylor.qpeft",
            lora_bytes,
            taylor["relative_error"],
            accuracy_of(work / "taylor.qpeft"),
        ),
        row(
            "import pauli (fit only)",
            work / "pauli.qpeft",
            lora_bytes,
            pauli["relative_error"],
            accuracy_of(work / "pauli.qpeft"),
        ),
        row(
            f"import pauli + calibrate ({calibrated['accuracy']['train_examples']} RT examples)",
            work / "calibrated.qpeft",
            lora_bytes,
            calibrated["calibrated_relative_error"],
            calibrated["accuracy"]["after"],
        ),
        row(
            "taylor -> export lora",
            work / "exported" / WEIGHTS_FILE,
            lora_bytes,
            summary(round_trip),
            evaluate(exported, tokenizer, data.test, max_length=MAX_LENGTH)["accuracy"],
        ),
    ]
    reports = {
        name: {k: v for k, v in report.items() if k != "output"}  # drop the temporary paths
        for name, report in (("taylor", taylor), ("pauli", pauli), ("calibrated", calibrated))
    }
    return {"peer": peer, "rows": rows, **reports, "round_trip_errors": round_trip}


def table(rows: list[dict], test_examples: int) -> str:
    """The markdown table of the result rows."""
    headers = [
        "method",
        "file",
        "bytes",
        "LoRA bytes / bytes",
        "max rel. ΔW error",
        "mean rel. ΔW error",
        f"RT accuracy (n={test_examples})",
    ]
    return markdown_table(
        headers,
        [
            [
                r["method"],
                r["file"],
                f"{r['bytes']:,}",
                r["lora_over_this"],
                f"{r['max_relative_error']:.2e}",
                f"{r['mean_relative_error']:.2e}",
                f"{r['accuracy']:.3f}",
            ]
            for r in rows
        ],
    )


def main() -> None:
    """Parse arguments, run once, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--max-test", type=int, default=500)
    parser.add_argument("--calibrate-examples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the peer LoRA and its head")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        result = run(args, Path(work))
    markdown = table(result["rows"], args.max_test)
    data = {
        "machine": machine_info(),
        "settings": vars(args) | {"max_length": MAX_LENGTH},
        **result,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    write_results("lora_bridge", data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
