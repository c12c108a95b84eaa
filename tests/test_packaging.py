"""``pip install .`` (not editable) gives a working ``qpeft`` outside the repository: build the wheel from a copy
of the tracked sources, check it holds every package module, install it into a folder and run it elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import make_adapter

ROOT = Path(__file__).resolve().parents[1]


def sh(*command, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built without build isolation from a copy (no stale build/ folder can leak into it)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "qpeft_deploy", src / "qpeft_deploy", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    sh(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--disable-pip-version-check",
        "--no-deps",
        "--no-build-isolation",
        ".",
        "-w",
        out,
        cwd=src,
    )
    (found,) = out.glob("qpeft_deploy-*.whl")
    return found


@pytest.fixture(scope="module")
def target(wheel, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("target")
    sh(
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "--no-deps",
        "--target",
        folder,
        wheel,
        cwd=folder,
    )
    return folder


def test_wheel_holds_every_module_and_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "qpeft_deploy").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    assert {n.split("/")[0] for n in names} == {"qpeft_deploy", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    assert "qpeft = qpeft_deploy.cli.main:main" in scripts


def test_installed_wheel_runs_outside_the_repository(target, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    where = sh(
        sys.executable, "-c", "import qpeft_deploy; print(qpeft_deploy.__file__)", cwd=tmp_path, env=env
    )
    assert Path(where.strip()).is_relative_to(target), where  # the installed copy, not the checkout
    out = sh(sys.executable, "-m", "qpeft_deploy.cli.main", "--help", cwd=tmp_path, env=env)
    for command in ("train", "inspect", "merge", "export", "import", "serve", "data"):
        assert f"  {command} " in out
    adapter = make_adapter(tmp_path / "a.qpeft", {0: "neg", 1: "pos"}, seed=0, rank=2)
    out = sh(sys.executable, "-m", "qpeft_deploy.cli.main", "inspect", adapter, cwd=tmp_path, env=env)
    assert "a.qpeft" in out and "fingerprint" in out
