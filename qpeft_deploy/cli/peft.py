"""``qpeft export peft``: an adapter as a PEFT-native Quantum-PEFT folder (a thin wrapper over io/peft_native.py).

The reverse direction needs no command of its own: every command that reads an adapter reads a PEFT-native
folder too (``qpeft pack <folder> -o a.qpeft`` converts one). Errors are raised as ``QpeftError``; the main
group prints them as one line (exit 2).
"""

from __future__ import annotations

from pathlib import Path

import click

from qpeft_deploy.cli.options import (
    ADAPTER,
    base_name_option,
    base_option,
    force_export_option,
    overwrite_option,
    peft_output_option,
    task_type_option,
)
from qpeft_deploy.cli.signals import unwinds


@click.command("peft")
@click.argument("adapter", type=ADAPTER)
@peft_output_option
@base_option
@base_name_option("as the adapter recorded, else the hub id of minilm or the base folder's name")
@task_type_option(
    "as recorded, else SEQ_CLS for an adapter with a head; without a head say CAUSAL_LM or FEATURE_EXTRACTION"
)
@force_export_option
@overwrite_option
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
@unwinds
def export_peft_command(
    adapter: Path,
    output: Path,
    base: str,
    base_name: str | None,
    task_type: str | None,
    force: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Write ADAPTER as a PEFT-native folder (peft_type QPEFT) that PeftModel.from_pretrained loads."""
    from qpeft_deploy.io.peft_native import export_peft

    report = export_peft(
        adapter,
        output,
        base=base,
        base_name=base_name,
        task_type=task_type,
        force=force,
        overwrite=overwrite,
    )
    if not quiet:
        click.echo(
            f"wrote {report['output']} (PEFT-native {report['task_type']}, {report['targets']} targets, "
            f"{report['bytes']:,} bytes)"
        )
