"""``qpeft merge`` and ``qpeft unmerge``: thin wrappers over :mod:`qpeft_deploy.merge.checkpoint`.

Errors are raised as ``QpeftError``; the main group prints them as one line on stderr and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path

import click

from qpeft_deploy.cli.choices import DEFAULT_MAX_SHARD_SIZE, KEEP
from qpeft_deploy.cli.options import ADAPTER, base_option, overwrite_option, quiet_option
from qpeft_deploy.cli.signals import unwinds

FOLDER = click.Path(file_okay=False, path_type=Path)
DTYPE_HELP = "keep | fp32 | fp16 | bf16: precision of the floating-point weights written"

output_option = click.option(
    "-o",
    "--output",
    type=FOLDER,
    required=True,
    help="The HF folder to write (refused if it exists, unless --overwrite).",
)
dtype_option = click.option("--dtype", default=KEEP, show_default=True, help=DTYPE_HELP)
shard_option = click.option(
    "--max-shard-size",
    default=DEFAULT_MAX_SHARD_SIZE,
    show_default=True,
    help="Largest safetensors shard (e.g. 500MB, 2GB, 1GiB).",
)


def _summary(output: Path) -> str:
    files = sorted(output.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    return f"wrote {output} ({len(files)} safetensors file{'s' * (len(files) != 1)}, {size:,} bytes)"


@click.command("merge")
@base_option
@click.option(
    "--adapter",
    "adapters",
    type=ADAPTER,
    multiple=True,
    required=True,
    help="A .qpeft file or PEFT-native folder; repeat to merge several (ΔW = Σ wᵢ·ΔWᵢ).",
)
@click.option(
    "--weight",
    "weights",
    type=float,
    multiple=True,
    help="wᵢ of each --adapter, in the same order (default 1 each).",
)
@click.option(
    "--head-from",
    default=None,
    help="Adapter (file name) whose classification head to keep when several carry one.",
)
@output_option
@dtype_option
@shard_option
@overwrite_option
@click.option("--force", is_flag=True, help="Merge even if the base differs from an adapter's fingerprint.")
@quiet_option
@unwinds
def merge_command(
    base: str,
    adapters: tuple[Path, ...],
    weights: tuple[float, ...],
    head_from: str | None,
    output: Path,
    dtype: str,
    max_shard_size: str,
    overwrite: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Merge adapters into a base checkpoint (streamed, sharded, atomic); a head makes the task model."""
    from qpeft_deploy.merge.checkpoint import merge_checkpoint

    out = merge_checkpoint(
        base,
        adapters,
        output,
        weights=weights,
        head_from=head_from,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        force=force,
        quiet=quiet,
    )
    if not quiet:
        click.echo(_summary(out))


@click.command("unmerge")
@click.option("--merged", type=FOLDER, required=True, help="A folder written by qpeft merge.")
@click.option(
    "--adapter",
    "adapters",
    type=ADAPTER,
    multiple=True,
    required=True,
    help="Every adapter (.qpeft file or PEFT folder) that was merged (repeat; weights come from the merge record).",
)
@output_option
@click.option(
    "--dtype",
    default=KEEP,
    show_default=True,
    help=DTYPE_HELP + " (keep: the dtypes the base had before the merge)",
)
@shard_option
@overwrite_option
@quiet_option
@unwinds
def unmerge_command(
    merged: Path,
    adapters: tuple[Path, ...],
    output: Path,
    dtype: str,
    max_shard_size: str,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Take merged adapters out again: restores the base checkpoint (exact to ~1e-7 for fp32 weights)."""
    from qpeft_deploy.merge.checkpoint import unmerge_checkpoint

    out = unmerge_checkpoint(
        merged,
        adapters,
        output,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        quiet=quiet,
    )
    if not quiet:
        click.echo(_summary(out))
