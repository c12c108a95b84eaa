"""The .qpeft adapter file (format version 5, see docs/FORMAT.md): encode, decode and validate.

A .qpeft file is a plain safetensors file with at most eight tensors and a string-only ``__metadata__``:

- ``a``: every factor parameter, target after target (U's then V's): circuit angles as b-bit codes packed
  tightly (uint8), or float32; Taylor parameters as float16/float32 (never angle-coded).
- ``m``: the λ keep-masks, one bit each (uint8; absent in version 4, and in version 5 when every λ is active); ``l``: the
  active λ (from version 3; every λ before), as float16/float32 or, with ``lambda_bits``, as packed b-bit codes
  with one float32 scale per target in ``s``.
- ``h``: the classification head's tensors, flattened and concatenated (optional); with ``head_bits``
  (version 5) only those not coded (biases), the weights being packed b-bit codes in ``hc`` with one float32
  scale per weight row in ``hs``.
- ``f``: an 8-byte base digest per target (uint8, T×8, optional).

The targets are written as a few patterns with one (N, M, K) each (``encoder.layer.{0-5}.output.dense.weight
:384x1536:8``); expanding the patterns gives the canonical target order, and every offset into the packed
tensors follows from the config. The metadata key ``digest`` (BLAKE2b-16 over the other metadata and every
tensor's bytes) makes any changed bit a refusal; the values are bounded so that no accepted file computes
non-finite outputs. The reader checks the header length before reading it, every tensor's dtype, shape and
offsets against the config before using it, then the digest, padding bits, finiteness and bounds, and raises
:class:`FormatError` ("<path>: <problem>") for anything wrong. A writer writes the lowest version that holds the
adapter (version 2 unless λ is coded or masked; 4 for coded λ with none masked; 3 for masked λ; 5 for a coded
head); version-1 (no digest), 2, 3 and 4 files are still read.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from qpeft_deploy import __version__
from qpeft_deploy.atomic import atomic_file
from qpeft_deploy.core.adapter import AdapterConfig, AdapterFile, StoredInfo
from qpeft_deploy.core.circuit import CONSTRUCTION_ID
from qpeft_deploy.core.factors import circuit_angles, factor_params, target_params
from qpeft_deploy.core.keys import HEAD_MODULE_NAMES, SIDES
from qpeft_deploy.core.quantize import (
    ANGLE_BITS,
    SCALED_BITS,
    dequantize_angles,
    dequantize_scaled,
    pack_bits,
    packed_size,
    quantize_angles,
    quantize_scaled,
    scaled_levels,
    unpack_bits,
)
from qpeft_deploy.errors import ConfigError, FormatError
from qpeft_deploy.io.fingerprint import ALGORITHM, DIGEST_SIZE
from qpeft_deploy.io.names import INT, MAX_TARGETS, NAME_PART, PatternError, compress_names, expand_pattern
from qpeft_deploy.io.safetensors import read_header, tensor_entry
from qpeft_deploy.io.strict_json import strict_json

FORMAT = "qpeft"
FORMAT_VERSION = 5
DIGEST_VERSION = 2  # the first format version with the integrity digest
COMPACT_VERSION = 3  # the first with only the active λ in ``l``, and λ codes (``lambda_bits``, ``s``)
MASKLESS_VERSION = 4  # a version-4 file stores no keep-mask ``m``: every λ is active
HEAD_CODES_VERSION = 5  # the first with head codes (``head_bits``, ``hc``, ``hs``); ``m`` only if needed
DIGEST_KEY = "digest"
DIGEST_ALGORITHM = "blake2b-16"
DIGEST_BYTES = 16
DIGEST_DOMAIN = b"qpeft-digest\0"
SCALE_MAX = 65504.0  # bound on |α|, |λ|, |α·λ|, head values and fp32 angles: the largest finite fp16
TAYLOR_NORM2_MAX = 65536.0  # bound on Σx² over one Taylor factor's parameters (A's and B's entries)
SUFFIX = ".qpeft"
TOOL = f"qpeft-deploy {__version__}"
TAYLOR_CONSTRUCTION = "stiefel-exp-v1"
CONSTRUCTIONS = {"pauli": CONSTRUCTION_ID, "taylor": TAYLOR_CONSTRUCTION}
FLOAT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
FP32_BITS = 32  # ``bits`` metadata value of unquantised (float32) circuit angles; λ: no λ codes
MAX_HEADER = 1 << 20
MAX_DIM = 1 << 20
MAX_LAYERS = 64
MAX_SEED = 2**63 - 1

_REQUIRED = (
    "format",
    "format_version",
    "tool",
    "variant",
    "construction",
    "layers",
    "alpha",
    "seed",
    "targets",
    "lambda_dtype",
)
_OPTIONAL = ("bits", "head", "head_shapes", "labels", "fingerprint", "extra")
_COMPACT_OPTIONAL = ("lambda_bits",)  # from version 3
_HEAD_CODES_OPTIONAL = ("head_bits",)  # from version 5
_ST_DTYPES = {"F16": ("<f2", 2), "F32": ("<f4", 4), "U8": ("u1", 1)}
_TORCH_TO_ST = {torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8"}
_FLOAT = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_HEAD_TENSOR = re.compile(r"([A-Za-z0-9_]+\.)*(weight|bias)")
_DIGEST_VALUE = re.compile(DIGEST_ALGORITHM + r":[0-9a-f]{32}")
_INF = torch.tensor(math.inf)


class _Invalid(Exception):
    """A problem found while decoding; read_adapter prefixes the path and raises FormatError."""


# ------------------------------------------------------------------------------------------------- layout


@dataclass
class _Layout:
    """What the config implies: targets in canonical order with (N, M, K), counts and tensor specs."""

    variant: str
    layers: int
    targets: dict[str, tuple[int, int, int]]
    groups: list[str]
    bits: int | None
    float_dtype: str
    head: str | None
    head_shapes: list[tuple[str, tuple[int, ...]]]
    has_fingerprint: bool
    version: int
    lambda_bits: int | None
    head_bits: int | None
    has_mask: bool

    def coded_head(self) -> list[tuple[str, tuple[int, ...]]]:
        """The head tensors stored as codes (every 2-D weight, with ``head_bits``), in head order."""
        if self.head_bits is None:
            return []
        return [(n, s) for n, s in self.head_shapes if n.endswith("weight") and len(s) == 2]

    def coded_count(self) -> int:
        """How many head weight values ``hc`` holds codes of."""
        return sum(math.prod(shape) for _, shape in self.coded_head())

    def coded_rows(self) -> int:
        """How many head weight rows carry a scale in ``hs``."""
        return sum(shape[0] for _, shape in self.coded_head())

    def angle_count(self) -> int:
        return sum(
            math.prod(shape)
            for key, dims in self.targets.items()
            for _, shape in target_params(self.variant, key, dims, self.layers)[0]
        )

    def lambda_count(self) -> int:
        return sum(k for _, _, k in self.targets.values())

    def head_count(self) -> int:
        return sum(math.prod(shape) for _, shape in self.head_shapes)

    def lambda_tensor(self, stored: int) -> tuple[str, list[int]]:
        """dtype and shape of ``l`` holding ``stored`` λ (b-bit codes with ``lambda_bits``)."""
        if self.lambda_bits is not None:
            return "U8", [packed_size(stored, self.lambda_bits)]
        return _TORCH_TO_ST[FLOAT_DTYPES[self.float_dtype]], [stored]

    def tensors(self) -> dict[str, tuple[str, list[int]]]:
        """Tensor name -> (safetensors dtype, shape); ``l`` as if every λ were active (from version 3 the
        mask decides how many it holds)."""
        fdt = _TORCH_TO_ST[FLOAT_DTYPES[self.float_dtype]]
        angles = self.angle_count()
        if self.bits is None:
            spec = {"a": (fdt if self.variant == "taylor" else "F32", [angles])}
        else:
            spec = {"a": ("U8", [packed_size(angles, self.bits)])}
        spec["l"] = self.lambda_tensor(self.lambda_count())
        if self.lambda_bits is not None:
            spec["s"] = ("F32", [len(self.targets)])
        if self.has_mask:
            spec["m"] = ("U8", [packed_size(self.lambda_count(), 1)])
        if self.head is not None:
            spec["h"] = (fdt, [self.head_count() - self.coded_count()])
        if self.head_bits is not None:
            spec["hc"] = ("U8", [packed_size(self.coded_count(), self.head_bits)])
            spec["hs"] = ("F32", [self.coded_rows()])
        if self.has_fingerprint:
            spec["f"] = ("U8", [len(self.targets), DIGEST_SIZE])
        return spec


def _stores_mask(version: int, needed: bool) -> bool:
    """Whether a file of ``version`` holds the keep-mask ``m``: always before version 4, never in version 4,
    and from version 5 only when ``needed`` (some λ masked)."""
    return version < MASKLESS_VERSION or (version >= HEAD_CODES_VERSION and needed)


def _group_string(pattern: str, dims: tuple[int, int, int]) -> str:
    n, m, k = dims
    return f"{pattern}:{n}x{m}:{k}"


def target_groups(adapter: AdapterFile) -> list[str]:
    """The target patterns a .qpeft file of ``adapter`` would store (``pattern:NxM:K``)."""
    return _compress_targets(adapter.check())[0]


def _compress_targets(targets: dict[str, tuple[int, int, int]]) -> tuple[list[str], dict]:
    """Group strings for the metadata, and the targets re-ordered canonically (as a reader expands them)."""
    by_dims: dict[tuple[int, int, int], list[str]] = {}
    for key, dims in targets.items():
        if not NAME_PART.fullmatch(key):
            raise ConfigError(
                f"{key!r}: target names may not contain braces, commas, colons, semicolons or "
                "spaces in a .qpeft file"
            )
        by_dims.setdefault(dims, []).append(key)
    groups, ordered = [], {}
    for dims, names in by_dims.items():
        for pattern in compress_names(names):
            groups.append(_group_string(pattern, dims))
            ordered.update({name: dims for name in expand_pattern(pattern, len(targets))})
    if ordered.keys() != targets.keys() or len(ordered) != len(targets):
        raise ConfigError("target names cannot be written as patterns (names with '-' ranges inside?)")
    return groups, ordered


# ---------------------------------------------------------------------------------------- integrity, bounds


def _field(h: hashlib.blake2b, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def integrity_digest(meta: dict[str, str], tensors: dict[str, bytes]) -> str:
    """The ``digest`` value: BLAKE2b-16 over every other metadata entry and every tensor's bytes (FORMAT.md)."""
    h = hashlib.blake2b(DIGEST_DOMAIN, digest_size=DIGEST_BYTES)
    for key in sorted(k for k in meta if k != DIGEST_KEY):
        _field(h, key.encode("utf-8", "surrogatepass"))
        _field(h, meta[key].encode("utf-8", "surrogatepass"))
    for name in sorted(tensors):
        _field(h, name.encode("utf-8", "surrogatepass"))
        _field(h, tensors[name])
    return f"{DIGEST_ALGORITHM}:{h.hexdigest()}"


