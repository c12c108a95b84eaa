"""``qpeft export lora`` and ``qpeft import lora``: the bridge to PEFT / vLLM / LoRAX (thin wrappers).

``export_lora_command`` is registered under the ``export`` group and ``import_lora_command`` under ``import``;
both are named ``lora``. Errors are raised as ``QpeftError``; the main group prints them as one line (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from qpeft_deploy.cli.choices import LORA_DTYPES
from qpeft_deploy.cli.options import (
    ADAPTER,
    base_name_option,
    base_option,
    force_export_option,
    overwrite_option,
    peft_output_option,
    qpeft_output_option,
    task_type_option,
)
from qpeft_deploy.cli.signals import unwinds
from qpeft_deploy.errors import ConfigError

FOLDER = click.Path(file_okay=False, path_type=Path)


@click.command("lora")
@click.argument("adapter", type=ADAPTER)
@peft_output_option
@base_option
@base_name_option("the hub id of minilm, else the base folder's name")
@task_type_option(
    "follows the adapter: SEQ_CLS with a head, CAUSAL_LM for a causal-LM adapter (vLLM, LoRAX), else "
    "FEATURE_EXTRACTION; a contradicting choice is refused"
)
@click.option(
    "--dtype",
    type=click.Choice(LORA_DTYPES),
    default="fp32",
    show_default=True,
    help="Precision of lora_A, lora_B and the head.",
)
@click.option(
    "--balanced", is_flag=True, help="Split √|αλ| between lora_A and lora_B (default: α·λ in lora_B)."
)
@click.option("--drop-head", is_flag=True, help="Leave the head out (vLLM refuses modules_to_save).")
@force_export_option
@overwrite_option
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
@unwinds
def export_lora_command(
    adapter: Path,
    output: Path,
    base: str,
    base_name: str | None,
    task_type: str | None,
    dtype: str,
    balanced: bool,
    drop_head: bool,
    force: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Write the adapter file ADAPTER as a PEFT LoRA folder whose ΔW equals α·U diag(λ) Vᵀ exactly."""
    from qpeft_deploy.export.lora.export import export_lora

    report = export_lora(
        adapter,
        output,
        base=base,
        base_name=base_name,
        task_type=task_type,
        dtype=dtype,
        balanced=balanced,
        drop_head=drop_head,
        force=force,
        overwrite=overwrite,
    )
    if not quiet:
        ranks = sorted(set(report["ranks"].values()))
        click.echo(
            f"wrote {report['output']} (PEFT LoRA, {report['modules']} modules, r={','.join(map(str, ranks))}"
            f", {report['bytes']:,} bytes; {report['skipped']} fully masked targets left out)"
        )


@click.command("lora")
@click.argument("peft_dir", type=FOLDER)
@qpeft_output_option
@click.option(
    "--variant",
    type=click.Choice(["taylor", "pauli"]),
    required=True,
    help="taylor: exact (Stiefel logarithm); pauli: lossy fit of circuit angles.",
)
@base_option
@click.option("--layers", type=int, default=None, help="Circuit layers L (pauli only; default 1).")
@click.option(
    "--calibrate",
    "task",
    default=None,
    help="Fine-tune the fitted circuits on this task (pauli only): rt | trec6 | sms | csv:<path>.",
)
@click.option("--max-examples", type=int, default=None, help="Calibrate on the first N training examples.")
@click.option("--max-test", type=int, default=None, help="Measure accuracy on the first N test examples.")
@click.option("--epochs", type=int, default=1, show_default=True, help="Calibration epochs.")
@click.option(
    "--lr", type=float, default=1e-2, show_default=True, help="Calibration learning rate of angles and λ."
)
@click.option(
    "--max-error",
    type=float,
    default=None,
    help="Fail (write nothing) when a layer's relative ΔW error exceeds this.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the full report (per-layer errors) as JSON.")
@overwrite_option
@click.option("--quiet", is_flag=True, help="No progress bars and no summary line (--json still prints).")
@unwinds
def import_lora_command(
    peft_dir: Path,
    output: Path,
    variant: str,
    base: str,
    layers: int | None,
    task: str | None,
    max_examples: int | None,
    max_test: int | None,
    epochs: int,
    lr: float,
    max_error: float | None,
    seed: int,
    as_json: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Convert the PEFT LoRA folder PEFT_DIR into a .qpeft adapter; prints a summary line (--json: the report)."""
    try:  # scipy (the matrix logarithm, the assignment) is the optional extra qpeft-deploy[lora]
        from qpeft_deploy.export.lora.calibrate import Calibration
        from qpeft_deploy.export.lora.importer import import_lora
    except ModuleNotFoundError as e:
        raise ConfigError(f"qpeft import lora needs {e.name}: pip install 'qpeft-deploy[lora]'") from None
    if task is None and (max_examples is not None or max_test is not None):
        raise ConfigError("--max-examples and --max-test need --calibrate TASK")
    calibration = None if task is None else Calibration(task, max_examples, max_test, epochs, lr)
    report = import_lora(
        peft_dir,
        output,
        variant=variant,
        base=base,
        layers=layers,
        calibration=calibration,
        max_error=max_error,
        seed=seed,
        quiet=quiet,
        overwrite=overwrite,
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        click.echo(import_summary(report))


def import_summary(report: dict) -> str:
    """One line of an ``import_lora`` report: file, sizes, the ΔW error and, when calibrated, the accuracies."""
    error, accuracy = report["relative_error"], report.get("accuracy")
    calibrated = (
        ""
        if accuracy is None
        else f"; {accuracy['task']} accuracy: LoRA {accuracy['lora']:.4f}, fit {accuracy['before']:.4f}, "
        f"calibrated {accuracy['after']:.4f}"
    )
    return (
        f"wrote {report['output']} ({report['variant']}, {report['targets']} targets, {report['qpeft_bytes']:,} "
        f"bytes; LoRA weights {report['lora_bytes']:,} bytes, {report['compression_ratio']:.1f}x; relative ΔW "
        f"error max {error['max']:.2g}, mean {error['mean']:.2g}{calibrated}; {report['seconds']:g} s)"
    )
