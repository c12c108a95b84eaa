"""LLM benchmark: SmolLM2-135M-Instruct fine-tuned with Quantum-PEFT vs PEFT LoRA r=8 and the untuned model.

One run, every method on the same instruction tasks (``rt``, ``sms``: the label as a one-word answer), the same
train and test examples, seed, batch and loop (``training.causal.fit_causal``: AdamW, loss on the answer tokens):

  untuned          SmolLM2 as shipped (evaluated only)
  lora-r8          real ``peft`` LoRA r=8, lora_alpha 16, all-linear, task_type CAUSAL_LM (``models.lora_peer``,
                   the peer); its factors train at fit()'s default body rate 2e-3
  qpeft-K8         Quantum-PEFT K = 8, L = 1, all-linear, 4-bit angles trained quantisation-aware
  qpeft-full-a6l3  full rank, 6-bit angles + 3-bit λ codes, quantisation-aware (the study's setting)

Reported per (task, method): exact-match accuracy of greedy answers and held-out answer loss, trainable
parameters, file bytes (the .qpeft file as written; LoRA's adapter_model.safetensors, fp32, as saved) and the
ratio, and seconds per training step (median of the run's steps is not kept by fit: total / steps).
Generation (greedy, 32 new tokens, a prompt that asks for a long answer): tokens/s of the merged model (the
K = 8 adapter folded into the weights, batch 1 and 16) against ``AdapterBank.generate`` with one adapter per
request (batch 1) and with a 16-row batch of 16 different adapters. Goals (issue #18): files ≥ 100× smaller than
LoRA r=8 at accuracy within 2 points; step time ≤ 1.5× LoRA; bank generation ≥ 0.8× the merged model's tokens/s.

    python -m benchmarks.llm [--tasks rt sms] [--train-examples 256] [--test-examples 100] [--threads 2]
writes benchmarks/results/llm.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, markdown_table, write_results
from qpeft_deploy.core.attach import merge_adapter, trainable_parameters
from qpeft_deploy.data.instructions import load_instructions
from qpeft_deploy.io.model_io import adapter_from_model, load_adapted_model
from qpeft_deploy.io.qpeft_file import write_adapter
from qpeft_deploy.models import SMOLLM2, load_causal_lm, lora_peer
from qpeft_deploy.runtime import AdapterBank
from qpeft_deploy.training.causal import build_causal_model, causal_tokenizer, evaluate_causal, fit_causal
from qpeft_deploy.training.train import TrainSpec

METHODS = {  # name -> TrainSpec options (None: not a Quantum-PEFT method)
    "untuned": None,
    "lora-r8": None,
    "qpeft-K8": {"rank": 8, "bits": 4},
    "qpeft-full-a6l3": {"rank": "full", "bits": 6, "lambda_bits": 3},
}
LONG_PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
NEW_TOKENS = 32
ADAPTERS = 16


def saved_bytes(method: str, model: torch.nn.Module, spec: TrainSpec | None, folder: Path) -> int:
    """Bytes of the file a user ships: the .qpeft as written, or LoRA's adapter_model.safetensors."""
    if method == "lora-r8":
        model.save_pretrained(folder / method)
        return (folder / method / "adapter_model.safetensors").stat().st_size
    path = write_adapter(
        folder / f"{method}.qpeft",
        adapter_from_model(model, SMOLLM2),
        bits=spec.bits,
        lambda_bits=spec.lambda_bits,
    )
    return path.stat().st_size


def run_method(method: str, task: str, args: argparse.Namespace, folder: Path) -> tuple[dict, Path | None]:
    """Train (unless untuned) and evaluate one method on one task; the row and the .qpeft path (if any)."""
    tokenizer = causal_tokenizer(SMOLLM2)
    data = load_instructions(task, max_train=args.train_examples, max_test=args.test_examples, seed=0)
    options = METHODS[method]
    spec = TrainSpec(base=SMOLLM2, task=task, max_length=args.max_length, batch_size=8, **(options or {}))
    row = {
        "task": task,
        "method": method,
        "trainable_parameters": 0,
        "file_bytes": None,
        "seconds_per_step": None,
    }
    model = lora_peer(load_causal_lm(SMOLLM2)) if method == "lora-r8" else load_causal_lm(SMOLLM2)
    if options is not None:
        model = build_causal_model(spec)
    if method != "untuned":
        result = fit_causal(
            model, tokenizer, data.train, lr=spec.lr, batch_size=8, max_length=args.max_length, quiet=True
        )
        row.update(
            trainable_parameters=trainable_parameters(model),
            seconds_per_step=result.seconds / result.steps,
            steps=result.steps,
            file_bytes=saved_bytes(method, model, spec, folder),
        )
    metrics = evaluate_causal(model, tokenizer, data.test, max_length=args.max_length)
    row.update(
        exact_match=metrics["exact_match"], heldout_loss=metrics["loss"], test_examples=metrics["examples"]
    )
    print(f"  {task} {method}: {row}", flush=True)
    return row, (folder / f"{method}.qpeft") if options is not None else None


def tokens_per_second(generate, rows: int) -> float:
    """Generated tokens per second of ``generate()`` (which returns the count), median of 3 after a warm-up."""
    generate()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        count = generate()
        times.append(count / (time.perf_counter() - start))
    return statistics.median(times)


