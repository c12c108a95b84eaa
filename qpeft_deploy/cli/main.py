"""The ``qpeft`` command group: parses arguments, calls one library function per command, prints.

Any ``QpeftError`` (bad input) becomes one line on stderr and exit code 2; anything else is a bug (exit 1).
"""

from __future__ import annotations

import io
import sys

import click

from qpeft_deploy import __version__
from qpeft_deploy.cli.data import data_group
from qpeft_deploy.cli.files import inspect_command, pack_command, verify_command
from qpeft_deploy.cli.lora import export_lora_command, import_lora_command
from qpeft_deploy.cli.merge import merge_command, unmerge_command
from qpeft_deploy.cli.onnx import export_onnx_adapter_command, export_onnx_command
from qpeft_deploy.cli.peft import export_peft_command
from qpeft_deploy.cli.serve import serve_command
from qpeft_deploy.cli.train import eval_command, train_command
from qpeft_deploy.errors import QpeftError


class QpeftGroup(click.Group):
    """A click group that reports bad input as one line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QpeftError as error:
            click.echo(f"qpeft: error: {error}", err=True)
            ctx.exit(2)


@click.group(cls=QpeftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qpeft")
def cli() -> None:
    """Quantum-PEFT adapters: train, pack, inspect, merge, export and serve kilobyte-sized fine-tunes."""


@cli.group("export")
def export_group() -> None:
    """Export an adapter (or a base model with adapters) to another format."""


@cli.group("import")
def import_group() -> None:
    """Convert adapters from other ecosystems into .qpeft files."""


for command in (
    train_command,
    eval_command,
    pack_command,
    inspect_command,
    verify_command,
    merge_command,
    unmerge_command,
    serve_command,
    data_group,
):
    cli.add_command(command)
for command in (export_onnx_command, export_onnx_adapter_command, export_lora_command, export_peft_command):
    export_group.add_command(command)
import_group.add_command(import_lora_command)


def robust_output() -> None:
    """Never fail on printing: characters stdout or stderr cannot encode (LC_ALL=C, PYTHONIOENCODING=latin-1)
    are written as backslash escapes instead of raising UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def main() -> None:
    """Console-script entry point."""
    robust_output()
    sys.exit(cli.main(prog_name="qpeft", standalone_mode=True))


if __name__ == "__main__":
    main()
