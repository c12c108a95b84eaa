"""Pre-train the small ViT base committed as samples/vit-fmnist5 (Fashion-MNIST classes 0–4, fixed seed).

    .venv/bin/python samples/pretrain_vit.py     # writes samples/vit-fmnist5 (minutes on 2 CPU cores)

The folder holds config.json, model.safetensors (ViTForImageClassification with its own 5-class head: an
adapter's head replaces it), preprocessor_config.json (the normalisation of qpeft_deploy.data.images.pixel_values)
and pretrain.json (seed, budget, test accuracy). Tests and the demo never run this: they use the committed
folder.
Needs the data of scripts/fetch_fmnist.sh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from transformers import ViTForImageClassification

from qpeft_deploy.data.images import load_image_task, pixel_values, vit_config, write_preprocessor_config

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "vit-fmnist5"


def evaluate(model: nn.Module, examples: list, batch_size: int = 500) -> float:
    """Test accuracy."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            logits = model(pixel_values=pixel_values([x for x, _ in chunk])).logits
            correct += (logits.argmax(-1) == torch.tensor([y for _, y in chunk])).sum().item()
    return correct / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-train", type=int, default=19200, help="first N of the seeded split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_image_task("fmnist-0to4", max_train=args.max_train, seed=args.seed)
    model = ViTForImageClassification(vit_config(data.id2label))
    steps = args.epochs * math.ceil(len(data.train) / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng, step, start = random.Random(args.seed), 0, time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        order = list(data.train)
        rng.shuffle(order)
        for i in range(0, len(order), args.batch_size):
            batch = order[i : i + args.batch_size]
            logits = model(pixel_values=pixel_values([x for x, _ in batch])).logits
            loss = nn.functional.cross_entropy(logits, torch.tensor([y for _, y in batch]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0:
                print(
                    f"epoch {epoch} step {step}/{steps} loss {loss.item():.3f} "
                    f"{time.perf_counter() - start:.0f}s",
                    flush=True,
                )
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, data.test)
    print(f"test accuracy on {len(data.test)} images of classes 0-4: {accuracy:.4f} ({seconds:.0f}s)")

    tmp = args.output.with_name(args.output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    write_preprocessor_config(tmp)
    command = (
        f"python samples/pretrain_vit.py --epochs {args.epochs} --batch-size {args.batch_size} "
        f"--lr {args.lr} --max-train {args.max_train} --seed {args.seed}"
    )
    record = {
        "task": "fmnist-0to4",
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "steps": steps,
        "train_examples": len(data.train),
        "test_examples": len(data.test),
        "test_accuracy": round(accuracy, 4),
        "train_seconds": round(seconds),
        "torch": torch.__version__,
        "command": command,
    }
    (tmp / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp.iterdir():  # safetensors writes 0600; give the folder normal permissions
        path.chmod(0o666 & ~umask)
    shutil.rmtree(args.output, ignore_errors=True)
    tmp.rename(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
