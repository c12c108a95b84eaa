"""Vision: Quantum-PEFT on the committed ViT (samples/vit-fmnist5) against LoRA r=8 and head-only, and
the ONNX latency of the adapted ViT merged vs runtime.

Adapting the base (pre-trained on Fashion-MNIST classes 0–4) to an unseen task (default ``fmnist-5to9``),
every method with the same data, epochs, batch size and seeds through one loop (``qpeft_deploy.training.train.fit``):
  head-only      the new 5-class head alone (the baseline every adapter must beat)
  qpeft K=8      all 24 linear layers, Pauli circuits, K = 8, L = 1
  qpeft full     the same at full intrinsic rank K = min(N, M)
  LoRA r=8       HF PEFT, target_modules="all-linear", lora_alpha=16, the head in modules_to_save
Learning rates: each method's from a small grid (``GRIDS``), picked by accuracy on a validation split (the
last 20 % of the training images, trained on the rest; first seed) with ``--sweep``; the defaults in ``LRS``
are the picks of the last sweep. The head-only grid runs first and its pick is also the rate of Q-PEFT's head
(Q-PEFT's grid is over the circuits' rate, LoRA's over its A and B: every method's head trains at that rate).
Reported: test accuracy (mean over seeds), trainable parameters, file bytes (.qpeft lossless and with 8-bit
angles + fp16 λ; PEFT's adapter_model.safetensors; the head as safetensors), training seconds (wall time on a
possibly shared machine: in the JSON only).
ONNX: the trained K=8 (and full-rank) adapter exported ``merged`` and ``runtime``; ORT latency (medians of
interleaved runs, one intra-op thread) at batch 1 and 32, and max |ORT − torch|.

    python -m benchmarks.vision [--task fmnist-5to9] [--max-train 2000] [--max-test 1000] [--epochs 2]
                                [--seeds 0] [--repeats 50] [--sweep]
writes benchmarks/results/vision.json and benchmarks/results/vision.md. Needs scripts/fetch_fmnist.sh's data.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from benchmarks.common import interleaved_times, machine_info, markdown_table, write_results
from qpeft_deploy.core.attach import find_head, lora_parameter_count, trainable_parameters
from qpeft_deploy.data.images import pixel_values
from qpeft_deploy.data.tasks import load_data
from qpeft_deploy.data.text import TaskData
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.models import load_task_model
from qpeft_deploy.training.train import TrainSpec, build_model, evaluate, fit

BASE = str(Path(__file__).resolve().parents[1] / "samples" / "vit-fmnist5")
METHODS = ("head-only", "qpeft K=8", "qpeft full", "LoRA r=8")
GRIDS = {  # the rate each grid varies: head-only's head; the circuits' (head at head-only's pick); LoRA's all
    "head-only": (2e-3, 5e-3, 2e-2),
    "qpeft K=8": (1e-2, 2e-2, 5e-2),
    "qpeft full": (1e-2, 2e-2, 5e-2),
    "LoRA r=8": (5e-4, 1e-3, 2e-3),
}
LRS = {"head-only": 5e-3, "qpeft K=8": 2e-2, "qpeft full": 2e-2, "LoRA r=8": 2e-3}  # picks of --sweep
BATCHES = (1, 32)


def lora_model(id2label: dict[int, str], seed: int):
    """The task model with PEFT LoRA r=8 on every linear layer but the head (the head trains in full)."""
    from peft import LoraConfig, get_peft_model

    model = load_task_model(BASE, id2label, seed=seed)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", modules_to_save=["classifier"]
    )
    return get_peft_model(model, config)


def file_bytes(method: str, model, folder: Path) -> dict[str, int]:
    """What the method's fine-tune costs to store."""
    if method.startswith("qpeft"):
        lossless = save_adapter(model, folder / "a.qpeft", base=BASE)
        packed = save_adapter(model, folder / "b.qpeft", bits=8, lambda_dtype="fp16", base=BASE)
        return {"file_bytes": lossless.stat().st_size, "file_bytes_8bit": packed.stat().st_size}
    if method.startswith("LoRA"):
        model.save_pretrained(str(folder / "lora"))
        return {"file_bytes": (folder / "lora" / "adapter_model.safetensors").stat().st_size}
    head = find_head(model)
    tensors = {f"{head}.{k}": v.contiguous() for k, v in model.get_submodule(head).state_dict().items()}
    save_file(tensors, str(folder / "head.safetensors"))
    return {"file_bytes": (folder / "head.safetensors").stat().st_size}


