"""SIGKILL at random moments across every writing command: inputs stay byte-identical, the output is the
previous one or the new one complete (a fallback backup counts when the next run restores it), and the next
complete run of the command leaves no temporary file or folder behind.

Run from the repository root: ``python -m benchmarks.robustness_kills [--kills-per-command 25]``. Inputs are
small (a tiny random BERT base with MiniLM's tokenizer, two rank-2 adapters) so that one run fits in minutes;
every other kill lands uniformly in [0, 0.98·T] of the command's clean duration T (Python's start-up
included), the others uniformly in [0, 1.5·W] after the run's own temporary appeared (W: how long the temporary
lived in a clean run, from its creation to the rename that publishes it; the last third of that span covers
publishing, removing the replaced output and exiting).
``merge --overwrite`` runs half its kills on the two-rename fallback (renameat2 disabled), as on systems
without it. Writes benchmarks/results/robustness_kills.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import machine_info, markdown_table, write_results

QPEFT = [sys.executable, "-m", "qpeft_deploy.cli.main"]
FALLBACK = [
    sys.executable,
    "-c",
    (
        "import sys, qpeft_deploy.atomic as a; a._renameat2 = None; sys.argv[0] = 'qpeft'; "
        "from qpeft_deploy.cli.main import main; main()"
    ),
]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WRITE_MARKS = (".qpeft-tmp-", ".qpeft-old-")  # the new output being written, the replaced one
TEMP_MARKS = (*WRITE_MARKS, ".qpeft-probe-")


def content(file: Path) -> bytes:
    """A file's bytes; for a .qpeft file its header with sorted keys, then its data (safetensors writes the
    metadata keys in a random order, so equal adapters differ in bytes)."""
    if file.suffix != ".qpeft":
        return file.read_bytes()
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True).encode() + data[8 + length :]


def digest(path: Path, name: str | None = None) -> str:
    """sha256 over a file, or over the relative names and contents of every file in a folder (named as
    ``name`` would be, for a copy elsewhere)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        relative = Path(name or path.name) / f.relative_to(path) if f != path else Path(name or path.name)
        h.update(str(relative).encode() + b"\0" + content(f))
    return h.hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of ours in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if any(mark in p.name for mark in TEMP_MARKS))


def qpeft(*args: object, fallback: bool = False) -> subprocess.Popen:
    command = (FALLBACK if fallback else QPEFT) + [str(a) for a in args]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def own_temp(folder: Path, pid: int) -> bool:
    """Whether the run with ``pid`` is writing its output in ``folder`` (the temporary's name carries the pid)."""
    try:
        return any(f"-{pid}-" in name and any(m in name for m in WRITE_MARKS) for name in os.listdir(folder))
    except FileNotFoundError:
        return False


def wait_for(process: subprocess.Popen, folder: Path, present: bool, timeout: float = 600) -> float | None:
    """Poll until ``process``'s temporary in ``folder`` is there (``present``) or gone again; the time that took
    (None: the process ended first)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout and process.poll() is None:
        if own_temp(folder, process.pid) == present:
            return time.perf_counter() - start
        time.sleep(0.0002)
    return None


def run_ok(*args: object, folder: Path) -> tuple[float, float]:
    """Run a command to completion: its wall time, and how long its temporary existed (filling until the
    rename that publishes it; 0 where it was too short to see)."""
    start = time.perf_counter()
    process = qpeft(*args)
    appeared = wait_for(process, folder, present=True)
    lasted = wait_for(process, folder, present=False) if appeared is not None else None
    _, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"qpeft {' '.join(map(str, args))} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - start, lasted or 0.0


def make_inputs(work: Path) -> dict[str, Path]:
    """A tiny random BERT base (MiniLM's tokenizer), two adapters on it, and a merged checkpoint."""
    import torch
    from transformers import BertConfig, BertModel

    from qpeft_deploy.core.attach import adapted_layers, attach
    from qpeft_deploy.io.model_io import save_adapter
    from qpeft_deploy.models import load_task_model, resolve_base

    base = work / "inputs" / "base"
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=30522
    )
    BertModel(config).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (resolve_base("minilm") / name).is_file():
            shutil.copy(resolve_base("minilm") / name, base / name)
    paths = {"base": base}
    for name, seed in (("a", 1), ("b", 2)):
        model = attach(
            load_task_model(str(base), {0: "neg", 1: "pos"}, seed=seed), ["query", "value"], rank=2
        )
        with torch.no_grad():
            for layer in adapted_layers(model).values():
                layer.spectrum.lam.normal_(0, 0.5)
        paths[name] = save_adapter(model, work / "inputs" / f"{name}.qpeft", base=str(base))
    paths["merged"] = work / "inputs" / "merged"
    run_ok(
        "merge",
        "--base",
        base,
        "--adapter",
        paths["a"],
        "-o",
        paths["merged"],
        "--quiet",
        folder=work / "inputs",
    )
    return paths