def integrity_state(stored: StoredInfo) -> str:
    """How a file read by :func:`read_adapter` was protected: a verified digest, or none (format version 1,
    or a PEFT-native folder)."""
    if stored.container == "peft":
        return "no integrity digest (PEFT-native folder)"
    if stored.format_version >= DIGEST_VERSION:
        return f"{DIGEST_ALGORITHM} digest ok"
    return f"no integrity digest (format version {stored.format_version})"


def _head_order(keys: list[str]) -> list[str]:
    """Head tensor keys with each module's weight before its bias, modules in their first-seen order."""
    modules = {k.rpartition(".")[0]: i for i, k in reversed(list(enumerate(keys)))}
    return sorted(keys, key=lambda k: (modules[k.rpartition(".")[0]], k.endswith("bias")))


def _check_head_shapes(shapes: list[tuple[str, tuple[int, ...]]], labels: int, version: int) -> None:
    """A head of weights and biases: each bias next to its weight (after it from version 2, which writers
    order so) with the weight's first dimension, and the last weight (labels, hidden)."""
    for i, (name, shape) in enumerate(shapes):
        if not _HEAD_TENSOR.fullmatch(name):
            raise _Invalid(f"head tensor {name[:40]!r} is not a weight or bias")
        if name.endswith("bias"):
            weight = name.removesuffix("bias") + "weight"
            beside = [i - 1] + ([i + 1] if version < DIGEST_VERSION else [])
            if not any(
                0 <= j < len(shapes) and shapes[j][0] == weight and shapes[j][1][:1] == shape for j in beside
            ):
                raise _Invalid(f"head {name} {list(shape)} does not follow its weight's first dimension")
    weights = [shape for name, shape in shapes if name.endswith("weight")]
    last = list(weights[-1]) if weights else []
    if len(last) != 2 or last[0] != labels or last[1] < 1:
        raise _Invalid(f"the head's last weight is {last or 'missing'}, not ({labels} labels, hidden)")


