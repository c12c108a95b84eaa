"""Accuracy per byte, tuned: every method's learning rates chosen on a validation split, on RT, TREC-6, SMS and the ViT task.

The runs are those of :mod:`benchmarks.accuracy` (same ``fit`` loop, models, file sizes and run cache; the ViT
task ``fmnist-5to9`` adapts the committed ``samples/vit-fmnist5``), at a larger budget and in three phases, each
resumable run by run and sharded over ``--workers``:

  1 head   head-only at each rate of ``HEAD_GRID`` (seed 0). Per task, the rate with the best validation
           accuracy is the head rate of every method (a fresh head trains at the rate that suits its task).
  2 sweep  every other method at each rate of its grid (``GRIDS``: Quantum-PEFT's angles and λ, LoRA's A and
           B), the head at phase 1's pick, seed 0.
  3 seeds  every method at its pick for every seed (seed 0 is the sweep's run).

Picks use validation accuracy only: ``validation_examples`` are held out of the training split and never
trained on; the test split is scored for the report alone. Per task the report gives LoRA r=8's spread over
seeds (goal: sample std ≤ 2 points, the budget is large enough to compare methods) and the smallest shipped
.qpeft whose mean accuracy (of the file itself, loaded onto a fresh base) is within 1 point of LoRA r=8's,
with its size ratio to LoRA's fp32 adapter_model.safetensors (goal: ≥ 100×).

    python -m benchmarks.accuracy_tuned --workers 2     # the study (≈ 2.5 h on 2 idle cores), resumable
    python -m benchmarks.accuracy_tuned --tasks sms --seeds 0   # a part of it
    python -m benchmarks.accuracy_tuned --smoke         # tiny CI version, written as accuracy_tuned_smoke.*
writes benchmarks/results/<name>.json, <name>.md and the run cache <name>_runs/.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # as in benchmarks.accuracy: idle OpenMP threads sleep on a shared machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.accuracy import (
    METHODS,
    PEER,
    Study,
    aggregate,
    cache_path,
    parse_args,
    publish,
    run_config,
    run_grid,
    run_workers,
    table,
)
from benchmarks.common import machine_info, markdown_table

HEAD_GRID = (5e-3, 2e-2, 5e-2)
GRIDS = {"qpeft": (1e-2, 2e-2, 5e-2), "lora": (3e-4, 1e-3, 3e-3), "full": (3e-5, 1e-4, 3e-4)}
SPREAD_POINTS = 2.0  # LoRA r=8's std over seeds that makes the budget trustworthy
GOAL_POINTS = 1.0  # within 1 point of LoRA r=8
GOAL_BYTES_RATIO = 100.0  # ≥ 100× smaller than LoRA r=8's fp32 adapter_model.safetensors
TUNED = {
    "tasks": ["rt", "trec6", "sms", "fmnist-5to9"],
    "methods": [
        "head-only",
        "lora-r8",
        "lora-r2",
        "qpeft-K8-L1",
        "qpeft-full-L1-a6l3",
        "qpeft-full-L1-a6l3h8",
    ],
    "seeds": [0, 1, 2],
    "train_examples": 2000,
    "validation_examples": 500,
    "test_examples": 1000,
    "epochs": 2,
    "max_length": 64,
}
SMOKE = {
    "tasks": ["rt"],
    "methods": ["head-only", "lora-r8", "qpeft-full-L1-a6l3h8"],
    "seeds": [0, 1],
    "train_examples": 32,
    "validation_examples": 16,
    "test_examples": 16,
    "epochs": 1,
    "max_length": 32,
}
STUDY = Study("benchmarks.accuracy_tuned", "accuracy_tuned", TUNED, SMOKE, __doc__.splitlines()[0])
Picks = dict[tuple[str, str], tuple[float, float]]  # (task, method) -> (own rate, head rate)


def _validation(cache_dir: Path, config: dict) -> float:
    """Validation accuracy of a finished run (its phase has run to the end before the next one asks)."""
    return json.loads(cache_path(cache_dir, config).read_text())["validation_accuracy"]


def _best(cache_dir: Path, configs: list[dict]) -> dict:
    """The config with the best validation accuracy (the first, i.e. the lowest rate, on a tie)."""
    return max(configs, key=lambda c: _validation(cache_dir, c))


def head_configs(settings: dict, cache_dir: Path) -> list[dict]:
    """Phase 1: head-only at every head rate, seed 0."""
    head = METHODS["head-only"]
    return [
        run_config(head, task, 0, settings, (0.0, rate)) for task in settings["tasks"] for rate in HEAD_GRID
    ]


def head_picks(settings: dict, cache_dir: Path) -> dict[str, float]:
    """Per task, the head rate phase 1 picked."""
    configs = head_configs(settings, cache_dir)
    return {
        task: _best(cache_dir, [c for c in configs if c["task"] == task])["head_lr"]
        for task in settings["tasks"]
    }


def _swept(settings: dict) -> list[str]:
    return [m for m in settings["methods"] if METHODS[m].kind != "head"]


def sweep_configs(settings: dict, cache_dir: Path) -> list[dict]:
    """Phase 2: every other method at every rate of its grid, the head at its task's pick, seed 0."""
    heads = head_picks(settings, cache_dir)
    return [
        run_config(METHODS[m], task, 0, settings, (rate, heads[task]))
        for task in settings["tasks"]
        for m in _swept(settings)
        for rate in GRIDS[METHODS[m].kind]
    ]


