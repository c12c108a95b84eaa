"""End-to-end demo on the shipped all-MiniLM-L6-v2 and the shipped data: the whole product in one run.

1. trains three task adapters (Rotten Tomatoes sentiment, TREC-6 question type, SMS spam) in the setting the
   accuracy study recommends (BENCHMARKS.md, Accuracy: ``qpeft-full-L1-a6l3h8``): full rank, L=1, trained
   quantisation-aware on 6-bit angles, 3-bit λ codes and 8-bit head codes, so the packed file is the trained
   model; and, on the
   same budget, data and seed, the PEFT LoRA r=8 peer (all-linear + head, ``qpeft_deploy.models.lora_peer``) and
   the head-only baseline of each;
2. packs them (6-bit angles, 3-bit λ codes, 8-bit head weight codes) and inspects one; saves each LoRA with ``save_pretrained``;
3. merges the RT adapter into a plain transformers checkpoint;
4. exports one swappable ONNX model and runs all three tasks through ONE onnxruntime session by swapping adapters;
5. prints one table, a row per task: accuracy (Q-PEFT in torch and through ORT, LoRA r=8, head-only), trainable
   parameters of each, and the bytes of the .qpeft file and of LoRA's adapter_model.safetensors as saved.
Artefacts go to ./demo-out/. The budget is the accuracy study's (1,000 train / 500 test examples, one epoch of 32
steps, max_length 64, batch 32, the same rates) with its seed 0, so the table reproduces the study's seed-0 runs
(up to floating-point differences between thread counts); the study's means over 3 seeds are in BENCHMARKS.md
(python -m benchmarks.accuracy). A shorter budget was tried: with 640 examples (20 steps) full rank had not yet
left the head-only baseline on RT (65.7 % both) and trailed LoRA by 5 points on TREC-6, so the demo keeps the
study's.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from qpeft_deploy.core.attach import trainable_parameters
from qpeft_deploy.core.threads import free_cores, torch_threads
from qpeft_deploy.data.tasks import load_data
from qpeft_deploy.data.text import load_task
from qpeft_deploy.export.onnx.export import export_onnx, export_onnx_adapter
from qpeft_deploy.io.file_tools import inspect_adapter
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.merge.checkpoint import merge_checkpoint
from qpeft_deploy.models import LORA_PEER_LR, load_task_model, load_tokenizer, lora_peer, tokenize
from qpeft_deploy.runtime import OrtAdapterSession
from qpeft_deploy.training.train import TrainSpec, evaluate, fit, run_spec

TASKS = ("rt", "trec6", "sms")
# The study's recommended setting (benchmarks/accuracy.py, qpeft-full-L1-a6l3), as `qpeft train` options.
RECOMMENDED = {"rank": "full", "layers": 1, "bits": 6, "lambda_bits": 3, "head_bits": 8}
LORA_WEIGHTS = "adapter_model.safetensors"


def train_lora(spec: TrainSpec, folder: Path, quiet: bool) -> dict:
    """Train the PEFT LoRA r=8 peer on ``spec``'s task, data, budget, seed and threads (A and B at the study's
    LoRA rate, the head at the spec's head rate) and save it to ``folder``; returns accuracy, counts, bytes."""
    data = load_data(spec.task, max_train=spec.max_examples, max_test=spec.max_test, seed=spec.seed)
    tokenizer = load_tokenizer(spec.base)
    model = lora_peer(load_task_model(spec.base, data.id2label, seed=spec.seed), seed=spec.seed)
    with torch_threads(spec.threads):
        result = fit(
            model,
            tokenizer,
            data.train,
            epochs=spec.epochs,
            lr=LORA_PEER_LR,
            head_lr=spec.head_lr,
            body_lr=LORA_PEER_LR,
            batch_size=spec.batch_size,
            max_length=spec.max_length,
            seed=spec.seed,
            quiet=quiet,
        )
        accuracy = evaluate(model, tokenizer, data.test, max_length=spec.max_length)["accuracy"]
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(str(folder))
    return {
        "test_accuracy": accuracy,
        "trainable_parameters": trainable_parameters(model),
        "train_seconds": result.seconds,
        "path": folder / LORA_WEIGHTS,
    }