def variants(path: Path, folder: Path, count: int) -> list[Path]:
    """``count`` different adapters: the trained one and copies with its λ scaled by 0.5 … 1.5 (same layout)."""
    model = load_adapted_model(SMOLLM2, path, trainable=True)
    paths = []
    for i in range(count):
        scale = 0.5 + i / max(count - 1, 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("spectrum.lam"):
                    p.mul_(scale)
        paths.append(write_adapter(folder / f"v{i}.qpeft", adapter_from_model(model, SMOLLM2), bits=4))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("spectrum.lam"):
                    p.div_(scale)
    return paths


def generation_rows(path: Path, folder: Path) -> list[dict]:
    """Tokens/s: merged model (batch 1 and 16) vs the bank with a per-request adapter and 16 adapters in a batch."""
    tokenizer = causal_tokenizer(SMOLLM2)
    merged = merge_adapter(load_adapted_model(SMOLLM2, path)).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": LONG_PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )

    def hf(rows: int):
        def go() -> int:
            batch = ids.repeat(rows, 1)
            out = merged.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
            return (out.shape[1] - batch.shape[1]) * rows

        return go

    bank = AdapterBank.from_pretrained(SMOLLM2)
    names = [f"a{i}" for i in range(ADAPTERS)]
    for name, file in zip(names, variants(path, folder, ADAPTERS)):
        bank.load(name, file)

    def banked(adapters: list[str]):
        def go() -> int:
            out = bank.generate([LONG_PROMPT] * len(adapters), adapter=adapters, max_new_tokens=NEW_TOKENS)
            return sum(len(g.tokens) for g in out)

        return go

    merged_1, merged_16 = tokens_per_second(hf(1), 1), tokens_per_second(hf(ADAPTERS), ADAPTERS)
    bank_1, bank_16 = tokens_per_second(banked(names[:1]), 1), tokens_per_second(banked(names), ADAPTERS)
    return [
        {"setting": "merged model (K=8 folded), batch 1", "tokens_per_second": merged_1, "vs_merged": 1.0},
        {
            "setting": "bank, one adapter per request, batch 1",
            "tokens_per_second": bank_1,
            "vs_merged": bank_1 / merged_1,
        },
        {"setting": "merged model, batch 16", "tokens_per_second": merged_16, "vs_merged": 1.0},
        {
            "setting": f"bank, {ADAPTERS} rows with {ADAPTERS} different adapters",
            "tokens_per_second": bank_16,
            "vs_merged": bank_16 / merged_16,
        },
    ]


def ratios(rows: list[dict]) -> None:
    """Add each row's file-size ratio and step-time ratio against LoRA r=8 on the same task."""
    for row in rows:
        peer = next(r for r in rows if r["task"] == row["task"] and r["method"] == "lora-r8")
        if row["file_bytes"]:
            row["lora_bytes_ratio"] = peer["file_bytes"] / row["file_bytes"]
        if row["seconds_per_step"]:
            row["step_time_vs_lora"] = row["seconds_per_step"] / peer["seconds_per_step"]


def tables(rows: list[dict], generation: list[dict]) -> str:
    """Markdown: the accuracy table and the generation table."""
    body = [
        [
            r["task"],
            r["method"],
            f"{100 * r['exact_match']:.1f}",
            f"{r['heldout_loss']:.3f}",
            f"{r['trainable_parameters']:,}",
            f"{r['file_bytes']:,}" if r["file_bytes"] else "–",
            f"{r['lora_bytes_ratio']:.0f}×" if r.get("lora_bytes_ratio") else "–",
            f"{r['seconds_per_step']:.2f}" if r["seconds_per_step"] else "–",
            f"{r['step_time_vs_lora']:.2f}" if r.get("step_time_vs_lora") else "–",
        ]
        for r in rows
    ]
    accuracy = markdown_table(
        [
            "task",
            "method",
            "exact match %",
            "held-out loss",
            "trainable",
            "file bytes",
            "LoRA file ÷",
            "s / step",
            "× LoRA",
        ],
        body,
    )
    speed = markdown_table(
        ["generation (greedy, 32 new tokens)", "tokens / s", "× merged"],
        [[g["setting"], f"{g['tokens_per_second']:.1f}", f"{g['vs_merged']:.2f}"] for g in generation],
    )
    return accuracy + "\n\n" + speed


def main() -> None:
    """Train and evaluate every (task, method), time generation, write JSON + markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["rt", "sms"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--test-examples", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, k8_path = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            folder = Path(tmp) / task
            folder.mkdir()
            for method in args.methods:
                row, path = run_method(method, task, args, folder)
                rows.append(row)
                k8_path = path if method == "qpeft-K8" and k8_path is None else k8_path
        if "lora-r8" in args.methods:
            ratios(rows)
        generation = generation_rows(k8_path, Path(tmp)) if k8_path is not None else []
    info = machine_info()
    md = (
        f"SmolLM2-135M-Instruct, instruction tasks, {args.train_examples} train / {args.test_examples} test "
        f"examples, 1 epoch, batch 8, seed 0, {args.threads} torch threads, on {info['cpu_model']}, "
        f"{info['cpu_count']} cores, load {info['load_average_1_5_15min'][0]:.1f} at the end. Peer: PEFT LoRA r=8 "
        "trained with the same loop in the same run.\n\n" + tables(rows, generation)
    )
    print(md)
    write_results(
        "llm", {"machine": info, "settings": vars(args), "rows": rows, "generation": generation}, md
    )


if __name__ == "__main__":
    main()