def picks(settings: dict, cache_dir: Path) -> Picks:
    """(own rate, head rate) of every (task, method) after phases 1 and 2."""
    heads = head_picks(settings, cache_dir)
    chosen: Picks = {(task, "head-only"): (0.0, heads[task]) for task in settings["tasks"]}
    sweep = sweep_configs(settings, cache_dir)
    for task in settings["tasks"]:
        for m in _swept(settings):
            best = _best(cache_dir, [c for c in sweep if c["task"] == task and c["method"]["name"] == m])
            chosen[task, m] = (best["lr"], best["head_lr"])
    return chosen


def seed_configs(settings: dict, cache_dir: Path) -> list[dict]:
    """Phase 3: every method at its pick, every seed."""
    chosen = picks(settings, cache_dir)
    return [
        run_config(METHODS[m], task, seed, settings, chosen[task, m])
        for task in settings["tasks"]
        for m in settings["methods"]
        for seed in settings["seeds"]
    ]


PHASES: dict[str, Callable[[dict, Path], list[dict]]] = {
    "head": head_configs,
    "sweep": sweep_configs,
    "seeds": seed_configs,
}


def _validation_table(settings: dict, cache_dir: Path, chosen: Picks) -> list[dict]:
    """Per (task, method): the validation accuracy of every rate tried and the pick."""
    rows = []
    for config in head_configs(settings, cache_dir) + sweep_configs(settings, cache_dir):
        own = config["method"]["kind"] != "head"
        rate = config["lr"] if own else config["head_lr"]
        picked = chosen[config["task"], config["method"]["name"]][0 if own else 1] == rate
        rows.append(
            {
                "task": config["task"],
                "method": config["method"]["name"],
                "rate": rate,
                "varied": "own" if own else "head",
                "validation_accuracy": _validation(cache_dir, config),
                "picked": picked,
            }
        )
    return rows


