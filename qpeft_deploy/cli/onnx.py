"""``qpeft export onnx`` and ``qpeft export onnx-adapter`` (thin wrappers over qpeft_deploy.export.onnx.export)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qpeft_deploy.cli.choices import ONNX_APPLIES as APPLIES
from qpeft_deploy.cli.choices import ONNX_DTYPES as DTYPES
from qpeft_deploy.cli.choices import ONNX_MODES as MODES
from qpeft_deploy.cli.choices import ONNX_QUANTIZE as QUANTIZE
from qpeft_deploy.cli.choices import ONNX_SWAPS as SWAPS
from qpeft_deploy.cli.choices import ONNX_TASKS as TASKS
from qpeft_deploy.cli.choices import ONNX_VIAS as VIAS
from qpeft_deploy.cli.options import ADAPTER, base_option, overwrite_option, quiet_option
from qpeft_deploy.cli.signals import unwinds

SWAP_HELP = (
    "swappable adapters carry: factors (materialised U, V: fast runs, LoRA-sized files) or angles "
    "(kilobyte files; circuits rebuilt every run)"
)


@click.command("onnx")
@base_option
@click.option("--adapter", required=True, type=ADAPTER, help="adapter (.qpeft file or PEFT-native folder)")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="merged",
    show_default=True,
    help="merged: ΔW folded in; runtime: qpeft.CircuitApply nodes; swappable: adapters per run "
    "(causal LMs: every mode, with past key/values)",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="fp32",
    show_default=True,
    help="weights (adapter path fp32)",
)
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZE),
    default=None,
    help="base weights: onnxruntime dynamic int8, or 4-bit MatMulNBits (adapter path fp32)",
)
@click.option("--swap", type=click.Choice(SWAPS), default="factors", show_default=True, help=SWAP_HELP)
@click.option(
    "--apply",
    type=click.Choice(APPLIES),
    default="auto",
    show_default=True,
    help="runtime layers: circuits on the activations, dense U/V, or the cheaper per layer",
)
@click.option(
    "--via",
    type=click.Choice(VIAS),
    default="torch",
    show_default=True,
    help="optimum: the optimum folder, ORTModelFor... loads it (needs the [optimum] extra)",
)
@click.option("--task", type=click.Choice(["auto", *TASKS]), default="auto", show_default=True)
@click.option(
    "--check-task",
    default=None,
    help="also compare accuracy on this task's test split (rt, trec6, sms; fmnist-5to9, mnist)",
)
@click.option("--check-examples", default=200, show_default=True, type=int)
@click.option("--force", is_flag=True, help="export even if the base fingerprint differs")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="output folder (model.onnx, config, tokenizer; refused if it exists, unless --overwrite)",
)
@overwrite_option
@quiet_option
@unwinds
def export_onnx_command(base: str, adapter: Path, output: Path, **options) -> None:
    """Export a base model with an adapter to ONNX."""
    from qpeft_deploy.export.onnx.export import export_onnx

    click.echo(json.dumps(export_onnx(base, adapter, output, **options), indent=2))


@click.command("onnx-adapter")
@click.argument("adapter", type=ADAPTER)
@click.option("--swap", type=click.Choice(SWAPS), default="factors", show_default=True, help=SWAP_HELP)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="onnxruntime adapter file (.onnx_adapter; refused if it exists, unless --overwrite)",
)
@overwrite_option
@unwinds
def export_onnx_adapter_command(adapter: Path, swap: str, output: Path, overwrite: bool) -> None:
    """Write ADAPTER as an onnxruntime adapter file for a swappable export."""
    from qpeft_deploy.export.onnx.export import export_onnx_adapter

    click.echo(json.dumps(export_onnx_adapter(adapter, output, swap=swap, overwrite=overwrite)))