def train_one(method: str, data, spec: TrainSpec, lrs: dict[str, float], folder: Path | None = None):
    """Train one method on one seed at its rate in ``lrs``; returns the model and its row (and file bytes
    when ``folder``)."""
    lr = lrs[method]
    if method == "LoRA r=8":
        model = lora_model(data.id2label, spec.seed)
    else:
        rank = "full" if method == "qpeft full" else 8
        model = build_model(
            TrainSpec(**{**spec.__dict__, "rank": rank}), data.id2label, adapter=method != "head-only"
        )
    head_lr = lr if method == "head-only" else lrs["head-only"]
    result = fit(
        model,
        None,
        data.train,
        epochs=spec.epochs,
        lr=lr,
        head_lr=head_lr,
        body_lr=lr,
        batch_size=spec.batch_size,
        seed=spec.seed,
        quiet=True,
    )
    metrics = evaluate(model, None, data.test)
    row = {
        "method": method,
        "seed": spec.seed,
        "lr": lr,
        "test_accuracy": metrics["accuracy"],
        "trainable_parameters": trainable_parameters(model),
        "train_seconds": round(result.seconds, 1),
        "final_train_loss": statistics.mean(result.losses[-10:]),
    }
    if folder is None:
        return model, row
    if method.startswith("qpeft"):
        row["lora_r8_parameters_same_targets"] = lora_parameter_count(model, 8)
    return model, row | file_bytes(method, model, folder)


def onnx_latency(adapters: dict[str, Path], images: np.ndarray, repeats: int, folder: Path) -> dict:
    """ORT latency of merged vs runtime exports of the given adapters at batch 1 and 32."""
    import onnxruntime as ort

    from qpeft_deploy.export.onnx.export import export_onnx
    from qpeft_deploy.io.ort import session_options

    sessions, reports = {}, {}
    for name, path in adapters.items():
        for mode in ("merged", "runtime"):
            if mode == "merged" and name != "qpeft K=8":
                continue  # merged is the same graph whatever the rank
            label = "merged" if mode == "merged" else f"runtime {name.removeprefix('qpeft ')}"
            out = folder / label.replace(" ", "_").replace("=", "")
            report = export_onnx(BASE, path, out, mode=mode, quiet=True)
            reports[label] = {k: report[k] for k in ("max_abs_diff_vs_torch", "model_bytes", "apply")}
            sessions[label] = ort.InferenceSession(
                str(out / "model.onnx"), session_options(1), providers=["CPUExecutionProvider"]
            )
    rows = {}
    for batch in BATCHES:
        feed = {"pixel_values": pixel_values(images[:batch]).numpy()}
        times = interleaved_times(
            {k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()},
            repeats=repeats,
            warmup=3,
        )
        for label, samples in times.items():
            row = rows.setdefault(label, dict(reports[label]))
            row[f"batch{batch}_ms"] = statistics.median(samples) * 1e3
    for row in rows.values():
        for batch in BATCHES:
            row[f"batch{batch}_x_merged"] = row[f"batch{batch}_ms"] / rows["merged"][f"batch{batch}_ms"]
    return rows