def goals(cells: list[dict], tasks: list[str]) -> dict[str, dict]:
    """Per task: LoRA r=8's spread, and the smallest shipped .qpeft within 1 point of LoRA r=8 (bytes, ratio)."""
    out = {}
    for task in tasks:
        here = [c for c in cells if c["task"] == task]
        peer = next((c for c in here if c["method"] == PEER), None)
        if peer is None:
            out[task] = {"judged": False, "reason": "LoRA r=8 was not run"}
            continue
        lora_bytes, spread = peer["file_bytes"]["fp32"], peer["accuracy_std"]
        shipped = [
            (c["file_bytes"]["compact"], c["compact_file_accuracy_mean"], c["method"])
            for c in here
            if c["kind"] == "qpeft"
        ]
        close = [s for s in shipped if s[1] >= peer["accuracy_mean"] - GOAL_POINTS / 100]
        smallest = min(close, default=None)
        out[task] = {
            "judged": True,
            "lora_r8_accuracy": peer["accuracy_mean"],
            "lora_r8_spread_points": None if spread is None else 100 * spread,
            "spread_met": None if spread is None else 100 * spread <= SPREAD_POINTS,
            "lora_r8_bytes": lora_bytes,
            "smallest_within_1_point": None
            if smallest is None
            else {
                "method": smallest[2],
                "bytes": smallest[0],
                "accuracy": smallest[1],
                "ratio": lora_bytes / smallest[0],
            },
            "met": smallest is not None and lora_bytes / smallest[0] >= GOAL_BYTES_RATIO,
            "qpeft_files": [
                {
                    "method": m,
                    "bytes": b,
                    "accuracy": a,
                    "ratio": lora_bytes / b,
                    "gap_points": 100 * (a - peer["accuracy_mean"]),
                }
                for b, a, m in sorted(shipped)
            ],
        }
    return out


