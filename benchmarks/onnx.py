"""ONNX Runtime latency of the export modes on MiniLM, against merged and against ORT's own LoRA adapters.

One run, on this machine, for a 2-label MiniLM classifier (all 37 linear layers adapted):
  merged             ΔW folded into the weights (the reference, ×1.00)
  runtime K=8        qpeft.CircuitApply per layer, angles constant, --apply auto: W + ΔW folded by onnxruntime
                     at session start (fold; the pooler's Gemm: the cheaper of circuit and dense)
  runtime K=8 dense  the same with --apply dense: U, V constant-folded, two thin matmuls per token
  runtime full       full intrinsic rank, K = min(N, M), --apply auto (fold)
  runtime full circuit  the same with --apply circuit: the circuits act on the activations
  runtime full dense the same with U, V materialised (the path the circuits must beat)
  swappable factors  K=8, overridable v / ut, an adapter file active on every run
  swappable angles   K=8, overridable angles / λ, an adapter file active (circuits rebuilt every run)
  ORT LoRA r=8       the peer: MatMul(MatMul(x, A), B) + Add per layer, A / B overridable, an adapter active
at 1×16 and 8×128 tokens (medians of interleaved runs, one intra-op thread), the session start of each (where
onnxruntime folds constants), plus file sizes and the accuracy change of merged fp16 / int8 on Rotten Tomatoes
(an adapter trained for one epoch on 256 examples).

    python -m benchmarks.onnx [--repeats 200] [--examples 200]
writes benchmarks/results/onnx.json and benchmarks/results/onnx.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.common import interleaved_times, machine_info, markdown_table, write_results
from benchmarks.ort_lora import add_lora
from qpeft_deploy.core.attach import adapted_layers, attach
from qpeft_deploy.data.text import load_task
from qpeft_deploy.export.onnx.compare import probe_inputs
from qpeft_deploy.export.onnx.export import TASKS, export_onnx, export_onnx_adapter, export_torch
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.io.onnx_adapter import MODEL_FILE, write_ort_adapter
from qpeft_deploy.io.ort import session_options
from qpeft_deploy.models import load_task_model, load_tokenizer
from qpeft_deploy.training.train import fit

SHAPES = ((1, 16), (8, 128))
LABELS = {0: "rotten", 1: "fresh"}


def random_adapter(path: Path, rank: int | str, seed: int) -> Path:
    """A 2-label adapter on all-linear with random λ (std 0.3 / √(K/8)) and head."""
    model = load_task_model("minilm", LABELS, seed=seed)
    attach(model, rank=rank, seed=seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.spectrum.lam.normal_(0, 0.3 / (layer.rank / 8) ** 0.5)
        model.classifier.weight.normal_(0, 0.3)
    return save_adapter(model, path, base="minilm")


def trained_adapter(path: Path) -> Path:
    """A K=8 adapter trained for one epoch on 256 Rotten Tomatoes examples."""
    data = load_task("rt", max_train=256, max_test=0)
    model = load_task_model("minilm", data.id2label, seed=0)
    attach(model, rank=8, seed=0)
    fit(
        model,
        load_tokenizer("minilm"),
        data.train,
        epochs=1,
        lr=2e-2,
        head_lr=2e-2,
        batch_size=32,
        max_length=64,
        quiet=True,
    )
    return save_adapter(model, path, base="minilm")


def lora_peer(folder: Path, rank: int = 8) -> tuple[Path, Path]:
    """ORT's LoRA pattern on the same 37 layers (A, B overridable) and an adapter file with random A, B."""
    model = load_task_model("minilm", LABELS, seed=0)
    weights = {
        name: m.weight.detach().numpy()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "classifier"
    }
    folder.mkdir()
    path = folder / MODEL_FILE
    export_torch(model, path, TASKS["text-classification"], probe_inputs(model, load_tokenizer("minilm")))
    params = add_lora(path, weights.values(), rank)
    write_ort_adapter(folder / "lora.onnx_adapter", params, 1, 1)
    return path, folder / "lora.onnx_adapter"


