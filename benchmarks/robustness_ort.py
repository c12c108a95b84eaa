"""Reliability of the onnxruntime adapter session under concurrency: runs racing adapter reloads.

One OrtAdapterSession over a swappable MiniLM export (factors, all 37 linear layers, K = 8) serves ``--threads``
threads × ``--runs`` runs at 1×16 tokens while another thread reloads its adapter slots continually, from
.onnx_adapter and .qpeft files in turn. Each slot alternates between two adapters (2- and 6-label heads), so a
run must return exactly one of its slot's two single-threaded reference outputs (or the exported default's, for
a run naming no adapter). Counted: false errors (any exception in a run or a reload), mismatches beyond
``--tolerance`` against every allowed reference, and which adapter each run saw (both halves of every slot show
that reloads landed between runs).

    python -m benchmarks.robustness_ort [--threads 8] [--runs 1000]
writes benchmarks/results/robustness_ort.json and benchmarks/results/robustness_ort.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.common import machine_info, markdown_table, write_results
from qpeft_deploy.core.attach import adapted_layers, attach
from qpeft_deploy.export.onnx.export import export_onnx, export_onnx_adapter
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.io.onnx_adapter import MODEL_FILE
from qpeft_deploy.models import load_task_model
from qpeft_deploy.runtime.ort_session import OrtAdapterSession

TWO = {0: "rotten", 1: "fresh"}
SIX = {i: name for i, name in enumerate(["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])}
SLOTS = {"s0": ("a0", "a1"), "s1": ("a2", "a3")}  # slot name -> the two adapters it alternates between
DEFAULT_EVERY = 10  # every 10th run of a thread names no adapter (the exported default)


def random_adapter(path: Path, labels: dict[int, str], seed: int) -> Path:
    """An all-linear K=8 adapter with random λ and head (distinct outputs per seed)."""
    model = load_task_model("minilm", labels, seed=seed)
    attach(model, rank=8, seed=seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.spectrum.lam.normal_(0, 0.3)
        model.classifier.weight.normal_(0, 0.3)
    return save_adapter(model, path, base="minilm")


def build(folder: Path) -> tuple[Path, dict[str, list[Path]]]:
    """The swappable export (of a0) and each adapter's two files (.onnx_adapter, .qpeft)."""
    files = {}
    for i, labels in enumerate((TWO, SIX, TWO, SIX)):
        qpeft = random_adapter(folder / f"a{i}.qpeft", labels, seed=i)
        export_onnx_adapter(qpeft, folder / f"a{i}.onnx_adapter")
        files[f"a{i}"] = [folder / f"a{i}.onnx_adapter", qpeft]
    export_onnx("minilm", files["a0"][1], folder / "model", mode="swappable", quiet=True)
    return folder / "model" / MODEL_FILE, files


def tokens(length: int = 16) -> dict[str, np.ndarray]:
    """One row of ``length`` fixed token ids."""
    ids = np.random.default_rng(length).integers(1000, 20000, (1, length))
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}


def references(session: OrtAdapterSession, files: dict[str, list[Path]], feeds: dict) -> dict:
    """Single-threaded outputs per adapter (both of its files must agree) and of the exported default."""
    refs: dict[str | None, np.ndarray] = {None: session(feeds, adapter=None)}
    for name, paths in files.items():
        outs = []
        for path in paths:
            session.load(name, path)
            outs.append(session(feeds, adapter=name))
        assert float(np.abs(outs[0] - outs[1]).max()) <= 1e-5, f"{name}: its two files disagree"
        refs[name] = outs[0]
    return refs


def closest(out: np.ndarray, refs: dict, allowed: tuple) -> tuple[str | None, float]:
    """The allowed reference nearest to ``out`` and the max abs difference to it."""
    diffs = {
        a: float(np.abs(out - refs[a]).max()) if out.shape == refs[a].shape else float("inf") for a in allowed
    }
    best = min(diffs, key=diffs.get)
    return best, diffs[best]


