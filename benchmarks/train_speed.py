"""Training step time: Quantum-PEFT against PEFT LoRA r=8 on the same targets, batch and threads, in one run.

Models: MiniLM (``minilm``, all-linear + the classification head; a batch of 16 Rotten Tomatoes reviews padded to
64 tokens) and the shipped small ViT (``samples/vit-fmnist5``, all-linear + head; 32 Fashion-MNIST images).
Settings: PEFT LoRA r=8 (``target_modules="all-linear"``, the peer), Quantum-PEFT K = 8, and full rank with
``mode`` auto, circuit and dense. One step is forward, backward and an AdamW step on the same batch; the
settings of one (model, threads) case are timed round-robin so that other load hits them alike, median over
the repeats after warm-up. Goal (issue #17): full rank ≤ 1.3× LoRA r=8. "MiniLM ×4" is MiniLM at 64 reviews
per step: folding's cost of forming ΔW is paid once per step, so more tokens per step amortise it.

Beside each full-rank ratio stands folding's multiply-add ratio: that of linear-layer multiply-adds if forming
ΔW were free. Both methods pay 2·rows·N·M per adapted layer (the base's forward and input gradient) and LoRA adds
3·rows·r·(N+M); a step that folds W + ΔW also pays the weight's gradient, rows·N·M, which LoRA never computes,
so it does about 1.4–1.5× LoRA's multiply-adds (less the share of attention, norms and the optimiser, which both
pay) however many rows a step has.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from benchmarks.common import interleaved_times, machine_info, markdown_table, write_results
from qpeft_deploy.core.attach import adapted_layers, attach, trainable_parameters
from qpeft_deploy.core.layer import QuantumPeftLinear
from qpeft_deploy.data.tasks import load_data, model_inputs
from qpeft_deploy.models import load_task_model, load_tokenizer

VIT = str(Path(__file__).resolve().parents[1] / "samples" / "vit-fmnist5")
CASES = {  # model -> (base, task, batch size, max tokens)
    "MiniLM": ("minilm", "rt", 16, 64),
    "ViT": (VIT, "fmnist-5to9", 32, None),
    "MiniLM ×4": ("minilm", "rt", 64, 64),
}
PEER = "PEFT LoRA r=8"


def batch(base: str, task: str, size: int, max_length: int | None) -> tuple[dict, dict[int, str]]:
    """The inputs (with labels) of ``size`` training examples of ``task``, and the task's labels."""
    data = load_data(task, max_train=size, max_test=0)
    items, labels = zip(*data.train)
    if max_length is None:
        inputs = model_inputs(None, items)
    else:
        tokenizer = load_tokenizer(base)
        inputs = dict(
            tokenizer(
                list(items), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
    return {**inputs, "labels": torch.tensor(labels)}, data.id2label


def settings(base: str, id2label: dict[int, str]) -> dict[str, Callable[[], torch.nn.Module]]:
    """Each setting's model builder."""

    def model() -> torch.nn.Module:
        return load_task_model(base, id2label)  # a fresh base per setting

    lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules="all-linear")
    return {
        PEER: lambda: get_peft_model(model(), lora),
        "Q-PEFT K=8": lambda: attach(model(), rank=8),
        "Q-PEFT full, auto": lambda: attach(model(), rank="full"),
        "Q-PEFT full, circuit": lambda: attach(model(), rank="full", mode="circuit"),
        "Q-PEFT full, dense": lambda: attach(model(), rank="full", mode="dense"),
    }


def step_fn(model: torch.nn.Module, inputs: dict) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) of ``model`` on ``inputs``."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def update_rows(model: torch.nn.Module, inputs: dict) -> dict[QuantumPeftLinear, int]:
    """The activation rows every adapted layer sees in one forward pass of ``inputs``."""
    rows: dict[QuantumPeftLinear, int] = {}

    def record(layer: QuantumPeftLinear, args: tuple) -> None:
        rows.setdefault(layer, args[0].numel() // layer.in_features)

    hooks = [layer.register_forward_pre_hook(record) for layer in adapted_layers(model).values()]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return rows


def fold_macs(model: torch.nn.Module, inputs: dict, lora_rank: int = 8) -> float:
    """Linear-layer multiply-adds of a folding step (base forward, input and weight gradients; ΔW formed for
    free) against LoRA's at ``lora_rank`` on the same layers (module docstring)."""
    folded = lora = 0.0
    for layer, rows in update_rows(model, inputs).items():
        n, m = layer.out_features, layer.in_features
        folded += 3 * rows * n * m
        lora += 2 * rows * n * m + 3 * rows * lora_rank * (n + m)
    return folded / lora


def measure(name: str, threads: int, repeats: int, warmup: int) -> list[dict]:
    """Rows of one (model, threads) case: seconds per step and the ratio to LoRA r=8."""
    base, task, size, max_length = CASES[name]
    torch.set_num_threads(threads)
    inputs, id2label = batch(base, task, size, max_length)
    models = {label: build() for label, build in settings(base, id2label).items()}
    times = interleaved_times({label: step_fn(m, inputs) for label, m in models.items()}, repeats, warmup)
    peer = statistics.median(times[PEER])
    return [
        {
            "model": name,
            "threads": threads,
            "setting": label,
            "trainable_parameters": trainable_parameters(models[label]),
            "seconds_per_step": statistics.median(t),
            "min_seconds_per_step": min(t),
            "ratio_vs_lora_r8": statistics.median(t) / peer,
            "fold_macs": fold_macs(models[label], inputs) if label.startswith("Q-PEFT full") else None,
        }
        for label, t in times.items()
    ]


def table(rows: list[dict]) -> str:
    """Markdown: one row per (model, threads, setting)."""
    headers = [
        "model",
        "threads",
        "setting",
        "trainable",
        "s / step (median)",
        "min",
        "× LoRA r=8",
        "fold MACs ×",
    ]
    body = [
        [
            r["model"],
            r["threads"],
            r["setting"],
            r["trainable_parameters"],
            r["seconds_per_step"],
            r["min_seconds_per_step"],
            round(r["ratio_vs_lora_r8"], 2),
            "" if r["fold_macs"] is None else round(r["fold_macs"], 2),
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


def render(data: dict) -> str:
    """The markdown report of a run."""
    info, settings = data["machine"], data["settings"]
    return (
        f"Median seconds per training step (forward + backward + AdamW), settings timed round-robin; "
        f"{settings['repeats']} repeats after {settings['warmup']} warm-up rounds on {info['cpu_model']}, "
        f"{info['cpu_count']} cores, load {info['load_average_1_5_15min'][0]:.1f} at the end. "
        "MiniLM: 16 reviews × 64 tokens (MiniLM ×4: 64 reviews, 4,096 token rows per step); ViT: 32 images. "
        "Goal: full rank ≤ 1.3× LoRA r=8. `fold MACs ×`: the ratio of linear-layer multiply-adds of a step that "
        "folds W + ΔW, with ΔW formed for free, to LoRA's (module docstring); it is no floor on time, as "
        "LoRA's many small GEMMs run below a large GEMM's rate.\n\n" + table(data["rows"])
    )


def main() -> None:
    """Measure every case, print the table, write JSON + markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    rows = [
        r for name in args.models for t in args.threads for r in measure(name, t, args.repeats, args.warmup)
    ]
    data = {"machine": machine_info(), "settings": vars(args), "cases": CASES, "rows": rows}
    md = render(data)
    print(md)
    write_results("train_speed", data, md)


if __name__ == "__main__":
    main()
