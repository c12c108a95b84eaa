"""LLM demo on the shipped SmolLM2-135M-Instruct: two task adapters, one base, per-request adapters.

1. trains a Quantum-PEFT adapter (K = 8, all-linear, 4-bit angles trained quantisation-aware) on each of two
   instruction tasks (SMS spam: "spam" / "ham"; Rotten Tomatoes: "positive" / "negative"), the loss on the answer
   tokens only, and writes each as a .qpeft file;
2. trains PEFT LoRA r=8 with the same loop, examples and seed on the first task (the peer);
3. serves both adapters from ONE base (``AdapterBank``): one batch whose rows use different adapters (and one row
   the untuned base), generated together with one forward per token;
4. prints one table: exact-match accuracy, held-out answer loss, trainable parameters, file bytes and seconds per
   training step of each, against the untuned model.
Artefacts go to ./demo-out/llm/. The budget is small (minutes on 2 CPU cores); ``python -m benchmarks.llm``
measures more (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qpeft_deploy.data.instructions import load_instructions
from qpeft_deploy.models import SMOLLM2, load_causal_lm, lora_peer
from qpeft_deploy.runtime import AdapterBank
from qpeft_deploy.training.causal import causal_tokenizer, evaluate_causal, fit_causal, train_causal_adapter
from qpeft_deploy.training.train import TrainSpec

TASKS = ("sms", "rt")
LR = 5e-2  # angles and λ: a few dozen steps on a causal LM learn faster at 5e-2 than at the CLI's 2e-2


def spec(task: str, args: argparse.Namespace) -> TrainSpec:
    """The Quantum-PEFT run of one task."""
    return TrainSpec(
        base=SMOLLM2,
        task=task,
        rank=8,
        bits=4,
        lr=LR,
        epochs=1,
        batch_size=8,
        max_examples=args.train_examples,
        max_test=args.test_examples,
        max_length=args.max_length,
        threads=args.threads,
    )


def train_adapters(args: argparse.Namespace) -> list[dict]:
    """One Quantum-PEFT adapter per task, saved as a .qpeft file; their reports."""
    rows = []
    for task in TASKS:
        print(f"\n[{task}] training a Quantum-PEFT adapter on SmolLM2 (K=8, all-linear, 4-bit angles) ...")
        report = train_causal_adapter(
            spec(task, args), args.out / f"{task}.qpeft", quiet=args.quiet, overwrite=True
        )
        rows.append({**report, "method": "Q-PEFT K=8"})
    return rows


def lora_and_untuned(args: argparse.Namespace) -> list[dict]:
    """PEFT LoRA r=8 trained with the same loop on the first task, and the untuned model on every task."""
    tokenizer, task = causal_tokenizer(SMOLLM2), TASKS[0]
    data = load_instructions(task, max_train=args.train_examples, max_test=args.test_examples, seed=0)
    print(f"\n[{task}] training PEFT LoRA r=8 with the same loop (the peer) ...")
    torch.set_num_threads(args.threads)
    model = lora_peer(load_causal_lm(SMOLLM2))
    result = fit_causal(
        model, tokenizer, data.train, batch_size=8, max_length=args.max_length, quiet=args.quiet
    )
    model.save_pretrained(args.out / "lora-r8")
    metrics = evaluate_causal(model, tokenizer, data.test, max_length=args.max_length)
    rows = [
        {
            "method": "PEFT LoRA r=8",
            "task": task,
            "test_exact_match": metrics["exact_match"],
            "test_loss": metrics["loss"],
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "file_bytes": (args.out / "lora-r8" / "adapter_model.safetensors").stat().st_size,
            "seconds_per_step": result.seconds / result.steps,
        }
    ]
    untuned = load_causal_lm(SMOLLM2)
    for name in TASKS:
        test = load_instructions(name, max_test=args.test_examples, seed=0).test
        metrics = evaluate_causal(untuned, tokenizer, test, max_length=args.max_length)
        rows.append(
            {
                "method": "untuned",
                "task": name,
                "test_exact_match": metrics["exact_match"],
                "test_loss": metrics["loss"],
            }
        )
    return rows


def serve_both(args: argparse.Namespace) -> None:
    """Both adapters in one bank; one mixed batch: each row its own adapter (the last row the untuned base)."""
    bank = AdapterBank.from_pretrained(SMOLLM2)
    for task in TASKS:
        bank.load(task, args.out / f"{task}.qpeft")
    rows = [(task, pair) for task in TASKS for pair in load_instructions(task, max_test=2, seed=0).test]
    prompts = [prompt for _, (prompt, _) in rows] + [rows[0][1][0]]
    adapters = [task for task, _ in rows] + [None]
    print(
        f"\none base, {len(TASKS)} adapters, one batch of {len(prompts)} rows (one forward per token for all):"
    )
    for generation, prompt, (task, (_, reference)) in zip(
        bank.generate(prompts, adapter=adapters, max_new_tokens=8), prompts, rows + [(None, (None, "-"))]
    ):
        question = prompt.splitlines()[-1][:60]
        print(
            f"  [{generation.adapter or 'base'}] {question!r} -> {generation.text.strip()!r} (reference {reference})"
        )


def table(rows: list[dict]) -> str:
    """The final comparison table."""
    lines = [
        "| task | method | exact match | held-out loss | trainable | file bytes | s / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["task"], r["method"])):
        trainable = f"{r['trainable_parameters']:,}" if r.get("trainable_parameters") else "-"
        size = f"{r['file_bytes']:,}" if r.get("file_bytes") else "-"
        step = f"{r['seconds_per_step']:.2f}" if r.get("seconds_per_step") else "-"
        lines.append(
            f"| {r['task']} | {r['method']} | {100 * r['test_exact_match']:.1f}% | {r['test_loss']:.3f} | "
            f"{trainable} | {size} | {step} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Train, compare, serve, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out") / "llm")
    parser.add_argument("--train-examples", type=int, default=96)
    parser.add_argument("--test-examples", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)  # a rerun replaces its own files
    rows = train_adapters(args) + lora_and_untuned(args)
    serve_both(args)
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