@dataclass
class Command:
    """One writing command under test: its arguments, and those of a different previous output (replace)."""

    name: str
    output: str
    args: list[str]
    previous: list[str] | None = None  # writes a different output first; the killed runs then --overwrite
    fallback_share: float = 0.0
    counts: dict = field(default_factory=dict)


def commands(p: dict[str, Path]) -> list[Command]:
    b, a, a2, m = str(p["base"]), str(p["a"]), str(p["b"]), str(p["merged"])
    return [
        Command(
            "pack --overwrite",
            "a.qpeft",
            ["pack", a, "--bits", "4", "--overwrite"],
            ["pack", a, "--bits", "8"],
        ),
        Command("merge", "merged", ["merge", "--base", b, "--adapter", a, "--quiet"]),
        Command(
            "merge (sharded)",
            "merged",
            ["merge", "--base", b, "--adapter", a, "--max-shard-size", "1MB", "--quiet"],
        ),
        Command(
            "merge --overwrite",
            "merged",
            ["merge", "--base", b, "--adapter", a, "--overwrite", "--quiet"],
            ["merge", "--base", b, "--adapter", a, "--weight", "0.5", "--quiet"],
            fallback_share=0.5,
        ),
        Command("unmerge", "base", ["unmerge", "--merged", m, "--adapter", a, "--quiet"]),
        Command(
            "export onnx --overwrite",
            "onnx",
            [
                "export",
                "onnx",
                "--base",
                b,
                "--adapter",
                a,
                "--check-examples",
                "4",
                "--overwrite",
                "--quiet",
            ],
            ["export", "onnx", "--base", b, "--adapter", a2, "--check-examples", "4", "--quiet"],
        ),
        Command(
            "export onnx-adapter --overwrite",
            "a.onnx_adapter",
            ["export", "onnx-adapter", a, "--overwrite"],
            ["export", "onnx-adapter", a2],
        ),
        Command(
            "export lora --overwrite",
            "peft",
            ["export", "lora", a, "--base", b, "--overwrite", "--quiet"],
            ["export", "lora", a2, "--base", b, "--quiet"],
        ),
    ]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _state(out: Path, valid: set[str]) -> str:
    """What a kill left: 'complete' (old or new), 'absent', 'backup' (fallback window: restored next run),
    or 'BROKEN'."""
    if out.exists():
        return "complete" if digest(out) in valid else "BROKEN"
    backups = [
        p for p in out.parent.iterdir() if ".qpeft-old-" in p.name and p.name.startswith(f".{out.name}.")
    ]
    if backups:
        return "backup" if all(digest(b, out.name) in valid for b in backups) else "BROKEN"
    return "absent"