class Runner:
    """An onnxruntime session (one intra-op thread) with an optional active adapter file."""

    def __init__(self, model: Path, adapter: Path | None = None):
        start = time.perf_counter()
        self.session = ort.InferenceSession(
            str(model), session_options(1), providers=["CPUExecutionProvider"]
        )
        self.start_seconds = time.perf_counter() - start
        self.options = ort.RunOptions()
        if adapter is not None:
            self.adapter = ort.LoraAdapter()  # kept alive here: RunOptions does not own it
            self.adapter.Load(str(adapter))
            self.options.add_active_adapter(self.adapter)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: feeds[k] for k in self.inputs}, self.options)[0]


def feeds_for(batch: int, length: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(batch * length).integers(1000, 20000, (batch, length))
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}


def build(folder: Path) -> tuple[dict[str, Runner], dict]:
    """Every variant's runner and the file sizes."""
    k8, k8b, full = (
        random_adapter(folder / f"{n}.qpeft", r, s)
        for n, r, s in (("k8", 8, 1), ("k8b", 8, 2), ("full", "full", 3))
    )
    exports = {
        "merged": export_onnx("minilm", k8, folder / "merged", mode="merged", quiet=True),
        "runtime K=8": export_onnx("minilm", k8, folder / "runtime8", mode="runtime", quiet=True),
        "runtime K=8 dense": export_onnx(
            "minilm", k8, folder / "runtime8dense", mode="runtime", apply="dense", quiet=True
        ),
        "runtime full": export_onnx("minilm", full, folder / "runtimefull", mode="runtime", quiet=True),
        "runtime full circuit": export_onnx(
            "minilm", full, folder / "fullcircuit", mode="runtime", apply="circuit", quiet=True
        ),
        "runtime full dense": export_onnx(
            "minilm", full, folder / "fulldense", mode="runtime", apply="dense", quiet=True
        ),
        "swappable factors": export_onnx("minilm", k8, folder / "factors", mode="swappable", quiet=True),
        "swappable angles": export_onnx(
            "minilm", k8, folder / "angles", mode="swappable", swap="angles", quiet=True
        ),
    }
    adapters = {
        swap: export_onnx_adapter(k8b, folder / f"k8b-{swap}.onnx_adapter", swap=swap)
        for swap in ("factors", "angles")
    }
    lora_model, lora_file = lora_peer(folder / "lora")
    runners = {
        name: Runner(
            Path(report["output"]) / MODEL_FILE,
            Path(adapters[name.split()[1]]["output"]) if name.startswith("swappable") else None,
        )
        for name, report in exports.items()
    }
    runners["ORT LoRA r=8"] = Runner(lora_model, lora_file)
    sizes = {
        "model_bytes": {name: r["model_bytes"] for name, r in exports.items()}
        | {"ORT LoRA r=8": lora_model.stat().st_size},
        "adapter_bytes": {
            "qpeft K=8": k8.stat().st_size,
            "qpeft full": full.stat().st_size,
            "onnx_adapter factors K=8": adapters["factors"]["bytes"],
            "onnx_adapter angles K=8": adapters["angles"]["bytes"],
            "onnx_adapter LoRA r=8": lora_file.stat().st_size,
        },
        "apply": {name: r["apply"] for name, r in exports.items()},
        "session_start_seconds": {name: r.start_seconds for name, r in runners.items()},
    }
    return runners, sizes


