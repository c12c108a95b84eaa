"""Shared helpers for the benchmark scripts: machine info, timing, and writing JSON + markdown results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor() where that file is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, torch version and threads, Python, platform, load."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def sample_times(fn: Callable[[], Any], repeats: int = 7, warmup: int = 2) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved_times(
    fns: dict[str, Callable[[], Any]], repeats: int = 7, warmup: int = 2
) -> dict[str, list[float]]:
    """Wall times in seconds of each named function, timed round-robin (one call of each per round) so that
    load from other processes hits all of them alike; ``warmup`` untimed rounds first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], Any], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after ``warmup`` untimed calls."""
    return statistics.median(sample_times(fn, repeats, warmup))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; floats get 3 significant digits (integers from 100 up)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def latency_spread(ms: dict[str, float]) -> str:
    """'p50 / p90 / p99 / max' of a latency summary in ms ('' when there is none)."""
    return " / ".join(f"{ms[k]:.1f}" for k in ("p50", "p90", "p99", "max")) if ms else ""


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second: the run date a results JSON records as ``date_utc``."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_results(name: str, data: dict, table_md: str) -> None:
    """Write ``data`` to benchmarks/results/<name>.json, its first key ``date_utc`` (now, unless ``data`` has
    one: the report shows this date, never the file's mtime), and ``table_md`` to benchmarks/results/<name>.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    data = {"date_utc": utc_now(), **data}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(table_md)