def reproduction(records: list[dict]) -> list[dict]:
    """Per (task, quantisation-aware method): in how many runs the shipped file scored exactly what the trained
    model did, and the largest gap (points)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["config"]["method"].get("qat") and r.get("compact_file_accuracy") is not None:
            groups.setdefault((r["config"]["task"], r["config"]["method"]["name"]), []).append(r)
    return [
        {
            "task": task,
            "method": method,
            "runs": len(runs),
            "exact": sum(r["compact_file_accuracy"] == r["test_accuracy"] for r in runs),
            "max_gap_points": max(100 * abs(r["compact_file_accuracy"] - r["test_accuracy"]) for r in runs),
        }
        for (task, method), runs in groups.items()
    ]


def goal_lines(result: dict[str, dict]) -> list[str]:
    """The goals per task in plain words."""
    lines = []
    for task, g in result.items():
        if not g["judged"]:
            lines.append(f"- **{task}**: not judged ({g['reason']}).")
            continue
        spread = g["lora_r8_spread_points"]
        spread_text = (
            "one seed, spread unknown"
            if spread is None
            else f"spread {spread:.1f} points ({'≤' if g['spread_met'] else '>'} {SPREAD_POINTS:.0f})"
        )
        best = g["smallest_within_1_point"]
        if best is None:
            nearest = max(g["qpeft_files"], key=lambda f: f["accuracy"], default=None)
            verdict = "no .qpeft within 1 point" + (
                f" (best: {nearest['method']}, {nearest['gap_points']:+.1f} points at {nearest['ratio']:.0f}×)"
                if nearest
                else ""
            )
        else:
            verdict = (
                f"{'MET' if g['met'] else 'NOT MET'}: {best['method']}, {best['bytes']:,} B, "
                f"{best['ratio']:.0f}× smaller, {100 * best['accuracy']:.1f}%"
            )
        lines.append(
            f"- **{task}**: LoRA r=8 {100 * g['lora_r8_accuracy']:.1f}% ({spread_text}; "
            f"{g['lora_r8_bytes']:,} B); smallest .qpeft within {GOAL_POINTS:.0f} point: {verdict}."
        )
    return lines


def render(data: dict) -> str:
    """The markdown report."""
    s, m = data["settings"], data["machine"]
    sweep = [
        [
            r["task"],
            r["method"],
            f"{r['rate']:g} ({r['varied']})",
            f"{100 * r['validation_accuracy']:.1f}",
            "picked" if r["picked"] else "",
        ]
        for r in data["validation"]
    ]
    load = ", ".join(f"{x:.1f}" for x in m["load_average_1_5_15min"] or [])
    grids = "; ".join(f"{kind} " + ", ".join(map(str, rates)) for kind, rates in GRIDS.items())
    return (
        "# Accuracy per byte, learning rates tuned on validation\n\n"
        + ("**Smoke run (CI): tiny budget, numbers meaningless.**\n\n" if data["smoke"] else "")
        + (
            f"**Part of the study** (the full one: tasks {', '.join(TUNED['tasks'])}; methods "
            f"{', '.join(TUNED['methods'])}; resumable, `python -m {STUDY.module} --workers 2`).\n\n"
            if data["reduced"] and not data["smoke"]
            else ""
        )
        + f"Produced by `{data['command']}` ({data['date_utc']}) on {m['cpu_model']} ({m['cpu_count']} cores, "
        f"torch {m['torch_version']}; load average {load}); every run trained with one torch thread per worker. "
        f"Tasks {', '.join(s['tasks'])}: {s['train_examples']:,} train / {s['validation_examples']:,} validation "
        f"(held out of the training split) / {s['test_examples']:,} test examples, {s['epochs']} epoch(s), batch 32, "
        f"max_length {s['max_length']}, seeds {', '.join(map(str, s['seeds']))}. Text tasks adapt MiniLM, "
        "fmnist-5to9 the committed ViT; all-linear targets + head. Rates: head-only's head rate picked from "
        f"{', '.join(map(str, HEAD_GRID))} and used by every method's head; each method's own rate from its grid "
        f"({grids}), by validation accuracy "
        "(seed 0).\n\n"
        + table(data["cells"])
        + "\n## Goals\n\n"
        + "\n".join(goal_lines(data["goals"]))
        + "\n\n## Quantisation-aware files reproduce the trained model\n\n"
        + "Every run of a quantisation-aware method (phases 2 and 3), the shipped file's test accuracy loaded onto a "
        "fresh base against the trained model's:\n\n"
        + markdown_table(
            ["task", "method", "runs", "file = trained", "largest gap (points)"],
            [
                [r["task"], r["method"], r["runs"], r["exact"], r["max_gap_points"]]
                for r in data["reproduction"]
            ],
        )
        + "\n## Learning-rate picks (validation accuracy %, seed 0)\n\n"
        + markdown_table(["task", "method", "rate", "validation %", ""], sweep)
        + f"\nRuns trained by this invocation: {data['runs_trained']} (cache: `{data['name']}_runs/`).\n"
    )


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) the three phases, write <name>.json and <name>.md; returns the data."""
    args = parse_args(argv, STUDY)
    shown = sys.argv[1:] if argv is None else argv
    cache_dir, quiet = args.out_dir / f"{args.name}_runs", not args.progress
    if args.shard:
        run_grid(PHASES[args.phase](args.settings, cache_dir), cache_dir, quiet=quiet, shard=args.shard)
        return {}
    start, trained, every_run = time.perf_counter(), 0, {}
    for phase, configs_of in PHASES.items():
        configs = configs_of(args.settings, cache_dir)
        missing = sum(not cache_path(cache_dir, c).is_file() for c in configs)
        if args.workers > 1 and missing:
            run_workers([*shown, "--phase", phase], args.workers, STUDY.module)
        records, _, _ = run_grid(configs, cache_dir, quiet=quiet)
        every_run |= {r["hash"]: r for r in records}
        trained += missing
    cells = aggregate(records, args.settings)
    chosen = picks(args.settings, cache_dir)
    data = {
        "name": args.name,
        "command": " ".join([f"python -m {STUDY.module}", *shown]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": args.settings,
        "smoke": args.smoke,
        "reduced": args.settings != TUNED,
        "runs_trained": trained,
        "seconds": time.perf_counter() - start,
        "picks": [{"task": t, "method": m, "lr": r[0], "head_lr": r[1]} for (t, m), r in chosen.items()],
        "validation": _validation_table(args.settings, cache_dir, chosen),
        "cells": cells,
        "goals": goals(cells, args.settings["tasks"]),
        "reproduction": reproduction(list(every_run.values())),
        "runs": [
            {
                "task": r["config"]["task"],
                "method": r["config"]["method"]["name"],
                "seed": r["config"]["seed"],
            }
            | {
                k: r[k]
                for k in ("hash", "test_accuracy", "validation_accuracy", "train_seconds", "finished_utc")
            }
            | {"load_average_1_5_15min": r["load_average_1_5_15min"]}
            for r in records
        ],
    }
    publish(args.out_dir, args.name, data, render(data))
    return data


if __name__ == "__main__":
    main()
