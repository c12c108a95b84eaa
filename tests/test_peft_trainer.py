"""samples/peft_trainer.py: transformers.Trainer over a Quantum-PEFT adapter — adapter-only checkpoints, exact
resume, PeftModel.from_pretrained, and 2-process gloo DDP (torchrun, accelerate launch) matching one process.

Every run: MiniLM, the first 64 rt training examples, 6 optimizer steps on a global batch of 8, seed 0, no
dropout, one torch thread per process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, TrainerCallback

from qpeft_deploy.models import resolve_base
from samples.peft_trainer import build_trainer, main, parse_args

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "samples" / "peft_trainer.py"
EXAMPLES, STEPS, GLOBAL_BATCH = 64, 6, 8
COMMON = [
    "--task",
    "rt",
    "--examples",
    str(EXAMPLES),
    "--max-steps",
    str(STEPS),
    "--no-dropout",
    "--seed",
    "0",
]
HEAD_KEYS = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def steps(folder: Path) -> list[dict]:
    return json.loads((folder / "losses.json").read_text())["steps"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, batch 8, a checkpoint every 3 steps; (output folder, trained Trainer)."""
    out = tmp_path_factory.mktemp("single")
    trainer = main([*COMMON, "--per-device-batch", "8", "--save-steps", "3", "--output-dir", str(out)])
    return out, trainer


def test_checkpoints_and_the_final_folder_hold_only_the_adapter(single):
    out, trainer = single
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    for folder in (out / "checkpoint-3", out / "checkpoint-6", out):
        names = {p.name for p in folder.iterdir()}
        assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
        assert (folder / "adapter_model.safetensors").stat().st_size <= 25_000
        with safe_open(folder / "adapter_model.safetensors", "pt") as f:
            keys = set(f.keys())
        assert {k for k in keys if not k.endswith(".qpeft_delta")} == HEAD_KEYS
        assert len(keys) == 37 + 2  # 36 encoder linears + the pooler, and the head
    # The optimizer state is Adam's two moments of the trainable tensors only, nothing of the frozen base.
    moments = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)["state"].values()
    assert sum(t.numel() for m in moments for k, t in m.items() if k != "step") == 2 * trainable
    total = sum(p.stat().st_size for p in (out / "checkpoint-3").iterdir())
    assert total < 200_000, total  # ~180 KB (optimizer.pt ~118 KB); the MiniLM base is ~90 MB


def test_the_final_folder_loads_with_from_pretrained_and_reproduces_the_logits(single):
    out, trainer = single
    batch = {
        "input_ids": torch.tensor([[101, 2023, 3185, 2003, 2307, 102]]),
        "attention_mask": torch.ones(1, 6),
    }
    model = trainer.model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
        base = AutoModelForSequenceClassification.from_pretrained(resolve_base("minilm"), num_labels=2)
        loaded = PeftModel.from_pretrained(base, out).eval()
        assert (loaded(**batch).logits - trained).abs().max().item() <= 1e-6


class StopAt(TrainerCallback):
    """Ends training after step ``step``, as a preempted job would (its last checkpoint is what survives)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_resume_from_a_checkpoint_reaches_the_uninterrupted_run_exactly(single, tmp_path):
    out, _ = single
    argv = [*COMMON, "--per-device-batch", "8", "--save-steps", "3", "--output-dir", str(tmp_path)]
    interrupted = build_trainer(parse_args(argv))
    interrupted.add_callback(StopAt(3))
    interrupted.train()
    assert interrupted.state.global_step == 3 and not (tmp_path / "checkpoint-6").exists()
    main([*argv, "--resume", str(tmp_path / "checkpoint-3")])
    resumed, reference = steps(tmp_path), steps(out)
    assert [s["step"] for s in resumed if "loss" in s] == [4, 5, 6]  # steps 1-3 came from the checkpoint
    # Trainer restores the adapter, head, AdamW moments, LR schedule and RNG states, and the data order is a
    # function of (data_seed, epoch) with the first 3 batches skipped: the same float ops, bit for bit.
    assert max_diff(adapter(tmp_path), adapter(out)) == 0.0
    assert [s["loss"] for s in resumed[3:]] == [s["loss"] for s in reference[3:]]
    assert [s["examples"] for s in resumed[3:]] == [s["examples"] for s in reference[3:]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(launcher: list[str], out: Path) -> None:
    """The script on 2 CPU processes (batch 4 each: the reference's global batch of 8)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [*COMMON, "--per-device-batch", "4", "--output-dir", str(out)]
    done = subprocess.run(
        [*launcher, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def expected_batches() -> list[list[int]]:
    """The global batches Trainer draws: accelerate's SeedableRandomSampler is one torch.randperm seeded with
    data_seed (+ epoch); each rank takes every world_size-th batch of per-device size, so the batches of
    ranks 0 and 1 at a step are, together, the one-process batch of that step."""
    order = torch.randperm(EXAMPLES, generator=torch.Generator().manual_seed(0)).tolist()
    return [order[i : i + GLOBAL_BATCH] for i in range(0, STEPS * GLOBAL_BATCH, GLOBAL_BATCH)]


def assert_matches_the_single_process_run(out: Path, reference: Path) -> None:
    record = json.loads((out / "losses.json").read_text())
    assert record["world_size"] == 2 and record["global_batch"] == GLOBAL_BATCH
    ddp, single = record["steps"], steps(reference)
    assert [s["examples"] for s in ddp] == [s["examples"] for s in single] == expected_batches()
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ddp, single)) <= 1e-4
    assert max_diff(adapter(out), adapter(reference)) <= 1e-5


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(single, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run_two_processes([*launcher, "--master_addr", "127.0.0.1", "--master_port", str(free_port())], tmp_path)
    assert_matches_the_single_process_run(tmp_path, single[0])


@pytest.mark.slow
def test_accelerate_launch_two_processes_match_one_process(single, tmp_path):
    config = ROOT / "samples" / "accelerate_cpu_ddp.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    run_two_processes([*launcher, "--main_process_port", str(free_port())], tmp_path)
    assert_matches_the_single_process_run(tmp_path, single[0])
