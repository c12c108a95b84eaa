"""``qpeft pack | inspect | verify``: the .qpeft file commands (thin wrappers over qpeft_deploy.io.qpeft_file).

Errors are raised as ``QpeftError``; the main group prints them as one line on stderr and exits with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from qpeft_deploy.cli.choices import ANGLE_BITS, HEAD_BITS, KEEP, LAMBDA_BITS
from qpeft_deploy.cli.options import ADAPTER, overwrite_option, qpeft_output_option
from qpeft_deploy.cli.signals import unwinds

BITS_CHOICES = [str(b) for b in ANGLE_BITS] + ["32"]
LAMBDA_BITS_CHOICES = [str(b) for b in LAMBDA_BITS] + ["32"]
HEAD_BITS_CHOICES = [str(b) for b in HEAD_BITS] + ["32"]


@click.command("pack")
@click.argument("adapter", type=ADAPTER)
@qpeft_output_option
@click.option(
    "--bits",
    type=click.Choice(BITS_CHOICES),
    default=None,
    help="Bits per circuit angle (32: unquantised fp32). Default: as in ADAPTER.",
)
@click.option(
    "--lambda-dtype",
    type=click.Choice(["fp16", "fp32"]),
    default=None,
    help="Precision of λ, the head and Taylor parameters. Default: as in ADAPTER.",
)
@click.option(
    "--lambda-bits",
    type=click.Choice(LAMBDA_BITS_CHOICES),
    default=None,
    help="Bits per λ code, one fp32 scale per target (32: λ as --lambda-dtype). Default: as in ADAPTER.",
)
@click.option(
    "--head-bits",
    type=click.Choice(HEAD_BITS_CHOICES),
    default=None,
    help="Bits per head weight code, one fp32 scale per row (32: the head as --lambda-dtype). Default: as in "
    "ADAPTER.",
)
@click.option("--drop-head", is_flag=True, help="Leave the classification head out.")
@click.option(
    "--base", default=None, help="Store this base's fingerprint (HF folder, cached repo id or 'minilm')."
)
@overwrite_option
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
@unwinds
def pack_command(
    adapter: Path,
    output: Path,
    bits: str | None,
    lambda_dtype: str | None,
    lambda_bits: str | None,
    head_bits: str | None,
    drop_head: bool,
    base: str | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Re-pack an adapter ADAPTER (a .qpeft file or a PEFT-native folder) with other storage options."""
    from qpeft_deploy.io.file_tools import pack_adapter

    out = pack_adapter(
        adapter,
        output,
        bits=KEEP if bits is None else int(bits),
        lambda_dtype=lambda_dtype or KEEP,
        lambda_bits=KEEP if lambda_bits is None else int(lambda_bits),
        head_bits=KEEP if head_bits is None else int(head_bits),
        drop_head=drop_head,
        base=base,
        overwrite=overwrite,
    )
    if not quiet:
        click.echo(f"wrote {out} ({out.stat().st_size:,} bytes, was {_size(adapter):,})")


def _size(adapter: Path) -> int:
    """Bytes of an adapter file, or of the files of a PEFT folder."""
    if adapter.is_dir():
        return sum(p.stat().st_size for p in adapter.iterdir() if p.is_file())
    return adapter.stat().st_size


def _lambda_storage(summary: dict) -> str:
    """How λ and the head are stored, for ``inspect``."""
    lam, head = summary["lambda_bits"], summary["head_bits"]
    if lam is None and head is None:
        return f"λ/head {summary['lambda_dtype']}"
    lam_text = summary["lambda_dtype"] if lam is None else f"{lam}-bit codes + fp32 scale per target"
    head_text = summary["lambda_dtype"] if head is None else f"{head}-bit weight codes + fp32 scale per row"
    return f"λ {lam_text}, head {head_text}"


def _human(summary: dict) -> str:
    bits = "fp32" if summary["bits"] is None else f"{summary['bits']}-bit"
    angles = (
        "Taylor parameters " + summary["lambda_dtype"] if summary["variant"] == "taylor" else "angles " + bits
    )
    parts = " | ".join(f"{k} {v:,}" for k, v in summary["bytes"].items() if k != "total")
    params = summary["parameters"]
    fingerprint, base = summary["fingerprint"], summary["base"] or {}
    lines = [
        f"file          {summary['path']} ({summary['bytes']['total']:,} bytes)",
        f"format        qpeft version {summary['format_version']}, written by {summary['tool']}"
        if summary["container"] == "qpeft"
        else f"format        PEFT-native folder, written by {summary['tool']}",
        f"integrity     {summary['digest']}",
        f"base          {base.get('name') or 'name not recorded'}" + (f" (id {base['id']})" if base else ""),
        (
            f"variant       {summary['variant']} ({summary['construction']}), L={summary['layers']}, "
            f"alpha={summary['alpha']:g}"
        ),
        (
            f"targets       {summary['targets']}, K={','.join(map(str, summary['ranks']))}, "
            f"active directions {summary['active_rank']}"
        ),
        *(f"  {group}" for group in summary["groups"]),
        (
            f"parameters    {params['total']:,} ({params['angles']:,} factor, {params['lambda']:,} λ, "
            f"{params['head']:,} head)"
        ),
        f"storage       {angles}, {_lambda_storage(summary)}",
        f"bytes         {parts}",
        f"head          {summary['head']} ({', '.join(summary['labels'])})"
        if summary["head"]
        else "head          none",
        (
            f"fingerprint   {fingerprint['algorithm']} over {fingerprint['targets']} base tensors"
            if fingerprint
            else "fingerprint   none"
        ),
    ]
    return "\n".join(lines)


@click.command("inspect")
@click.argument("adapter", type=ADAPTER)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_command(adapter: Path, as_json: bool) -> None:
    """Describe an adapter file or PEFT-native folder (targets, K, L, sizes by part, bits, fingerprint); needs no base model."""
    from qpeft_deploy.io.file_tools import inspect_adapter

    summary = inspect_adapter(adapter)
    click.echo(json.dumps(summary, indent=2, ensure_ascii=False) if as_json else _human(summary))


@click.command("verify")
@click.argument("adapter", type=ADAPTER)
@click.option(
    "--base",
    default=None,
    help="Also check the base fingerprint against this HF folder, cached repo id or 'minilm'.",
)
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
def verify_command(adapter: Path, base: str | None, quiet: bool) -> None:
    """Check an adapter file or PEFT-native folder: digest, structure, value bounds, orthonormal U/V, and (--base) the fingerprint."""
    from qpeft_deploy.io.file_tools import verify_adapter

    report = verify_adapter(adapter, base=base)
    if not quiet:
        click.echo(
            f"ok: {adapter} ({report['targets']} targets, {report['digest']}, values within bounds, "
            f"max |UᵀU − I| = {report['max_orthogonality_error']:.1e}, fingerprint {report['fingerprint']})"
        )
