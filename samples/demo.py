"""End-to-end demo: train a Quantum-PEFT adapter on the shipped MiniLM with Rotten Tomatoes reviews.

Prints accuracy against the head-only baseline trained on the same budget, the trainable parameters, and what
LoRA r=8 would need on the same targets. Artefacts go to ./demo-out/. Full-budget numbers: benchmarks/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qpeft_deploy.adapter_file import save_adapter
from qpeft_deploy.train import TrainSpec, run_spec


def main() -> None:
    """Run the demo and print one table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    args.out.mkdir(exist_ok=True)

    spec = TrainSpec(task="rt", rank=8, layers=1, epochs=args.epochs, max_examples=args.train_examples,
                     max_test=args.test_examples, max_length=64)
    print(f"Training a Quantum-PEFT adapter (all-linear, K=8, L=1) on {args.train_examples} RT reviews ...")
    model, adapter = run_spec(spec, adapter=True, quiet=args.quiet)
    path = save_adapter(model, args.out / "rt.qpeft", bits=8, lambda_dtype="fp16", base=spec.base)
    print("Training the head-only baseline on the same budget ...")
    _, head_only = run_spec(spec, adapter=False, quiet=args.quiet)

    rows = [
        ("head-only", head_only["trainable_parameters"], head_only["test_accuracy"], "-"),
        ("Quantum-PEFT K=8", adapter["trainable_parameters"], adapter["test_accuracy"],
         f"{path.stat().st_size:,} B ({path})"),
        ("LoRA r=8 (same targets, + head)", adapter["lora_r8_parameters"] + head_only["trainable_parameters"],
         None, "-"),
    ]
    print(f"\n{'method':34} {'trainable':>10} {'accuracy':>9}  file")
    for name, params, accuracy, file in rows:
        acc = f"{accuracy:.3f}" if accuracy is not None else "n/a"
        print(f"{name:34} {params:>10,} {acc:>9}  {file}")
    print(f"\nTest set: {adapter['test_examples']} RT reviews. Full-budget study: python -m benchmarks.circuit")


if __name__ == "__main__":
    main()