def latencies(runners: dict[str, Runner], repeats: int) -> dict[str, dict[str, float]]:
    """Median ms per run at each shape, all variants timed round-robin."""
    out = {}
    for batch, length in SHAPES:
        feeds = feeds_for(batch, length)
        reps = repeats if batch * length <= 64 else max(3, repeats // 20)
        times = interleaved_times(
            {n: (lambda r=r, f=feeds: r(f)) for n, r in runners.items()}, reps, warmup=2
        )
        out[f"{batch}x{length}"] = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return out


def precision(folder: Path, examples: int) -> dict:
    """Accuracy of merged fp32 / fp16 / int8 (vs torch) on Rotten Tomatoes test examples, and model sizes."""
    adapter = trained_adapter(folder / "trained.qpeft")
    out = {}
    for name, options in (("fp32", {}), ("fp16", {"dtype": "fp16"}), ("int8", {"quantize": "int8"})):
        report = export_onnx(
            "minilm",
            adapter,
            folder / f"p-{name}",
            mode="merged",
            check_task="rt",
            check_examples=examples,
            quiet=True,
            **options,
        )
        out[name] = {
            "accuracy": report["accuracy"]["onnx"],
            "torch_accuracy": report["accuracy"]["torch"],
            "max_abs_logit_change": report["max_abs_diff_vs_torch"],
            "argmax_agreement": report["argmax_agreement"],
            "model_bytes": report["model_bytes"],
        }
    return out


def goals(ms: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The issue's goals, checked against this run."""
    big, small = ms["8x128"], ms["1x16"]
    return {
        "runtime K=8 no slower than ORT LoRA (both shapes)": all(
            s["runtime K=8"] <= s["ORT LoRA r=8"] for s in (big, small)
        ),
        "runtime K=8 dense no slower than ORT LoRA (both shapes)": all(
            s["runtime K=8 dense"] <= s["ORT LoRA r=8"] for s in (big, small)
        ),
        "runtime full ≤ 2× merged (both shapes)": all(
            s["runtime full"] <= 2 * s["merged"] for s in (big, small)
        ),
        "runtime full circuit ≤ 2× merged (both shapes)": all(
            s["runtime full circuit"] <= 2 * s["merged"] for s in (big, small)
        ),
        "runtime full circuit faster than dense full (both shapes)": all(
            s["runtime full circuit"] < s["runtime full dense"] for s in (big, small)
        ),
        "swappable factors ≤ 1.3× merged at 8×128": big["swappable factors"] <= 1.3 * big["merged"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--examples", type=int, default=200, help="Rotten Tomatoes test examples for accuracy"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        runners, sizes = build(Path(tmp))
        ms = latencies(runners, args.repeats)
        accuracy = precision(Path(tmp), args.examples)
    ratios = {shape: {n: t / times["merged"] for n, t in times.items()} for shape, times in ms.items()}
    rows = [
        [
            name,
            ms["1x16"][name],
            ratios["1x16"][name],
            ms["8x128"][name],
            ratios["8x128"][name],
            sizes["model_bytes"][name] / 1e6,
            sizes["session_start_seconds"][name],
        ]
        for name in runners
    ]
    table = markdown_table(
        ["variant", "1×16 ms", "× merged", "8×128 ms", "× merged", "model MB", "session start s"], rows
    )
    table += "\n" + markdown_table(["adapter file", "bytes"], list(sizes["adapter_bytes"].items()))
    table += "\n" + markdown_table(
        ["merged", "accuracy", "torch accuracy", "max |Δlogit|", "argmax agreement", "model MB"],
        [
            [
                k,
                v["accuracy"],
                v["torch_accuracy"],
                v["max_abs_logit_change"],
                v["argmax_agreement"],
                v["model_bytes"] / 1e6,
            ]
            for k, v in accuracy.items()
        ],
    )
    verdicts = goals(ms)
    table += "\n" + markdown_table(["goal", "met"], [[k, "yes" if v else "no"] for k, v in verdicts.items()])
    print(table)
    write_results(
        "onnx",
        {
            "machine": machine_info(),
            "ort_threads": 1,
            "ms": ms,
            "ratio_to_merged": ratios,
            "goals": verdicts,
            "accuracy": accuracy,
            **sizes,
        },
        table,
    )


if __name__ == "__main__":
    main()