def sweep(data, spec: TrainSpec) -> tuple[dict[str, float], list[dict]]:
    """Each method's best rate of its grid by validation accuracy (last 20 % of train held out)."""
    cut = int(0.8 * len(data.train))
    split = TaskData(data.name, data.labels, data.train[:cut], data.train[cut:])
    rows, best = [], {}
    for method, grid in GRIDS.items():  # head-only first: its pick is Q-PEFT's head rate
        for lr in grid:
            _, row = train_one(method, split, spec, best | {method: lr})
            rows.append({"method": method, "lr": lr, "validation_accuracy": row["test_accuracy"]})
            print(f"sweep {method} lr {lr:g}: validation accuracy {row['test_accuracy']:.4f}", flush=True)
        mine = [r for r in rows if r["method"] == method]
        best[method] = max(mine, key=lambda r: r["validation_accuracy"])["lr"]
    return best, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fmnist-5to9")
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="pick each method's rate on validation first")
    args = parser.parse_args()
    torch.set_num_threads(2)

    rows, adapters, lrs, sweep_rows = [], {}, dict(LRS), None
    if args.sweep:
        data = load_data(args.task, max_train=args.max_train, max_test=0, seed=args.seeds[0])
        spec = TrainSpec(
            base=BASE, task=args.task, epochs=args.epochs, batch_size=args.batch_size, seed=args.seeds[0]
        )
        lrs, sweep_rows = sweep(data, spec)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            data = load_data(args.task, max_train=args.max_train, max_test=args.max_test, seed=seed)
            spec = TrainSpec(
                base=BASE, task=args.task, epochs=args.epochs, batch_size=args.batch_size, seed=seed
            )
            for method in METHODS:
                folder = tmp / f"{seed}-{method.replace(' ', '_')}"
                folder.mkdir()
                _, row = train_one(method, data, spec, lrs, folder)
                rows.append(row)
                print(
                    f"seed {seed} {method}: accuracy {row['test_accuracy']:.4f}, "
                    f"{row['trainable_parameters']} params, {row['file_bytes']} B, "
                    f"{row['train_seconds']} s",
                    flush=True,
                )
                if method.startswith("qpeft") and seed == args.seeds[0]:
                    adapters[method] = folder / "a.qpeft"
        images = np.stack([im for im, _ in data.test[: max(BATCHES)]])
        try:
            latency = onnx_latency(adapters, images, args.repeats, tmp)
        except (AttributeError, ConfigError) as e:  # an exporter without image-classification support
            latency = {"unsupported": f"{type(e).__name__}: {e}"}

    summary = []
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        summary.append(
            {
                "method": method,
                "test_accuracy_mean": statistics.mean(r["test_accuracy"] for r in mine),
                "test_accuracy_min": min(r["test_accuracy"] for r in mine),
                "trainable_parameters": mine[0]["trainable_parameters"],
                "file_bytes": mine[0]["file_bytes"],
                "file_bytes_8bit": mine[0].get("file_bytes_8bit"),
                "train_seconds_mean": statistics.mean(r["train_seconds"] for r in mine),
                "lr": lrs[method],
            }
        )
    head_only = summary[0]["test_accuracy_mean"]
    table = markdown_table(
        [
            "method",
            "lr",
            "test accuracy",
            "Δ vs head-only",
            "trainable params",
            "file bytes",
            "8-bit file bytes",
        ],
        [
            [
                s["method"],
                f"{s['lr']:g}",
                s["test_accuracy_mean"],
                s["test_accuracy_mean"] - head_only,
                s["trainable_parameters"],
                s["file_bytes"],
                s["file_bytes_8bit"] or "",
            ]
            for s in summary
        ],
    )
    table = (
        f"Task {args.task}: {args.max_train} train / {args.max_test} test images, {args.epochs} epochs, "
        f"batch {args.batch_size}, seeds {args.seeds}; base samples/vit-fmnist5; rates "
        f"{'picked on validation in this run' if args.sweep else 'from LRS (an earlier --sweep)'}.\n\n"
        + table
    )
    if "unsupported" in latency:
        table += f"\nONNX: not measured ({latency['unsupported']}).\n"
    else:
        table += "\n" + markdown_table(
            [
                "export",
                "batch 1 ms",
                "× merged",
                "batch 32 ms",
                "× merged",
                "max |ORT − torch|",
                "model bytes",
            ],
            [
                [
                    k,
                    r["batch1_ms"],
                    r["batch1_x_merged"],
                    r["batch32_ms"],
                    r["batch32_x_merged"],
                    r["max_abs_diff_vs_torch"],
                    r["model_bytes"],
                ]
                for k, r in latency.items()
            ],
        )
    settings = vars(args) | {"base": "samples/vit-fmnist5", "lrs": lrs, "grids": GRIDS}
    data_out = {
        "settings": settings,
        "machine": machine_info(),
        "summary": summary,
        "runs": rows,
        "sweep": sweep_rows,
        "onnx": latency,
    }
    write_results("vision", data_out, table)
    print(table)


if __name__ == "__main__":
    main()
