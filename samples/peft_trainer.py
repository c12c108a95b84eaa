"""Fine-tune a text classifier with ``transformers.Trainer`` and a Quantum-PEFT adapter, through PEFT's own API.

The script a PEFT user writes: a ``SEQ_CLS`` model (the shipped all-MiniLM-L6-v2, or any local HF folder with
``--base``), ``get_peft_model(model, QpeftConfig(...))``, ``Trainer``. Checkpoints and the final folder hold
only the adapter (one packed vector per target plus the head: ~23 KB), which ``PeftModel.from_pretrained``
reads back onto a fresh base.

The same file runs on one process or data-parallel (docs/DISTRIBUTED.md)::

    python samples/peft_trainer.py --task rt --output-dir out
    torchrun --nproc_per_node 2 samples/peft_trainer.py --task rt --output-dir out --per-device-batch 4
    accelerate launch --config_file samples/accelerate_cpu_ddp.yaml samples/peft_trainer.py ...

The global batch is ``--per-device-batch`` × processes. Every process runs ``--threads`` torch threads (1 by
default: on CPU, processes × threads should not exceed the cores). Rank 0 writes ``<output-dir>/losses.json``:
per optimizer step the training loss and the ids of the examples in the global batch (rank 0's shard first),
so runs on different launchers can be compared step by step.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification, Trainer, TrainingArguments, set_seed

from qpeft_deploy.data.tasks import load_data
from qpeft_deploy.models import load_tokenizer, resolve_base
from qpeft_deploy.peft_native import QpeftConfig

EXAMPLE_ID = "example_id"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="minilm", help="'minilm' (shipped) or a local HF model folder")
    p.add_argument("--task", default="rt", help="rt, trec6, sms or csv:<path>")
    p.add_argument("--examples", type=int, default=None, help="train on the first N training examples")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (truncation)")
    p.add_argument("--rank", type=int, default=8, help="QpeftConfig r")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--per-device-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0, help="model head, adapter angles and data order")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--resume", default=None, help="checkpoint folder to resume from, or 'last'")
    p.add_argument("--no-dropout", action="store_true", help="dropout 0 (exact run-to-run comparisons)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--gpu", action="store_true", help="train on GPUs (NCCL when distributed); default: CPU, gloo"
    )
    p.add_argument("--output-dir", required=True, type=Path)
    return p.parse_args(argv)


def build_model(base: str, labels: list[str], rank: int, seed: int, no_dropout: bool) -> PeftModel:
    """The base's sequence classifier with a new head (seeded) wrapped in a Quantum-PEFT adapter."""
    folder = resolve_base(base)
    config = AutoConfig.from_pretrained(folder, num_labels=len(labels), id2label=dict(enumerate(labels)))
    config.label2id = {name: i for i, name in enumerate(labels)}
    if no_dropout:  # via the config: attention kernels read the probability, not an nn.Dropout module
        for key, value in config.to_dict().items():
            if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
                setattr(config, key, 0.0)
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, config=config)
    return get_peft_model(model, QpeftConfig(task_type="SEQ_CLS", r=rank, target_modules="all-linear"))


def tokenized(base: str, task: str, examples: int | None, max_length: int) -> tuple[list[dict], list[str]]:
    """The task's training examples as unpadded token lists with ``labels`` and ``example_id``; the labels."""
    data = load_data(task, max_train=examples)
    tokenizer = load_tokenizer(base)
    rows = [
        {**tokenizer(text, truncation=True, max_length=max_length), "labels": label, EXAMPLE_ID: i}
        for i, (text, label) in enumerate(data.train)
    ]
    return rows, data.labels


class RecordingTrainer(Trainer):
    """A Trainer that notes, per optimizer step, the global batch's example ids and its unrounded mean loss
    (both gathered over ranks; Trainer's own log rounds the loss to 4 decimals)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded: dict[int, dict] = {}

    def compute_loss(self, model, inputs, *args, **kwargs):
        ids = self.accelerator.gather(inputs.pop(EXAMPLE_ID))
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        mean = self.accelerator.gather(loss.detach()[None]).mean().item()  # float64 in JSON, fp32 values
        self.recorded[self.state.global_step + 1] = {"loss": mean, "examples": ids.tolist()}
        return loss


def build_trainer(args: argparse.Namespace) -> RecordingTrainer:
    """The Trainer for ``args``: adapter model, tokenized task, CPU (gloo DDP when launched on several ranks)
    unless ``--gpu``."""
    torch.set_num_threads(args.threads)
    rows, labels = tokenized(args.base, args.task, args.examples, args.max_length)
    model = build_model(args.base, labels, args.rank, args.seed, args.no_dropout)
    tokenizer = load_tokenizer(args.base)
    training = TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_batch,
        learning_rate=args.lr,
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not args.gpu,
        ddp_backend="gloo" if not args.gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable tensor is used in each step (a PeftModel gets True)
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        dataloader_drop_last=True,
        remove_unused_columns=False,  # the collator keeps example_id; compute_loss takes it out
        disable_tqdm=True,
    )
    return RecordingTrainer(
        model=model,
        args=training,
        train_dataset=rows,
        data_collator=lambda features: dict(tokenizer.pad(features, return_tensors="pt")),
    )


def step_log(trainer: RecordingTrainer) -> list[dict]:
    """Per optimizer step: Trainer's logged loss and, for the steps this run trained (not those before a
    resumed checkpoint), the unrounded loss and the global batch's example ids."""
    return [
        {"step": entry["step"], "logged_loss": entry["loss"], **trainer.recorded.get(entry["step"], {})}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]


def main(argv: list[str] | None = None) -> RecordingTrainer:
    """Train, save the adapter folder, (rank 0) write losses.json; the trained Trainer."""
    args = parse_args(argv)
    trainer = build_trainer(args)
    resume = True if args.resume == "last" else args.resume
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(args.output_dir))
    if trainer.is_world_process_zero():
        record = {
            "world_size": trainer.args.world_size,
            "global_batch": trainer.args.per_device_train_batch_size * trainer.args.world_size,
            "steps": step_log(trainer),
        }
        (args.output_dir / "losses.json").write_text(json.dumps(record, indent=1))
    return trainer


if __name__ == "__main__":
    main()