def _first_over(values: torch.Tensor, bound: float) -> int | None:
    """Index of the first of ``values`` above ``bound`` (None if none is)."""
    over = (values > bound).nonzero()
    return int(over[0, 0]) if len(over) else None


def _owner(names: list[str], counts: list[int], index: int) -> str:
    """Which of ``names`` (holding ``counts`` consecutive elements each) holds element ``index``."""
    return names[bisect.bisect_right(list(itertools.accumulate(counts)), index)]


def _factor_counts(layout: _Layout) -> tuple[list[str], list[int]]:
    """Every factor in storage order ('<target> (u)', then '(v)') and its number of stored parameters."""
    names, counts = [], []
    for key, (n, m, k) in layout.targets.items():
        for side, dim in zip(SIDES, (n, m), strict=True):
            names.append(f"{key} ({side})")
            counts.append(sum(math.prod(s) for _, s in factor_params(layout.variant, dim, k, layout.layers)))
    return names, counts


def _check_factors(layout: _Layout, params: torch.Tensor) -> None:
    """Float factor parameters: |θ| ≤ SCALE_MAX per angle, Σx² ≤ TAYLOR_NORM2_MAX per Taylor factor."""
    names, counts = _factor_counts(layout)
    values = params.double()
    if layout.variant == "pauli":
        index = _first_over(values.abs(), SCALE_MAX)
        if index is not None:
            owner = _owner(names, counts, index)
            raise _Invalid(f"angle {float(values[index]):.3g} of {owner} is outside ±{SCALE_MAX:g}")
        return
    ends = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.long)
    sums = torch.cat([torch.zeros(1, dtype=torch.float64), (values * values).cumsum(0)])
    norms = sums[ends] - sums[torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]])]
    index = _first_over(norms, TAYLOR_NORM2_MAX)
    if index is not None:
        raise _Invalid(
            f"Taylor parameters of {names[index]}: Σx² = {float(norms[index]):.3g} exceeds {TAYLOR_NORM2_MAX:g}"
        )


def _active_targets(layout: _Layout, keep: torch.Tensor) -> torch.Tensor:
    """The index (canonical order) of the target of every active λ."""
    ranks = torch.tensor([k for _, _, k in layout.targets.values()], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(ranks)), ranks)[keep]


