"""File tools that need no model: re-pack (``qpeft pack``), describe (``inspect``) and check (``verify``)."""

from __future__ import annotations

import math
from pathlib import Path

from qpeft_deploy.atomic import prepare_output
from qpeft_deploy.core.factors import orthogonality_errors
from qpeft_deploy.core.keys import mask_key
from qpeft_deploy.errors import FormatError
from qpeft_deploy.io.fingerprint import check_base, fingerprint_id, with_base
from qpeft_deploy.io.qpeft_file import (
    SCALE_MAX,
    TAYLOR_NORM2_MAX,
    integrity_state,
    read_adapter,
    write_adapter,
)
from qpeft_deploy.models import resolve_base

ORTHO_TOLERANCE = 1e-5
BOUNDS = f"|α|, |λ|, |α·λ|, |head| ≤ {SCALE_MAX:g}; Taylor Σx² ≤ {TAYLOR_NORM2_MAX:g} per factor"

KEEP = "keep"  # pack: keep the source file's setting


def pack_adapter(
    src: str | Path,
    out: str | Path,
    *,
    bits: int | None | str = KEEP,
    lambda_dtype: str = KEEP,
    lambda_bits: int | None | str = KEEP,
    head_bits: int | None | str = KEEP,
    drop_head: bool = False,
    base: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Re-pack a .qpeft file (or convert a PEFT-native folder) with other options (``KEEP``: as in ``src``;
    ``lambda_bits`` / ``head_bits`` 32 or None: float λ / head); ``base`` stores its fingerprint.
    An existing ``out`` is replaced only with ``overwrite``; ``out`` may never be ``src`` or in the base."""
    inputs = [src] if base is None else [src, resolve_base(base)]
    prepare_output(out, overwrite=overwrite, protect=inputs)
    adapter = read_adapter(src)
    if base is not None:
        adapter = with_base(adapter, base)
    bits = adapter.stored.bits if bits == KEEP else bits
    lambda_dtype = adapter.stored.lambda_dtype if lambda_dtype == KEEP else lambda_dtype
    lambda_bits = adapter.stored.lambda_bits if lambda_bits == KEEP else lambda_bits
    head_bits = (None if drop_head else adapter.stored.head_bits) if head_bits == KEEP else head_bits
    return write_adapter(
        out,
        adapter,
        bits=bits,
        lambda_dtype=lambda_dtype,
        lambda_bits=lambda_bits,
        head_bits=head_bits,
        drop_head=drop_head,
        overwrite=overwrite,
        protect=inputs,
    )


def inspect_adapter(path: str | Path) -> dict:
    """A JSON-able summary of a .qpeft file or PEFT-native folder (needs no base model)."""
    adapter = read_adapter(path)
    config, info = adapter.config, adapter.stored
    return {
        "path": str(path),
        "container": info.container,
        "format_version": info.format_version,
        "digest": integrity_state(info),
        "tool": info.tool,
        "variant": config.variant,
        "construction": info.construction,
        "layers": config.layers,
        "alpha": config.alpha,
        "targets": len(config.targets),
        "groups": list(info.groups),
        "ranks": sorted(set(config.targets.values())),
        "bits": info.bits,
        "lambda_dtype": info.lambda_dtype,
        "lambda_bits": info.lambda_bits,
        "head_bits": info.head_bits,
        "active_rank": int(sum(int(adapter.state[mask_key(k)].sum()) for k in config.targets)),
        "head": config.head,
        "labels": config.labels(),
        "parameters": info.parameters,
        "bytes": info.nbytes,
        "fingerprint": None
        if adapter.fingerprint is None
        else {
            "algorithm": info.fingerprint_algorithm,
            "targets": len(adapter.fingerprint),
            "first": next(iter(adapter.fingerprint.values())).hex(),
        },
        "base": None
        if adapter.fingerprint is None
        else {"name": config.trained_on(), "id": fingerprint_id(adapter.fingerprint)},
        "extra": config.extra,
    }


def verify_adapter(path: str | Path, base: str | None = None) -> dict:
    """Check a file (digest, structure, bounds, orthogonality of U/V to 1e-5, and ``base``'s fingerprint)."""
    adapter = read_adapter(path)
    errors = orthogonality_errors(adapter)
    worst_key = max(errors, key=errors.get)
    if errors[worst_key] > ORTHO_TOLERANCE or not math.isfinite(errors[worst_key]):
        raise FormatError(
            f"{path}: rebuilt factors of {worst_key} are not orthonormal "
            f"(max |UᵀU − I| = {errors[worst_key]:.2e} > {ORTHO_TOLERANCE:g})"
        )
    report = {
        "path": str(path),
        "targets": len(errors),
        "digest": integrity_state(adapter.stored),
        "bounds": f"ok ({BOUNDS})",
        "max_orthogonality_error": errors[worst_key],
        "fingerprint": "not checked",
    }
    if base is not None:
        if adapter.fingerprint is None:
            raise FormatError(f"{path}: has no base fingerprint to check against {base}")
        check_base(adapter.fingerprint, resolve_base(base), trained_on=adapter.config.trained_on())
        report["fingerprint"] = f"matches {base}"
    return report
