"""Accuracy change per angle bit-width b on Rotten Tomatoes: one trained adapter, packed at every b.

Trains a MiniLM all-linear adapter (K = 8, L = 1) on RT with ``qpeft_deploy.training.train.fit``, or takes a trained
fp32 file with ``--adapter``. It saves the adapter unquantised (the reference) and re-packs it with b-bit
angles and fp16 λ/head for every b. Each file is loaded with ``load_adapted_model`` and evaluated on the same
RT test examples. Reported per b: file bytes, test accuracy and its change vs the reference, agreement of
the predicted labels with the reference, and max / mean |Δ logit|. The peer is the unquantised file itself;
its first row checks that its logits equal the in-memory trained model's.

    python -m benchmarks.quant [--adapter FILE] [--max-train 2000] [--max-test 1000] [--epochs 1]
writes benchmarks/results/quant.json and benchmarks/results/quant.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, markdown_table, write_results
from qpeft_deploy.core.attach import attach
from qpeft_deploy.data.text import load_task
from qpeft_deploy.io.file_tools import pack_adapter
from qpeft_deploy.io.model_io import load_adapted_model, save_adapter
from qpeft_deploy.io.qpeft_file import read_adapter
from qpeft_deploy.models import load_task_model, load_tokenizer
from qpeft_deploy.training.train import fit, predict

BITS = [2, 3, 4, 5, 6, 8, 16]


def train_reference(args: argparse.Namespace, data, tokenizer, path: Path) -> tuple[Path, torch.Tensor, dict]:
    """Train an adapter, save it unquantised to ``path``; returns the path, its test logits and the setup."""
    model = attach(load_task_model("minilm", data.id2label), "all-linear", rank=8, layers=1)
    result = fit(
        model,
        tokenizer,
        data.train,
        epochs=args.epochs,
        lr=2e-2,
        head_lr=2e-2,
        max_length=args.max_length,
        quiet=args.quiet,
    )
    logits = predict(model, tokenizer, [t for t, _ in data.test], max_length=args.max_length)
    save_adapter(model, path, base="minilm")
    setup = {"trained_here": True, "train_examples": len(data.train), "epochs": args.epochs}
    return path, logits, setup | {"train_seconds": round(result.seconds, 1), "steps": result.steps}


def evaluate_file(path: Path, data, tokenizer, max_length: int) -> torch.Tensor:
    """Test-set logits of the adapter file loaded onto MiniLM."""
    model = load_adapted_model("minilm", path)
    return predict(model, tokenizer, [t for t, _ in data.test], max_length=max_length)


def row(name: str, path: Path, logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
    """One result row: file size, accuracy, agreement and logit deltas vs the reference."""
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    delta = (logits - reference).abs()
    info = read_adapter(path).stored
    return {
        "storage": name,
        "bits": info.bits or 32,
        "lambda_dtype": info.lambda_dtype,
        "bytes": info.nbytes["total"],
        "accuracy": accuracy,
        "agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        "max_abs_logit_delta": delta.max().item(),
        "mean_abs_logit_delta": delta.mean().item(),
    }


def main() -> None:
    """Train (or take) an adapter, pack it at every b, evaluate, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--adapter", type=Path, default=None, help="a trained RT adapter file (else train one)"
    )
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    data = load_task("rt", max_train=args.max_train, max_test=args.max_test)
    tokenizer = load_tokenizer("minilm")
    labels = torch.tensor([label for _, label in data.test])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.adapter is None:
            source, trained, setup = train_reference(args, data, tokenizer, folder / "fp32.qpeft")
        else:
            source, setup = args.adapter, {"trained_here": False, "adapter": str(args.adapter)}
        reference_file = pack_adapter(source, folder / "ref.qpeft", bits=32, lambda_dtype="fp32")
        reference = evaluate_file(reference_file, data, tokenizer, args.max_length)
        if args.adapter is None:
            setup["reference_file_reproduces_trained_logits"] = bool(torch.equal(reference, trained))
        rows = [row("fp32 (reference)", reference_file, reference, reference, labels)]
        for bits in BITS:
            packed = pack_adapter(source, folder / f"b{bits}.qpeft", bits=bits, lambda_dtype="fp16")
            logits = evaluate_file(packed, data, tokenizer, args.max_length)
            rows.append(row(f"{bits}-bit angles, fp16 λ/head", packed, logits, reference, labels))
    base_accuracy = rows[0]["accuracy"]
    for r in rows:
        r["accuracy_change"] = r["accuracy"] - base_accuracy
    headers = ["storage", "bytes", "accuracy", "Δ accuracy", "agreement", "max |Δ logit|", "mean |Δ logit|"]
    body = [
        [
            r["storage"],
            r["bytes"],
            f"{r['accuracy']:.4f}",
            f"{r['accuracy_change']:+.4f}",
            f"{r['agreement']:.4f}",
            f"{r['max_abs_logit_delta']:.2e}",
            f"{r['mean_abs_logit_delta']:.2e}",
        ]
        for r in rows
    ]
    md = (
        f"RT test ({len(data.test)} examples), MiniLM all-linear K=8 L=1; setup: {setup}\n\n"
        + markdown_table(headers, body)
    )
    print(md)
    write_results(
        "quant",
        {"machine": machine_info(), "setup": setup, "seconds": time.perf_counter() - start, "rows": rows},
        md,
    )


if __name__ == "__main__":
    main()
