"""The accuracy study's smoke grid end to end (real MiniLM, real RT reviews, real peft), then a cached rerun.

The grid runs as ``python -m benchmarks.accuracy --smoke`` in a child process, as CI and users run it (that
entry point also keeps idle OpenMP threads from spinning, which matters on a busy machine).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import accuracy

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parent.parent


def _smoke(out: Path) -> dict:
    subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy", "--smoke", "--out-dir", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return json.loads((out / "accuracy_smoke.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    first = _smoke(out)
    return out, first, _smoke(out)


def test_smoke_grid_writes_the_expected_cells(smoke):
    out, first, _ = smoke
    cells = {(c["task"], c["method"]): c for c in first["cells"]}
    assert set(cells) == {("rt", m) for m in accuracy.SMOKE["methods"]}
    for cell in cells.values():
        assert 0.0 <= cell["accuracy_mean"] <= 1.0
        assert cell["file_bytes"]["compact"] < cell["file_bytes"]["fp32"]
    qpeft, lora = cells[("rt", "qpeft-K8-L1")], cells[("rt", "lora-r8")]
    assert lora["trainable_parameters"] == lora["lora_r8_parameters"]
    assert qpeft["ratio_vs_lora_r8"] > accuracy.GOAL_RATIO
    assert qpeft["file_bytes"]["compact"] < lora["file_bytes"]["compact"] / 50
    assert first["verdicts"]["rt"]["met"] in (True, False)
    assert first["reduced"] and "Reduced run" in (out / "accuracy_smoke.md").read_text()
    assert len(list((out / "accuracy_smoke_runs").glob("*.json"))) == 2


def test_cached_rerun_trains_nothing(smoke):
    _, first, second = smoke
    assert (first["runs_trained"], first["runs_cached"]) == (2, 0)
    assert (second["runs_trained"], second["runs_cached"]) == (0, 2)
    assert second["cells"] == first["cells"]
    assert second["seconds"] < 2.0  # read from the cache: no model is built


def test_a_changed_setting_is_a_different_run():
    settings = dict(accuracy.SMOKE)
    method = accuracy.METHODS["qpeft-K8-L1"]
    a = accuracy.config_hash(accuracy.run_config(method, "rt", 0, settings))
    b = accuracy.config_hash(accuracy.run_config(method, "rt", 0, {**settings, "epochs": 2}))
    c = accuracy.config_hash(accuracy.run_config(method, "rt", 1, settings))
    assert len({a, b, c}) == 3


def test_report_plots_the_accuracy_results_and_says_what_is_missing(smoke, tmp_path):
    from benchmarks import report

    out, _, _ = smoke
    (tmp_path / "accuracy.json").write_text((out / "accuracy_smoke.json").read_text())
    (tmp_path / "accuracy.md").write_text((out / "accuracy_smoke.md").read_text())
    (tmp_path / "vision.json").write_text((ROOT / "benchmarks" / "results" / "vision.json").read_text())
    notes = report.write_report(tmp_path, tmp_path / "BENCHMARKS.md")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "vision.png").stat().st_size > 1000 and "## Vision" in text
    assert "accuracy.png" in text and "### Accuracy" in text
    assert any(n.startswith("filesize:") for n in notes) and "filesize.json` is missing" in text
