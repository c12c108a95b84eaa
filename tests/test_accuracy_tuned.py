"""The tuned accuracy study's smoke run end to end (real MiniLM, RT, peft): three phases, picks made on the
validation split, seed 0 reused from the sweep, the goals judged, then a cached rerun that trains nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import accuracy_tuned

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parent.parent


def _smoke(out: Path) -> dict:
    subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy_tuned", "--smoke", "--out-dir", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return json.loads((out / "accuracy_tuned_smoke.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    return out, _smoke(out), _smoke(out)


def test_every_phase_runs_once_and_a_rerun_reads_the_cache(smoke):
    out, first, second = smoke
    s = accuracy_tuned.SMOKE
    swept = [m for m in s["methods"] if m != "head-only"]
    head = len(accuracy_tuned.HEAD_GRID)
    sweep = sum(len(accuracy_tuned.GRIDS[accuracy_tuned.METHODS[m].kind]) for m in swept)
    later_seeds = len(s["methods"]) * (len(s["seeds"]) - 1)  # seed 0 is the sweep's (or phase 1's) run
    assert first["runs_trained"] == head + sweep + later_seeds
    assert len(list((out / "accuracy_tuned_smoke_runs").glob("*.json"))) == first["runs_trained"]
    assert second["runs_trained"] == 0 and second["cells"] == first["cells"]


def test_each_pick_is_the_best_validation_accuracy_of_its_grid(smoke):
    _, data, _ = smoke
    rows = data["validation"]
    for pick in data["picks"]:
        mine = [r for r in rows if (r["task"], r["method"]) == (pick["task"], pick["method"])]
        best = max(r["validation_accuracy"] for r in mine)
        picked = [r for r in mine if r["picked"]]
        assert len(picked) == 1 and picked[0]["validation_accuracy"] == best
        rate = pick["lr"] if picked[0]["varied"] == "own" else pick["head_lr"]
        assert picked[0]["rate"] == rate
    heads = {p["task"]: p["head_lr"] for p in data["picks"] if p["method"] == "head-only"}
    assert all(p["head_lr"] == heads[p["task"]] for p in data["picks"])  # every head at head-only's pick


def test_runs_report_held_out_validation_and_the_goals(smoke):
    out, data, _ = smoke
    assert all(0.0 <= r["validation_accuracy"] <= 1.0 for r in data["runs"])
    goal = data["goals"]["rt"]
    assert goal["judged"] and goal["lora_r8_bytes"] > 1_000_000
    assert [f["bytes"] for f in goal["qpeft_files"]] == sorted(f["bytes"] for f in goal["qpeft_files"])
    assert goal["met"] is False or goal["smallest_within_1_point"]["ratio"] >= accuracy_tuned.GOAL_BYTES_RATIO
    text = (out / "accuracy_tuned_smoke.md").read_text()
    assert "Smoke run" in text and "picked" in text and "## Goals" in text


def test_quantisation_aware_files_score_exactly_what_training_did(smoke):
    _, data, _ = smoke
    (row,) = data["reproduction"]  # the one QAT method of the smoke run, 3 sweep runs + seed 1
    assert row["method"] == "qpeft-full-L1-a6l3h8" and row["runs"] == len(accuracy_tuned.GRIDS["qpeft"]) + 1
    assert row["exact"] == row["runs"] and row["max_gap_points"] == 0
