"""Run every benchmark script with its defaults, then regenerate BENCHMARKS.md and the plots.

    python -m benchmarks                       # all of them (the accuracy grid alone takes ~2 h on 2 idle cores)
    python -m benchmarks --only filesize,swap  # a subset (then the report)
    python -m benchmarks --no-report           # skip BENCHMARKS.md

Each script runs as ``python -m benchmarks.<name>`` with no arguments (its ``main()`` with its defaults) in a
child process of its own, exactly as when run alone: no state, memory or imported-library setting leaks from one
benchmark's timings into the next. A failing script is reported and the others still run; the exit code is 1
when any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["circuit", "filesize", "quant", "merge", "onnx", "swap", "accuracy"]  # the rest follow, sorted
NOT_SCRIPTS = {"__init__", "__main__", "common", "report"}


def scripts() -> list[str]:
    """Every benchmark script in benchmarks/ (a module with a main()), ORDER first."""
    found = {p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in NOT_SCRIPTS}
    found = {name for name in found if "def main(" in (Path(__file__).parent / f"{name}.py").read_text()}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def run_script(name: str) -> bool:
    """Run ``python -m benchmarks.<name>`` from the repository root; True when it exited 0."""
    start = time.perf_counter()
    print(f"=== benchmarks.{name}", flush=True)
    code = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], check=False, cwd=ROOT).returncode
    ok = code == 0
    status = "done" if ok else f"FAILED (exit {code})"
    print(f"=== benchmarks.{name}: {status} in {time.perf_counter() - start:.0f} s", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scripts in order, then the report; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    available = scripts()
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(available)}")
    parser.add_argument(
        "--no-report", action="store_true", help="do not regenerate BENCHMARKS.md and the plots"
    )
    args = parser.parse_args(argv)
    chosen = available if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in available]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(available)}")
    failed = [name for name in chosen if not run_script(name)]
    if not args.no_report:
        from benchmarks.report import main as report

        report([])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
