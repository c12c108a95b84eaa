"""End-to-end demo on the shipped all-MiniLM-L6-v2 and the shipped data: the whole product in one run.

1. trains three task adapters (Rotten Tomatoes sentiment, TREC-6 question type, SMS spam), quantisation-aware on
   4-bit angles so the packed file is the trained model, and, on the same budget, the head-only baseline of each;
2. packs them (4-bit angles, fp16 λ and head) and inspects one;
3. merges the RT adapter into a plain transformers checkpoint;
4. exports one swappable ONNX model and runs all three tasks through ONE onnxruntime session by swapping adapters;
5. prints one table: task, accuracy (torch, ORT, head-only), trainable parameters, file bytes vs LoRA r=8.
Artefacts go to ./demo-out/. The budget here is small (minutes on 2 CPU cores); full-budget numbers are in
BENCHMARKS.md (python -m benchmarks.accuracy).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from qpeft_deploy.data.text import load_task
from qpeft_deploy.export.onnx.export import export_onnx, export_onnx_adapter
from qpeft_deploy.io.file_tools import inspect_adapter
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.merge.checkpoint import merge_checkpoint
from qpeft_deploy.models import load_tokenizer, tokenize
from qpeft_deploy.runtime import OrtAdapterSession
from qpeft_deploy.training.train import TrainSpec, run_spec

TASKS = ("rt", "trec6", "sms")
LORA_R8_BYTES_PER_PARAM = 4  # PEFT saves fp32 LoRA factors


def train_all(args: argparse.Namespace) -> dict[str, dict]:
    """Train an adapter and the head-only baseline per task; save the packed adapters."""
    results = {}
    for task in TASKS:
        spec = TrainSpec(
            task=task,
            rank=8,
            layers=1,
            epochs=args.epochs,
            max_examples=args.train_examples,
            max_test=args.test_examples,
            max_length=args.max_length,
            bits=4,
        )
        print(
            f"\n[{task}] training a Quantum-PEFT adapter (all-linear, K=8, L=1, 4-bit-aware angles) ...",
            flush=True,
        )
        model, adapter = run_spec(spec, adapter=True, quiet=args.quiet)
        path = save_adapter(model, args.out / f"{task}.qpeft", bits=4, lambda_dtype="fp16", base=spec.base)
        print(f"[{task}] training the head-only baseline on the same budget ...", flush=True)
        _, head_only = run_spec(spec, adapter=False, quiet=args.quiet)
        results[task] = {"adapter": adapter, "head_only": head_only, "path": path}
    return results


def ort_accuracy(session: OrtAdapterSession, task: str, args: argparse.Namespace, tokenizer) -> float:
    """Accuracy of one task's adapter through the shared swappable ORT session."""
    test = load_task(task, max_test=args.test_examples).test
    correct = 0
    for start in range(0, len(test), 64):
        rows = test[start : start + 64]
        inputs = tokenize(tokenizer, [text for text, _ in rows], max_length=args.max_length)
        logits = session(inputs, adapter=task)
        correct += int((np.argmax(logits, axis=-1) == np.array([label for _, label in rows])).sum())
    return correct / len(test)


def deploy(results: dict[str, dict], args: argparse.Namespace) -> dict[str, float]:
    """Inspect, merge, export one swappable ONNX model and run every task through it; returns ORT accuracy."""
    print("\n`qpeft inspect demo-out/rt.qpeft`:")
    print(
        json.dumps(
            {
                k: v
                for k, v in inspect_adapter(results["rt"]["path"]).items()
                if k in ("variant", "targets", "ranks", "bits", "layers", "bytes", "parameters")
            },
            indent=1,
        )
    )
    for folder in ("rt-merged", "onnx"):
        shutil.rmtree(args.out / folder, ignore_errors=True)
    print("\nMerging rt.qpeft into a plain transformers checkpoint (demo-out/rt-merged) ...", flush=True)
    merge_checkpoint("minilm", [results["rt"]["path"]], args.out / "rt-merged", quiet=args.quiet)
    print("Exporting one swappable ONNX model (demo-out/onnx) ...", flush=True)
    export_onnx("minilm", results["rt"]["path"], args.out / "onnx", mode="swappable", quiet=args.quiet)
    session = OrtAdapterSession(args.out / "onnx" / "model.onnx")
    tokenizer = load_tokenizer("minilm")
    accuracy = {}
    for task, result in results.items():
        adapter_file = args.out / f"{task}.onnx_adapter"
        export_onnx_adapter(result["path"], adapter_file)
        session.load(task, adapter_file)
        accuracy[task] = ort_accuracy(session, task, args, tokenizer)
    print(f"One ORT session serves {session.names()} by swapping adapters per call.")
    return accuracy


def print_table(results: dict[str, dict], ort: dict[str, float]) -> None:
    """The demo's summary table."""
    print(
        f"\n{'task':6} {'qpeft acc':>9} {'ORT acc':>8} {'head-only':>9} {'trainable':>10} {'LoRA r=8':>10}"
        f" {'file bytes':>10} {'LoRA r=8 bytes':>15}"
    )
    for task, r in results.items():
        a, h = r["adapter"], r["head_only"]
        lora = a["lora_r8_parameters"] + h["trainable_parameters"]
        print(
            f"{task:6} {a['test_accuracy']:9.3f} {ort[task]:8.3f} {h['test_accuracy']:9.3f} "
            f"{a['trainable_parameters']:10,} {lora:10,} {r['path'].stat().st_size:10,} "
            f"{lora * LORA_R8_BYTES_PER_PARAM:15,}"
        )
    print(
        "\nqpeft acc: the trained model in torch; ORT acc: its packed file (4-bit angles, fp16 λ and head) "
        "through the shared ONNX session, same test split. LoRA r=8 counts its factors on the same 37 targets "
        "plus the same head; its bytes are fp32 tensors alone (headers excluded). Full-budget accuracy, 3 seeds, "
        "real PEFT LoRA: BENCHMARKS.md."
    )


def main() -> None:
    """Run the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-examples", type=int, default=600)
    parser.add_argument("--test-examples", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    results = train_all(args)
    print_table(results, deploy(results, args))


if __name__ == "__main__":
    main()
