"""Tests of benchmarks/report.py without running a benchmark: the date a section shows is the one its JSON
records (benchmarks/common.py's write_results stamps ``date_utc``), never the file's mtime."""

from __future__ import annotations

import json
import os
import subprocess

from benchmarks import common, report


def test_write_results_records_the_run_date_first(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    common.write_results("x", {"machine": {"cpu_count": 2}}, "| a |\n")
    data = json.loads((tmp_path / "x.json").read_text())
    assert list(data) == ["date_utc", "machine"] and data["date_utc"].endswith("+00:00")
    common.write_results("y", {"date_utc": "2026-01-02T03:04:05+00:00"}, "")  # a script's own date wins
    assert json.loads((tmp_path / "y.json").read_text())["date_utc"] == "2026-01-02T03:04:05+00:00"


def test_a_section_shows_the_recorded_run_date_not_the_mtime(tmp_path):
    machine = {"cpu_model": "AMD EPYC", "cpu_count": 2}
    (tmp_path / "quant.json").write_text(
        json.dumps({"date_utc": "2026-12-06T08:11:51+00:00", "machine": machine})
    )
    os.utime(tmp_path / "quant.json", (0, 0))  # a checkout or copy sets any mtime
    text = report.section("quant", "Angle quantisation", "", tmp_path, [])
    assert "Results written 2026-12-06 08:11 UTC on AMD EPYC, 2 cores." in text
    assert "1970" not in text


def test_a_json_without_a_date_says_so_and_falls_back_to_git(tmp_path):
    (tmp_path / "quant.json").write_text(json.dumps({"machine": {}}))
    assert report.run_date({}, tmp_path / "quant.json") == "(run date not recorded)"  # not in a repository
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "quant.json"], check=True)
    env = {**os.environ, "GIT_COMMITTER_DATE": "2026-11-30T10:20:00+01:00"}
    subprocess.run([*git, "commit", "-qm", "r"], check=True, env=env)
    assert report.run_date({}, tmp_path / "quant.json") == (
        "committed 2026-11-30 09:20 UTC (run date not recorded)"
    )