def series(command: Command, folder: Path, inputs: dict[str, Path], kills: int, rng: random.Random) -> dict:
    """Kill ``kills`` runs of one command at random moments; check after each and after the next full run."""
    folder.mkdir()
    out = folder / command.output
    new_out = folder.parent / f"{folder.name}-reference" / command.output
    new_out.parent.mkdir()
    duration, write = run_ok(*command.args, "-o", new_out, folder=new_out.parent)
    valid = {digest(new_out, out.name)}
    if command.previous is not None:
        run_ok(*command.previous, "-o", out, folder=folder)
        valid.add(digest(out))
    before = {name: digest(path) for name, path in inputs.items()}
    counts = {"kills": 0, "finished_first": 0, "complete": 0, "absent": 0, "backup": 0, "BROKEN": 0}
    counts |= {"inputs_changed": 0, "max_leftovers_after_a_kill": 0, "fallback_kills": 0, "kills_in_write": 0}
    while counts["kills"] < kills:
        fallback, in_write = rng.random() < command.fallback_share, counts["kills"] % 2 == 1
        process = qpeft(*command.args, "-o", out, fallback=fallback)
        if in_write:  # after this run's temporary appeared: filling, publishing, removing the old, exiting
            wait_for(process, folder, present=True)
        try:
            process.wait(timeout=rng.uniform(0, 1.5 * write if in_write else 0.98 * duration))
            counts["finished_first"] += 1
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            counts["kills"] += 1
            counts["fallback_kills"] += fallback
            counts["kills_in_write"] += in_write
        process.stderr.close()
        counts[_state(out, valid)] += 1
        counts["max_leftovers_after_a_kill"] = max(
            counts["max_leftovers_after_a_kill"], len(leftovers(folder))
        )
        counts["inputs_changed"] += {name: digest(path) for name, path in inputs.items()} != before
        if command.previous is None and out.exists():
            _remove(out)  # a fresh output next time (leftovers stay for the next runs to clean)
    run_ok(*command.args, "-o", out, folder=folder)
    counts["next_run_output_ok"] = digest(out) in valid
    counts["leftovers_after_next_run"] = len(leftovers(folder))
    counts["clean_seconds"], counts["temporary_seconds"] = round(duration, 2), round(write, 4)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills-per-command", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng, start = random.Random(args.seed), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qpeft-kills-") as tmp:
        work = Path(tmp)
        inputs = make_inputs(work)
        results = {}
        for i, command in enumerate(commands(inputs)):
            results[command.name] = series(command, work / f"c{i}", inputs, args.kills_per_command, rng)
            print(command.name, results[command.name], flush=True)
    total = {key: sum(r[key] for r in results.values()) for key in ("kills", "BROKEN", "inputs_changed")}
    total["leftovers_after_next_run"] = sum(r["leftovers_after_next_run"] for r in results.values())
    total["next_run_output_ok"] = all(r["next_run_output_ok"] for r in results.values())
    data = {
        "machine": machine_info(),
        "seconds": round(time.perf_counter() - start, 1),
        "kills_per_command": args.kills_per_command,
        "seed": args.seed,
        "total": total,
        "commands": results,
    }
    headers = ["command", "kills", "of them in the write", "finished first", "complete after kill", "absent",
               "fallback backup", "broken", "inputs changed", "max leftovers after a kill",
               "leftovers after next run", "next run ok", "clean run s", "temporary lived s"]  # fmt: skip
    rows = [
        [
            name,
            r["kills"],
            r["kills_in_write"],
            r["finished_first"],
            r["complete"],
            r["absent"],
            r["backup"],
            r["BROKEN"],
            r["inputs_changed"],
            r["max_leftovers_after_a_kill"],
            r["leftovers_after_next_run"],
            r["next_run_output_ok"],
            r["clean_seconds"],
            r["temporary_seconds"],
        ]
        for name, r in results.items()
    ]
    load = data["machine"]["load_average_1_5_15min"]
    text = (
        "## Robustness: SIGKILL at random moments\n\n"
        f"{total['kills']} SIGKILLs across {len(results)} writing commands in {data['seconds']:.0f} s "
        f"({data['machine']['cpu_model']}, {data['machine']['cpu_count']} cores, load {load}): "
        f"{total['BROKEN']} broken outputs, {total['inputs_changed']} changed inputs, "
        f"{total['leftovers_after_next_run']} leftovers after the next run.\n\n"
        + markdown_table(headers, rows)
    )
    write_results("robustness_kills", data, text)
    print(text)


if __name__ == "__main__":
    main()