def _all_lambdas(active: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Every λ (Σ K, fp32) from the active ones: a masked λ is 0."""
    full = torch.zeros(len(keep))
    full[keep] = active.float()
    return full


def _check_scales(
    what: str,
    names: list[str],
    bits: int,
    scales: torch.Tensor,
    values: torch.Tensor,
    owners: torch.Tensor,
    *,
    alpha: float = 1.0,
) -> None:
    """Scales of scaled codes (``what``: λ per target, or head per weight row, named by ``names``): not negative,
    q·s (the largest |x| a code gives; for λ also |α·λ|) within SCALE_MAX, and s = max|x̂|/q exactly (a code at
    ±q, or s = 0), so that re-writing a file gives the same values; ``owners`` maps each value to its scale."""
    negative = torch.signbit(scales).nonzero()
    if len(negative):
        index = int(negative[0, 0])
        raise _Invalid(f"{what} scale of {names[index]}: {float(scales[index]):.3g} is negative")
    top = scales * scaled_levels(bits)  # q·s: the largest |x| a code decodes to
    index = _first_over(top.double() * max(1.0, abs(alpha)), SCALE_MAX)
    if index is not None:
        raise _Invalid(
            f"{what} scale of {names[index]}: {float(scales[index]):.3g} (α = {alpha:g}) lets |{what}| or "
            f"|α·{what}| exceed {SCALE_MAX:g}"
        )
    largest = torch.zeros(len(scales)).scatter_reduce(0, owners, values.abs(), "amax")
    off = (largest != top).nonzero()
    if len(off):
        index = int(off[0, 0])
        raise _Invalid(
            f"{what} scale of {names[index]}: {float(scales[index]):.3g} is not max|{what}|/q of its codes "
            "(no code reaches ±q)"
        )


def _check_magnitudes(
    layout: _Layout, alpha: float, params: torch.Tensor | None, lams: torch.Tensor, head: torch.Tensor | None
) -> None:
    """Refuse values outside the bounds of docs/FORMAT.md (no accepted file computes Inf or NaN)."""
    if not abs(alpha) <= SCALE_MAX:
        raise _Invalid(f"alpha {alpha:.3g} is outside ±{SCALE_MAX:g}")
    scaled = lams.double().abs() * max(1.0, abs(alpha))  # bounds |λ| and |α·λ| at once
    index = _first_over(scaled, SCALE_MAX)
    if index is not None:
        owner = _owner(list(layout.targets), [d[2] for d in layout.targets.values()], index)
        raise _Invalid(
            f"λ of {owner}: {float(lams[index]):.3g} (α = {alpha:g}) puts |λ| or |α·λ| above {SCALE_MAX:g}"
        )
    if params is not None:
        _check_factors(layout, params)
    if head is not None and len(head) and float(head.double().abs().max()) > SCALE_MAX:
        raise _Invalid(f"head value {float(head.abs().max()):.3g} is outside ±{SCALE_MAX:g}")


# ------------------------------------------------------------------------------------------------- writing


def _float_tensor(values: list[torch.Tensor], dtype: str, what: str) -> torch.Tensor:
    target = FLOAT_DTYPES[dtype]
    out = (
        torch.cat([v.detach().reshape(-1).to(target) for v in values])
        if values
        else torch.zeros(0, dtype=target)
    )
    if not torch.isfinite(out).all():
        if not all(torch.isfinite(v).all() for v in values):
            raise ConfigError(f"{what} contains NaN or Inf")
        raise ConfigError(f"{what} has values beyond the {dtype} range; use fp32")
    return out


def _check_code_bits(bits: int | None, what: str) -> int | None:
    """None for float values (``FP32_BITS`` means that too), else one of SCALED_BITS (``what``: lambda, head)."""
    if bits is None or (bits == FP32_BITS and not isinstance(bits, bool)):
        return None
    if isinstance(bits, bool) or bits not in SCALED_BITS:
        raise ConfigError(
            f"{what} bits must be one of {', '.join(map(str, SCALED_BITS))} or 32, got {bits!r}"
        )
    return bits


def _scaled_codes(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_scaled`` of one row (a target's λ, a head weight row), its scale moved by one fp32 step where
    that decodes the row exactly: max|x̂|/q can miss s by a step, and values already on a b-bit grid (a
    quantisation-aware model's, a file's) stay exact."""
    codes, scale = quantize_scaled(values, bits)
    for candidate in (scale, torch.nextafter(scale, _INF), torch.nextafter(scale, -_INF)):
        if torch.equal(dequantize_scaled(codes, candidate, bits), values):
            return codes, candidate
    return codes, scale


def _encode_lambdas(
    layout: _Layout, lams: list[torch.Tensor], masks: list[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Tensors ``l`` (the active λ, as codes with ``lambda_bits``) and ``s``; the active λ as a reader decodes
    them, and their targets' indices."""
    owners = _active_targets(layout, torch.cat(masks))
    if layout.lambda_bits is None:
        stored = _float_tensor([lam[m] for lam, m in zip(lams, masks, strict=True)], layout.float_dtype, "λ")
        return {"l": stored}, stored.float(), owners
    coded = [
        _scaled_codes(torch.where(m, lam.float(), 0.0), layout.lambda_bits)
        for lam, m in zip(lams, masks, strict=True)
    ]
    codes = torch.cat([c[m] for (c, _), m in zip(coded, masks, strict=True)])
    scales = torch.stack([scale for _, scale in coded])
    active = dequantize_scaled(codes, scales[owners], layout.lambda_bits)
    return {"l": pack_bits(codes, layout.lambda_bits), "s": scales}, active, owners


def _head_row_names(layout: _Layout) -> list[str]:
    """'<head>.<weight> row <r>' of every coded head weight row (the owners of ``hs``)."""
    return [f"{layout.head}.{name} row {r}" for name, shape in layout.coded_head() for r in range(shape[0])]


def _head_owners(layout: _Layout) -> torch.Tensor:
    """The row (index into ``hs``) of every coded head value."""
    widths = torch.tensor([shape[1] for _, shape in layout.coded_head() for _ in range(shape[0])])
    return torch.repeat_interleave(torch.arange(len(widths)), widths)


def _encode_head(
    layout: _Layout, values: list[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Tensors ``h`` (the head tensors not coded, as lambda_dtype) and, with ``head_bits``, ``hc`` and ``hs`` (the
    weights' packed codes and row scales); and those codes unpacked (None without ``head_bits``)."""
    coded = {name for name, _ in layout.coded_head()}
    named = list(zip((name for name, _ in layout.head_shapes), values, strict=True))
    tensors = {"h": _float_tensor([v for n, v in named if n not in coded], layout.float_dtype, "head")}
    if layout.head_bits is None:
        return tensors, None
    rows = [
        _scaled_codes(row, layout.head_bits) for n, v in named if n in coded for row in v.detach().float()
    ]
    codes = torch.cat([c for c, _ in rows])
    tensors |= {"hc": pack_bits(codes, layout.head_bits), "hs": torch.stack([scale for _, scale in rows])}
    return tensors, codes


def _head_from_codes(
    layout: _Layout, plain: torch.Tensor, codes: torch.Tensor | None, scales: torch.Tensor | None
) -> torch.Tensor:
    """The whole head, flat in head order, from its uncoded tensors and (with ``head_bits``) the weights' codes
    and row scales, whose scales are checked; writer and reader both decode through here."""
    if layout.head_bits is None:
        return plain
    owners = _head_owners(layout)
    try:
        coded_values = dequantize_scaled(codes, scales[owners], layout.head_bits)
    except ConfigError as e:
        raise _Invalid(f"head {e}") from None
    _check_scales("head", _head_row_names(layout), layout.head_bits, scales, coded_values, owners)
    coded = {name for name, _ in layout.coded_head()}
    sizes = [(name in coded, math.prod(shape)) for name, shape in layout.head_shapes]
    coded_parts = iter(coded_values.split([size for is_coded, size in sizes if is_coded]))
    plain_parts = iter(plain.split([size for is_coded, size in sizes if not is_coded]))
    return torch.cat([next(coded_parts if is_coded else plain_parts) for is_coded, _ in sizes])


def _check_options(variant: str, bits: int | None, lambda_dtype: str) -> int | None:
    if lambda_dtype not in FLOAT_DTYPES:
        raise ConfigError(f"lambda dtype must be fp16 or fp32, got {lambda_dtype!r}")
    if bits == FP32_BITS:
        bits = None
    if bits is not None and variant != "pauli":
        raise ConfigError(
            "--bits quantises circuit angles only; Taylor parameters are stored like λ (use --lambda-dtype)"
        )
    if bits is not None and (isinstance(bits, bool) or bits not in ANGLE_BITS):
        raise ConfigError(f"angle bits must be one of {', '.join(map(str, ANGLE_BITS))} or 32, got {bits!r}")
    return bits


def _state_tensor(state: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in state:
        raise ConfigError(f"adapter state has no {key}")
    tensor = state[key]
    if tuple(tensor.shape) != tuple(shape):
        raise ConfigError(f"{key}: shape {tuple(tensor.shape)}, the config implies {tuple(shape)}")
    return tensor


def _metadata(config: AdapterConfig, layout: _Layout) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "format_version": str(layout.version),
        "tool": TOOL,
        "variant": config.variant,
        "construction": CONSTRUCTIONS[config.variant],
        "layers": str(config.layers),
        "alpha": repr(float(config.alpha)),
        "seed": str(config.seed),
        "targets": ";".join(layout.groups),
        "lambda_dtype": layout.float_dtype,
    }
    if config.variant == "pauli":
        meta["bits"] = str(layout.bits or FP32_BITS)
    if layout.lambda_bits is not None:
        meta["lambda_bits"] = str(layout.lambda_bits)
    if layout.head_bits is not None:
        meta["head_bits"] = str(layout.head_bits)
    if layout.head is not None:
        meta["head"] = layout.head
        meta["head_shapes"] = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in layout.head_shapes)
        labels = config.labels()
        meta["labels"] = json.dumps(labels, ensure_ascii=False, separators=(",", ":"))
    if layout.has_fingerprint:
        meta["fingerprint"] = ALGORITHM
    if config.extra:
        try:
            meta["extra"] = json.dumps(
                config.extra, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"adapter config extra is not JSON-serialisable: {e}") from None
    return meta


def _check_config(config: AdapterConfig, drop_head: bool) -> str | None:
    if config.variant not in CONSTRUCTIONS:
        raise ConfigError(f"unknown variant {config.variant!r}")
    for name, value, high in (("layers", config.layers, MAX_LAYERS), ("seed", config.seed, MAX_SEED)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise ConfigError(f"adapter {name} must be an integer in [0, {high}], got {value!r}")
    if not math.isfinite(float(config.alpha)):
        raise ConfigError(f"adapter alpha must be finite, got {config.alpha!r}")
    head = None if drop_head else config.head
    if head is not None:
        if head not in HEAD_MODULE_NAMES:
            raise ConfigError(f"head module {head!r} is not one of {', '.join(HEAD_MODULE_NAMES)}")
        labels = config.id2label or {}
        if (
            sorted(labels) != list(range(len(labels)))
            or not labels
            or len(set(labels.values())) != len(labels)
        ):
            raise ConfigError("an adapter with a head needs id2label with ids 0..n-1 and unique names")
    return head


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes as safetensors stores them (little-endian, row-major)."""
    return tensor.numpy().astype(_ST_DTYPES[_TORCH_TO_ST[tensor.dtype]][0], copy=False).tobytes()


def _serialise(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` with ``meta`` and its integrity digest."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta[DIGEST_KEY] = integrity_digest(meta, {k: _tensor_bytes(v) for k, v in tensors.items()})
    return safetensors_bytes(tensors, metadata=meta)


def encode_adapter(
    adapter: AdapterFile,
    *,
    bits: int | None = None,
    lambda_dtype: str = "fp32",
    lambda_bits: int | None = None,
    head_bits: int | None = None,
    drop_head: bool = False,
) -> bytes:
    """The bytes of the .qpeft file of ``adapter`` (see :func:`write_adapter`)."""
    config, state = adapter.config, adapter.state
    bits = _check_options(config.variant, bits, lambda_dtype)
    lambda_bits = _check_code_bits(lambda_bits, "lambda")
    head = _check_config(config, drop_head)
    head_bits = _check_code_bits(head_bits, "head")
    if head_bits is not None and head is None:
        raise ConfigError("head bits given, but the file stores no head")
    groups, targets = _compress_targets(adapter.check())
    params, lams, masks, used = [], [], [], set()
    for key, dims in targets.items():
        shapes, lam_key, mask_key = target_params(config.variant, key, dims, config.layers)
        params += [_state_tensor(state, k, s) for k, s in shapes]
        lams.append(_state_tensor(state, lam_key, (dims[2],)).detach())
        masks.append(_state_tensor(state, mask_key, (dims[2],)).detach() != 0)
        used.update([k for k, _ in shapes] + [lam_key, mask_key])
    head_keys = [k for k in state if k not in used and config.head and k.startswith(config.head + ".")]
    if config.head and not head_keys:
        raise ConfigError(
            f"the config names head {config.head!r} but the state has no {config.head}.* tensors"
        )
    used.update(head_keys)
    head_keys = _head_order(head_keys)
    head_shapes = [(k[len(head) + 1 :], tuple(state[k].shape)) for k in head_keys] if head else []
    has_fp = adapter.fingerprint is not None
    every_active = all(bool(m.all()) for m in masks)
    # the lowest version that holds the adapter
    version = DIGEST_VERSION if lambda_bits is None and every_active else COMPACT_VERSION
    version = MASKLESS_VERSION if version == COMPACT_VERSION and every_active else version
    version = HEAD_CODES_VERSION if head_bits is not None else version
    layout = _Layout(
        config.variant,
        config.layers,
        targets,
        groups,
        bits,
        lambda_dtype,
        head,
        head_shapes,
        has_fp,
        version,
        lambda_bits,
        head_bits,
        has_mask=_stores_mask(version, not every_active),
    )
    if state.keys() - used:
        raise ConfigError(
            f"adapter state has tensors the config does not describe: {sorted(state.keys() - used)[:3]}"
        )

    tensors, active, owners = _encode_lambdas(layout, lams, masks)
    if layout.has_mask:
        tensors["m"] = pack_bits(torch.cat(masks).long(), 1)
    if bits is not None:
        tensors["a"] = pack_bits(
            quantize_angles(torch.cat([p.detach().reshape(-1) for p in params]), bits), bits
        )
    else:
        dtype = lambda_dtype if config.variant == "taylor" else "fp32"
        tensors["a"] = _float_tensor(params, dtype, "factor parameters")
    head_codes = None
    if head:
        head_tensors, head_codes = _encode_head(layout, [state[k] for k in head_keys])
        tensors |= head_tensors
    if has_fp:
        if set(adapter.fingerprint) != set(targets):
            raise ConfigError("the fingerprint must have one digest per target")
        if any(len(adapter.fingerprint[k]) != DIGEST_SIZE for k in targets):
            raise ConfigError(f"fingerprint digests must be {DIGEST_SIZE} bytes")
        digests = b"".join(adapter.fingerprint[k] for k in targets)
        tensors["f"] = torch.frombuffer(bytearray(digests), dtype=torch.uint8).reshape(
            len(targets), DIGEST_SIZE
        )
    try:
        if head:
            _check_head_shapes(head_shapes, len(config.labels()), FORMAT_VERSION)
        decoded_head = (
            _head_from_codes(layout, tensors["h"].float(), head_codes, tensors.get("hs")) if head else None
        )
        if lambda_bits is not None:
            _check_scales(
                "λ", list(targets), lambda_bits, tensors["s"], active, owners, alpha=float(config.alpha)
            )
        floats = tensors["a"] if bits is None else None
        full = _all_lambdas(active, torch.cat(masks))
        _check_magnitudes(layout, float(config.alpha), floats, full, decoded_head)
    except _Invalid as e:
        raise ConfigError(str(e)) from None
    data = _serialise(tensors, _metadata(config, layout))
    if int.from_bytes(data[:8], "little") > MAX_HEADER:
        raise ConfigError(
            f"the adapter's header would exceed {MAX_HEADER} bytes (too many targets or labels)"
        )
    return data


def write_adapter(
    path: str | Path,
    adapter: AdapterFile,
    *,
    bits: int | None = None,
    lambda_dtype: str = "fp32",
    lambda_bits: int | None = None,
    head_bits: int | None = None,
    drop_head: bool = False,
    overwrite: bool = True,
    protect: Sequence[str | Path] = (),
) -> Path:
    """Write ``adapter`` to a .qpeft file atomically: b-bit angles (None: fp32), λ as b-bit codes with one
    scale per target (``lambda_bits``; None: as lambda_dtype), the head's weights as b-bit codes with one scale
    per row (``head_bits``; None: as lambda_dtype), biases and Taylor parameters as lambda_dtype.
    An existing file is replaced unless ``overwrite`` is False (the CLI's choice); ``protect`` names inputs
    the file may never be, contain or lie in."""
    data = encode_adapter(
        adapter,
        bits=bits,
        lambda_dtype=lambda_dtype,
        lambda_bits=lambda_bits,
        head_bits=head_bits,
        drop_head=drop_head,
    )
    return atomic_file(path, data, overwrite=overwrite, protect=protect)


# ------------------------------------------------------------------------------------------------- reading


def _int(meta: dict[str, str], key: str, low: int, high: int) -> int:
    value = meta[key]
    if not INT.fullmatch(value) or not low <= int(value) <= high:
        raise _Invalid(f"metadata {key}={value[:40]!r} is not an integer in [{low}, {high}]")
    return int(value)


def _check_identity(meta: object, header: dict) -> dict[str, str]:
    """Refuse files that are not .qpeft (or are from a newer format) with a message saying what they are."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        names = " ".join(k for k in header if k != "__metadata__")
        if "lora_" in names:
            raise _Invalid("is a PEFT LoRA adapter, not a .qpeft file (convert it with `qpeft import lora`)")
        raise _Invalid("is not a .qpeft file (a safetensors file without format=qpeft metadata)")
    if not all(isinstance(v, str) for v in meta.values()):
        raise _Invalid("metadata values must be strings")
    version = meta.get("format_version", "")
    if not re.fullmatch(r"[1-9][0-9]{0,8}", version):
        raise _Invalid(f"format_version {version[:40]!r} is not a positive integer")
    if int(version) > FORMAT_VERSION:
        raise _Invalid(
            f"format version {version} is newer than this reader supports ({FORMAT_VERSION}); "
            "upgrade qpeft-deploy"
        )
    required = _REQUIRED + ((DIGEST_KEY,) if int(version) >= DIGEST_VERSION else ())
    optional = _OPTIONAL + (_COMPACT_OPTIONAL if int(version) >= COMPACT_VERSION else ())
    optional += _HEAD_CODES_OPTIONAL if int(version) >= HEAD_CODES_VERSION else ()
    missing = [k for k in required if k not in meta]
    unknown = [k for k in meta if k not in required + optional]
    if missing or unknown:
        raise _Invalid(f"metadata is missing {missing} or has unknown keys {unknown[:3]}")
    return meta


def _min_bits(variant: str, layers: int, dims: tuple[int, int, int], version: int, coded: bool) -> int:
    """A lower bound on one target's data bits (2-bit angles or fp16 Taylor parameters, K mask bits (version 4:
    K λ of at least 2 bits), and fp16 λ before version 3, a scale with λ codes; in version 3 every λ may be
    masked): bounds a config's work."""
    n, m, k = dims
    if variant == "pauli":
        factors = 2 * (circuit_angles(n, layers) + circuit_angles(m, layers))
    else:
        factors = 16 * ((n + m) * k - k * k)
    return factors + k + (16 * k if version < COMPACT_VERSION else 0) + (32 if coded else 0)


def _parse_targets(
    text: str, variant: str, layers: int, data_bytes: int, lambdas: tuple[int, bool]
) -> tuple[list[str], dict[str, tuple[int, int, int]]]:
    """The groups and the targets in canonical order; ``lambdas`` is (format version, λ coded)."""
    groups, targets, needed = text.split(";"), {}, 0
    for group in groups:
        pattern, sep1, rest = group.rpartition(":")
        pattern, sep2, shape = pattern.rpartition(":")
        n_text, x, m_text = shape.partition("x")
        if not (
            sep1 and sep2 and x and INT.fullmatch(n_text) and INT.fullmatch(m_text) and INT.fullmatch(rest)
        ):
            raise _Invalid(f"target group {group[:80]!r} is not 'pattern:NxM:K'")
        n, m, k = int(n_text), int(m_text), int(rest)
        low = 2 if variant == "pauli" else 1
        if not (low <= n <= MAX_DIM and low <= m <= MAX_DIM and 1 <= k <= min(n, m)):
            raise _Invalid(f"target group {group[:80]!r} has an impossible size or rank")
        # every target holds at least one mask bit: the data size bounds the number of targets
        for name in expand_pattern(pattern, max(1, min(MAX_TARGETS, 8 * data_bytes) - len(targets))):
            if name in targets:
                raise _Invalid(f"target {name} is listed twice")
            targets[name] = (n, m, k)
            needed += _min_bits(variant, layers, (n, m, k), *lambdas)
            if needed > 8 * data_bytes:
                raise _Invalid(f"the targets need more than the {data_bytes} data bytes the file holds")
    return groups, targets


def _parse_head(meta: dict[str, str]) -> tuple[str | None, list[tuple[str, tuple[int, ...]]], dict | None]:
    if "head" not in meta:
        if "head_shapes" in meta or "labels" in meta:
            raise _Invalid("head_shapes or labels without a head")
        return None, [], None
    head = meta["head"]
    if head not in HEAD_MODULE_NAMES or "head_shapes" not in meta or "labels" not in meta:
        raise _Invalid(
            f"head {head[:40]!r} is not one of {', '.join(HEAD_MODULE_NAMES)} or lacks head_shapes/labels"
        )
    shapes = []
    for item in meta["head_shapes"].split(";"):
        name, colon, dims = item.partition(":")
        parts = dims.split("x") if dims else []
        if not (
            colon
            and re.fullmatch(r"[A-Za-z0-9_.]+", name)
            and len(parts) <= 8
            and all(INT.fullmatch(p) for p in parts)
        ):
            raise _Invalid(f"head shape {item[:40]!r} is not 'name:AxB'")
        shapes.append((name, tuple(int(p) for p in parts)))
    if len({n for n, _ in shapes}) != len(shapes):
        raise _Invalid("head_shapes repeats a tensor")
    try:
        labels = strict_json(meta["labels"])
    except ValueError:
        raise _Invalid("labels is not JSON") from None
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(x, str) for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise _Invalid("labels must be a non-empty JSON list of unique strings")
    _check_head_shapes(shapes, len(labels), int(meta["format_version"]))
    return head, shapes, dict(enumerate(labels))


def _parse_config(
    meta: dict[str, str], data_bytes: int, has_mask_tensor: bool
) -> tuple[AdapterConfig, _Layout]:
    """The config and layout the metadata describe (``has_mask_tensor``: the file holds ``m``, which a
    version-5 file does only when some λ is masked)."""
    variant = meta["variant"]
    if CONSTRUCTIONS.get(variant) != meta["construction"]:
        raise _Invalid(f"unknown variant/construction {variant[:20]!r}/{meta['construction'][:40]!r}")
    layers = _int(meta, "layers", 0, MAX_LAYERS)
    if not _FLOAT.fullmatch(meta["alpha"]) or not math.isfinite(float(meta["alpha"])):
        raise _Invalid(f"alpha {meta['alpha'][:40]!r} is not a finite number")
    if meta["lambda_dtype"] not in FLOAT_DTYPES:
        raise _Invalid(f"lambda_dtype {meta['lambda_dtype'][:20]!r} is not fp16 or fp32")
    bits = None
    if variant == "pauli":
        if "bits" not in meta:
            raise _Invalid("a pauli adapter needs bits")
        bits = _int(meta, "bits", 2, FP32_BITS)
        if bits not in ANGLE_BITS + (FP32_BITS,):
            raise _Invalid(f"bits={bits} is not one of {ANGLE_BITS + (FP32_BITS,)}")
        bits = None if bits == FP32_BITS else bits
    elif "bits" in meta:
        raise _Invalid("Taylor parameters cannot be angle-quantised (bits given)")
    lambda_bits = None
    if "lambda_bits" in meta:
        lambda_bits = _int(meta, "lambda_bits", min(SCALED_BITS), max(SCALED_BITS))
    head_bits = None
    if "head_bits" in meta:
        head_bits = _int(meta, "head_bits", min(SCALED_BITS), max(SCALED_BITS))
        if "head" not in meta:
            raise _Invalid("head_bits without a head")
    version = int(meta["format_version"])
    groups, targets = _parse_targets(
        meta["targets"], variant, layers, data_bytes, (version, lambda_bits is not None)
    )
    head, head_shapes, id2label = _parse_head(meta)
    if meta.get("fingerprint", ALGORITHM) != ALGORITHM:
        raise _Invalid(f"unknown fingerprint algorithm {meta['fingerprint'][:40]!r}")
    extra = {}
    if "extra" in meta:
        try:
            extra = strict_json(meta["extra"])
        except ValueError:
            raise _Invalid("extra is not JSON") from None
        if not isinstance(extra, dict):
            raise _Invalid("extra must be a JSON object")
    config = AdapterConfig(
        {k: d[2] for k, d in targets.items()},
        layers,
        float(meta["alpha"]),
        variant,
        head,
        id2label,
        _int(meta, "seed", 0, MAX_SEED),
        extra,
    )
    layout = _Layout(
        variant,
        layers,
        targets,
        groups,
        bits,
        meta["lambda_dtype"],
        head,
        head_shapes,
        "fingerprint" in meta,
        version,
        lambda_bits,
        head_bits,
        has_mask=_stores_mask(version, has_mask_tensor),
    )
    return config, layout


def _shape_fits(name: str, got: list[int], shape: list[int], version: int) -> bool:
    """The shape the config implies; from version 3 ``l`` may hold fewer (the mask's count is checked later)."""
    if name == "l" and version >= COMPACT_VERSION:
        return len(got) == 1 and 0 <= got[0] <= shape[0]
    return got == shape


def _check_tensors(header: dict, layout: _Layout, data_len: int, path: Path) -> dict[str, tuple[int, int]]:
    """(begin, end) of every tensor, after checking names, dtypes, shapes and that offsets tile the data."""
    expected = layout.tensors()
    names = set(header) - {"__metadata__"}
    if names != set(expected):
        raise _Invalid(f"tensors {sorted(names)[:6]} do not match the config's {sorted(expected)}")
    spans = {}
    for name, (dtype, shape) in expected.items():
        try:
            got_dtype, got_shape, begin, end = tensor_entry(path, header, name)
        except FormatError as e:
            raise _Invalid(str(e).removeprefix(f"{path}: ")) from None
        if got_dtype != dtype or not _shape_fits(name, got_shape, shape, layout.version):
            raise _Invalid(f"tensor {name!r} is {got_dtype}{got_shape}, the config implies {dtype}{shape}")
        if end - begin != math.prod(got_shape) * _ST_DTYPES[dtype][1]:
            raise _Invalid(f"tensor {name!r} has data_offsets that disagree with its shape")
        spans[name] = (begin, end)
    position = 0
    for begin, end in sorted(spans.values()):
        if begin != position:
            raise _Invalid("tensor data_offsets leave gaps or overlap")
        position = end
    if position != data_len:
        raise _Invalid(f"tensor data covers {position} bytes but the file holds {data_len}")
    return spans


def _array(data: bytes, span: tuple[int, int], dtype: str, what: str) -> torch.Tensor:
    np_dtype, size = _ST_DTYPES[dtype]
    array = np.frombuffer(data, dtype=np_dtype, count=(span[1] - span[0]) // size, offset=span[0])
    tensor = torch.from_numpy(array.copy())
    if tensor.is_floating_point():
        tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            raise _Invalid(f"{what} contains NaN or Inf")
    return tensor


def _check_digest(meta: dict[str, str], data: bytes, spans: dict[str, tuple[int, int]]) -> None:
    """Refuse a file whose metadata or tensor bytes differ from what its writer digested."""
    stored = meta[DIGEST_KEY]
    if not _DIGEST_VALUE.fullmatch(stored):
        raise _Invalid(f"digest {stored[:48]!r} is not {DIGEST_ALGORITHM}:<32 lowercase hex digits>")
    if integrity_digest(meta, {name: data[b:e] for name, (b, e) in spans.items()}) != stored:
        raise _Invalid("integrity digest mismatch: the file was corrupted or edited after it was written")


def _read_data(path: Path, start: int, size: int) -> bytes:
    """The data section (everything after the header); its length was checked against the config."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(size - start)
    except OSError as e:
        raise _Invalid(f"cannot read: {e.strerror or e}") from None
    if len(data) != size - start:
        raise _Invalid("file changed while reading")
    return data


def _lambdas(data: bytes, spans: dict, layout: _Layout, masks: torch.Tensor, alpha: float) -> torch.Tensor:
    """Every λ (Σ K; a masked λ is 0) from ``l`` (every λ before version 3, the active ones since) and ``s``."""
    stored = layout.lambda_count() if layout.version < COMPACT_VERSION else int(masks.sum())
    dtype, shape = layout.lambda_tensor(stored)
    begin, end = spans["l"]
    if end - begin != shape[0] * _ST_DTYPES[dtype][1]:
        raise _Invalid(
            f"tensor 'l' holds {end - begin} bytes, {stored} λ need {shape[0] * _ST_DTYPES[dtype][1]}"
        )
    if layout.lambda_bits is None:
        values = _array(data, spans["l"], dtype, "λ")
        return _all_lambdas(values if layout.version >= COMPACT_VERSION else values[masks], masks)
    try:
        codes = unpack_bits(_array(data, spans["l"], "U8", "λ codes"), layout.lambda_bits, stored)
    except ConfigError as e:
        raise _Invalid(str(e)) from None
    scales = _array(data, spans["s"], "F32", "λ scales")
    owners = _active_targets(layout, masks)
    try:
        active = dequantize_scaled(codes, scales[owners], layout.lambda_bits)
    except ConfigError as e:
        raise _Invalid(f"λ {e}") from None
    _check_scales("λ", list(layout.targets), layout.lambda_bits, scales, active, owners, alpha=alpha)
    return _all_lambdas(active, masks)


def _values(data: bytes, spans: dict, layout: _Layout, alpha: float) -> tuple[torch.Tensor, ...]:
    """Flat angles (or Taylor parameters), λ, masks and head (None without one), padding and finiteness checked."""
    specs = layout.tensors()
    try:
        if layout.bits is None:
            angles = _array(data, spans["a"], specs["a"][0], "factor parameters")
        else:
            codes = unpack_bits(_array(data, spans["a"], "U8", "angles"), layout.bits, layout.angle_count())
            angles = dequantize_angles(codes, layout.bits)
        if not layout.has_mask:
            masks = torch.ones(layout.lambda_count(), dtype=torch.bool)
        else:
            masks = unpack_bits(_array(data, spans["m"], "U8", "mask"), 1, layout.lambda_count()).bool()
    except ConfigError as e:
        raise _Invalid(str(e)) from None
    lams = _lambdas(data, spans, layout, masks, alpha)
    return angles, lams, masks, _head(data, spans, layout)


def _head(data: bytes, spans: dict, layout: _Layout) -> torch.Tensor | None:
    """The whole head, flat in head order (None without one), from ``h`` and, with ``head_bits``, ``hc``/``hs``."""
    if layout.head is None:
        return None
    plain = _array(data, spans["h"], layout.tensors()["h"][0], "head")
    if layout.head_bits is None:
        return plain
    try:
        codes = unpack_bits(
            _array(data, spans["hc"], "U8", "head codes"), layout.head_bits, layout.coded_count()
        )
    except ConfigError as e:
        raise _Invalid(f"head codes: {e}") from None
    return _head_from_codes(layout, plain, codes, _array(data, spans["hs"], "F32", "head scales"))


def _state(
    layout: _Layout, angles: torch.Tensor, lams: torch.Tensor, masks: torch.Tensor, head: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The adapter state: the flat tensors cut per target (canonical order) and per head tensor."""
    state, a_pos, l_pos = {}, 0, 0
    for key, dims in layout.targets.items():
        params, lam_key, mask_key = target_params(layout.variant, key, dims, layout.layers)
        for name, shape in params:
            state[name] = angles[a_pos : a_pos + math.prod(shape)].reshape(shape)
            a_pos += math.prod(shape)
        state[lam_key] = lams[l_pos : l_pos + dims[2]]
        state[mask_key] = masks[l_pos : l_pos + dims[2]]
        l_pos += dims[2]
    h_pos = 0
    for name, shape in layout.head_shapes:
        if f"{layout.head}.{name}" in state:
            raise _Invalid(f"head tensor {name} collides with a target's tensor")
        state[f"{layout.head}.{name}"] = head[h_pos : h_pos + math.prod(shape)].reshape(shape)
        h_pos += math.prod(shape)
    return state


def _decode(path: Path, header: dict, start: int, size: int) -> AdapterFile:
    meta = _check_identity(header.get("__metadata__"), header)
    config, layout = _parse_config(meta, size - start, "m" in header)
    spans = _check_tensors(header, layout, size - start, path)
    data = _read_data(path, start, size)
    if int(meta["format_version"]) >= DIGEST_VERSION:
        _check_digest(meta, data, spans)
    angles, lams, masks, head = _values(data, spans, layout, config.alpha)
    _check_magnitudes(layout, config.alpha, angles if layout.bits is None else None, lams, head)
    state = _state(layout, angles, lams, masks, head)
    fingerprint = None
    if layout.has_fingerprint:
        digests = _array(data, spans["f"], "U8", "fingerprint").numpy().reshape(-1, DIGEST_SIZE)
        fingerprint = {key: row.tobytes() for key, row in zip(layout.targets, digests, strict=True)}
    shapes = {k: d[:2] for k, d in layout.targets.items()}
    return AdapterFile(config, state, shapes, fingerprint, _stored(meta, layout, spans, start, size))


def _stored(meta: dict[str, str], layout: _Layout, spans: dict, start: int, size: int) -> StoredInfo:
    part = {
        "a": "angles",
        "l": "lambda",
        "s": "scales",
        "m": "mask",
        "h": "head",
        "hc": "head_codes",
        "hs": "head_scales",
        "f": "fingerprint",
    }
    nbytes = {"header": start} | {part[n]: e - b for n, (b, e) in spans.items()} | {"total": size}
    parameters = {
        "angles": layout.angle_count(),
        "lambda": layout.lambda_count(),
        "head": layout.head_count(),
    }
    parameters["total"] = sum(parameters.values())
    return StoredInfo(
        format_version=int(meta["format_version"]),
        tool=meta["tool"],
        construction=meta["construction"],
        bits=layout.bits,
        lambda_dtype=layout.float_dtype,
        lambda_bits=layout.lambda_bits,
        head_bits=layout.head_bits,
        groups=tuple(layout.groups),
        parameters=parameters,
        nbytes=nbytes,
        fingerprint_algorithm=meta.get("fingerprint"),
    )


def read_adapter(path: str | Path) -> AdapterFile:
    """Read and fully validate a .qpeft file or a PEFT-native folder (io/peft_native.py); raises
    FormatError("<path>: <problem>") for any defect."""
    path = Path(path)
    if path.is_dir():
        from qpeft_deploy.io.peft_native import read_peft_folder  # it builds on this module

        return read_peft_folder(path)
    header, start, size = read_header(path, MAX_HEADER)
    try:
        return _decode(path, header, start, size)
    except (_Invalid, PatternError) as e:
        raise FormatError(f"{path}: {e}") from None