def train_all(args: argparse.Namespace) -> dict[str, dict]:
    """Per task: the recommended adapter (saved packed), the LoRA r=8 peer (saved) and the head-only baseline."""
    results = {}
    for task in TASKS:
        spec = TrainSpec(
            task=task,
            **RECOMMENDED,
            epochs=args.epochs,
            max_examples=args.train_examples,
            max_test=args.test_examples,
            max_length=args.max_length,
            threads=args.threads,
        )
        print(
            f"\n[{task}] training a Quantum-PEFT adapter (all-linear, full rank, L=1, on 6-bit angles, "
            "3-bit λ codes and 8-bit head codes) ...",
            flush=True,
        )
        model, adapter = run_spec(spec, adapter=True, quiet=args.quiet)
        # the file's grids are the ones it trained on, so the packed file is the trained model
        path = save_adapter(
            model,
            args.out / f"{task}.qpeft",
            bits=spec.bits,
            lambda_bits=spec.lambda_bits,
            head_bits=spec.head_bits,
            lambda_dtype="fp16",
            base=spec.base,
        )
        print(
            f"[{task}]   accuracy {adapter['test_accuracy']:.3f}, {adapter['train_seconds']:.0f} s",
            flush=True,
        )
        lora = None
        if task in args.lora_tasks:
            print(f"[{task}] training PEFT LoRA r=8 (all-linear + head) on the same budget ...", flush=True)
            lora = train_lora(spec, args.out / f"{task}-lora", args.quiet)
            print(
                f"[{task}]   accuracy {lora['test_accuracy']:.3f}, {lora['train_seconds']:.0f} s", flush=True
            )
        print(f"[{task}] training the head-only baseline on the same budget ...", flush=True)
        _, head_only = run_spec(spec, adapter=False, quiet=args.quiet)
        print(
            f"[{task}]   accuracy {head_only['test_accuracy']:.3f}, {head_only['train_seconds']:.0f} s",
            flush=True,
        )
        results[task] = {"adapter": adapter, "lora": lora, "head_only": head_only, "path": path}
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
    shown = (
        "variant",
        "targets",
        "ranks",
        "bits",
        "lambda_bits",
        "head_bits",
        "layers",
        "bytes",
        "parameters",
    )
    print(
        json.dumps({k: v for k, v in inspect_adapter(results["rt"]["path"]).items() if k in shown}, indent=1)
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
        export_onnx_adapter(result["path"], adapter_file, overwrite=True)  # a rerun replaces the last one
        session.load(task, adapter_file)
        accuracy[task] = ort_accuracy(session, task, args, tokenizer)
    print(f"One ORT session serves {session.names()} by swapping adapters per call.")
    return accuracy


def print_table(results: dict[str, dict], ort: dict[str, float]) -> None:
    """The demo's summary table: accuracy, trainable parameters and file bytes of Q-PEFT, LoRA r=8, head-only."""
    print(f"\n{'':6} {'test accuracy':^37} {'trainable parameters':^28} {'file bytes':^32}")
    print(
        f"{'task':6} {'Q-PEFT':>8} {'ORT':>8} {'LoRA r=8':>9} {'head':>9} {'Q-PEFT':>8} {'LoRA r=8':>9} "
        f"{'head':>9} {'.qpeft':>8} {'LoRA r=8':>10} {'ratio':>12}"
    )
    for task, r in results.items():
        a, lora, h = r["adapter"], r["lora"], r["head_only"]
        qpeft_bytes = r["path"].stat().st_size
        if lora is None:
            lora_cells = ("-", "-", "-", "-")
        else:
            lora_bytes = lora["path"].stat().st_size
            lora_cells = (
                f"{lora['test_accuracy']:.3f}",
                f"{lora['trainable_parameters']:,}",
                f"{lora_bytes:,}",
                f"{lora_bytes / qpeft_bytes:.0f}×",
            )
        print(
            f"{task:6} {a['test_accuracy']:8.3f} {ort[task]:8.3f} {lora_cells[0]:>9} {h['test_accuracy']:9.3f} "
            f"{a['trainable_parameters']:8,} {lora_cells[1]:>9} {h['trainable_parameters']:9,} "
            f"{qpeft_bytes:8,} {lora_cells[2]:>10} {lora_cells[3]:>12}"
        )
    print(
        "\nQ-PEFT: the trained model in torch (full rank, L=1, trained on 6-bit angles, 3-bit λ and 8-bit head "
        "codes); ORT: its "
        ".qpeft file (6-bit angles, 3-bit λ codes, 8-bit head codes, base fingerprint) through the shared ONNX session, "
        "same test split. LoRA r=8: PEFT LoRA on the same 37 layers + head, same data, budget and seed. Bytes "
        "are the saved files' sizes; ratio = LoRA's fp32 adapter_model.safetensors / the .qpeft. One seed of a "
        "small budget (LoRA's own spread over seeds reaches ±7 points on TREC-6): the means over 3 seeds are in "
        "BENCHMARKS.md."
    )


def main() -> None:
    """Run the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-examples", type=int, default=1000)
    parser.add_argument("--test-examples", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--lora-tasks",
        nargs="*",
        choices=TASKS,
        default=list(TASKS),
        help="tasks on which the PEFT LoRA r=8 peer trains too (default: all three; the option alone: none)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads for every method (default: the machine's free cores)"
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    args.threads = args.threads or free_cores()
    print(f"Training every method on {args.threads} torch thread(s).")
    args.out.mkdir(exist_ok=True)
    results = train_all(args)
    print_table(results, deploy(results, args))


if __name__ == "__main__":
    main()