def worker(session, feeds, refs, runs: int, tolerance: float, thread: int) -> dict:
    """``runs`` runs over the slots (and the default); counts of errors, mismatches and adapters seen."""
    seen, errors, mismatches, worst = Counter(), [], 0, 0.0
    for i in range(runs):
        slot = None if i % DEFAULT_EVERY == 0 else list(SLOTS)[(thread + i) % len(SLOTS)]
        allowed = (None,) if slot is None else SLOTS[slot]
        try:
            out = session(feeds, adapter=slot)
        except Exception as e:  # noqa: BLE001 (any exception is a false error: every file is valid)
            errors.append(f"{type(e).__name__}: {e}"[:200])
            continue
        best, diff = closest(out, refs, allowed)
        seen[f"{slot}:{best}"] += 1
        worst = max(worst, diff)
        mismatches += diff > tolerance
    return {"seen": seen, "errors": errors, "mismatches": mismatches, "max_abs_diff": worst}


def reloader(session, files, stop: threading.Event) -> dict:
    """Reload the slots until ``stop``: each reload names the next slot, the next adapter of its pair and the
    next file format."""
    counts, errors = Counter(), []
    for n in itertools.count():
        if stop.is_set():
            break
        slot = list(SLOTS)[n % len(SLOTS)]
        adapter = SLOTS[slot][(n // len(SLOTS)) % 2]
        path = files[adapter][(n // (2 * len(SLOTS))) % 2]
        try:
            session.load(slot, path)
            counts[path.suffix] += 1
        except Exception as e:  # noqa: BLE001 (counted, as above)
            errors.append(f"{type(e).__name__}: {e}"[:200])
    return {"reloads": counts, "errors": errors}


def stress(session, files, feeds, refs, threads: int, runs: int, tolerance: float) -> dict:
    """``threads`` workers and one reloader on ``session``; the merged counts and the wall time."""
    for slot, (first, _) in SLOTS.items():
        session.load(slot, files[first][0])
    stop, start = threading.Event(), time.perf_counter()
    with ThreadPoolExecutor(threads + 1) as pool:
        reloads = pool.submit(reloader, session, files, stop)
        jobs = [pool.submit(worker, session, feeds, refs, runs, tolerance, t) for t in range(threads)]
        results = [job.result() for job in jobs]
        stop.set()
        reload_result = reloads.result()
    seen = sum((r["seen"] for r in results), Counter())
    return {
        "wall_s": time.perf_counter() - start,
        "runs": threads * runs,
        "run_errors": [e for r in results for e in r["errors"]],
        "reload_errors": reload_result["errors"],
        "reloads": dict(reload_result["reloads"]),
        "mismatches": sum(r["mismatches"] for r in results),
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "seen": dict(sorted(seen.items(), key=lambda kv: str(kv[0]))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--runs", type=int, default=1000, help="runs per thread")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        model, files = build(Path(tmp))
        session = OrtAdapterSession(model, threads=1)
        feeds = tokens()
        refs = references(session, files, feeds)
        result = stress(session, files, feeds, refs, args.threads, args.runs, args.tolerance)
    errors = len(result["run_errors"]) + len(result["reload_errors"])
    rows = [
        ["worker threads × runs", f"{args.threads} × {args.runs}"],
        ["input", "1×16 tokens, one intra-op thread per run"],
        [
            "reloads (.onnx_adapter / .qpeft)",
            f"{result['reloads'].get('.onnx_adapter', 0)} / {result['reloads'].get('.qpeft', 0)}",
        ],
        ["false errors (runs + reloads)", errors],
        [f"mismatches > {args.tolerance:g}", result["mismatches"]],
        ["max abs diff vs single-threaded", result["max_abs_diff"]],
        ["runs per slot:adapter seen", ", ".join(f"{k} {v}" for k, v in result["seen"].items())],
        ["wall s", result["wall_s"]],
        ["load average before / after (1 min)", f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f}"],
    ]
    table = markdown_table(["OrtAdapterSession under concurrent reloads", "value"], rows)
    print(table)
    write_results(
        "robustness_ort",
        {
            "machine": machine_info(),
            "onnxruntime_version": ort.__version__,
            "load_average_before": load_before,
            "threads": args.threads,
            "runs_per_thread": args.runs,
            "ort_intra_op_threads": 1,
            "input": "1x16 tokens",
            "tolerance": args.tolerance,
            "false_errors": errors,
            **result,
        },
        table,
    )


if __name__ == "__main__":
    main()
