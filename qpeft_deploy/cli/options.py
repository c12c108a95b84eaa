"""Options shared by commands (docs/CONVENTIONS.md: --base, --quiet, --overwrite, -o; the PEFT exporters'
--base-name, --task-type, --force)."""

from collections.abc import Callable
from pathlib import Path

import click

from qpeft_deploy.cli.choices import PEFT_TASK_TYPES

base_option = click.option(
    "--base",
    default="minilm",
    show_default=True,
    help="base model: an HF folder, a repo id (owner/name) in the local HF cache, 'minilm' (the shipped "
    "all-MiniLM-L6-v2) or 'smollm2'",
)
quiet_option = click.option("--quiet", is_flag=True, help="no progress bars")
overwrite_option = click.option(
    "--overwrite",
    is_flag=True,
    help="replace an existing output (it stays until the new one is complete; never an input)",
)
ADAPTER = click.Path(path_type=Path)  # an adapter: a .qpeft file or a PEFT-native folder (read_adapter)
qpeft_output_option = click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The .qpeft file to write (refused if it exists, unless --overwrite).",
)
peft_output_option = click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The PEFT folder to write (--overwrite: replace an export).",
)
force_export_option = click.option(
    "--force", is_flag=True, help="Export even if the adapter's base fingerprint differs from --base."
)


def base_name_option(default: str) -> Callable:
    """``--base-name``: the base_model_name_or_path a PEFT folder records (``default`` says what is written
    without it)."""
    return click.option(
        "--base-name", default=None, help=f"base_model_name_or_path to write (default: {default})."
    )


def task_type_option(default: str) -> Callable:
    """``--task-type``: the PEFT task type of an exported folder (``default`` says what is chosen without it)."""
    return click.option(
        "--task-type",
        type=click.Choice(PEFT_TASK_TYPES),
        default=None,
        help=f"PEFT task type (default: {default}).",
    )
