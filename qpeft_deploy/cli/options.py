"""Options shared by every command (docs/CONVENTIONS.md: --base, --quiet, --overwrite)."""

from pathlib import Path

import click

base_option = click.option(
    "--base",
    default="minilm",
    show_default=True,
    help="base model: an HF folder, or 'minilm' for the shipped all-MiniLM-L6-v2",
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
