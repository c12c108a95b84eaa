"""Robustness of the .qpeft reader against damaged and edited files: ≥ 10,000 mutated files, one run.

Seven real MiniLM adapter files (Pauli K=8 at 4 and 8 bits and fp32, Pauli full rank, Taylor K=8 in fp16 and
fp32, with and without head and fingerprint) are each mutated in 14 ways: bit flips in the header and in each
tensor (a, l, m, h, f), two flips anywhere, truncation, insertion, deletion, structured header JSON edits (with
and without a recomputed digest), value edits with a recomputed digest (hostile magnitudes, NaN/Inf, and
ordinary values: the bounds' job, since a deliberate editor can recompute the digest), and benign
re-serialisations (pretty-printed header, tensors stored in another order). Every file must be refused with a
FormatError or load; a loaded file's logits on a fixed batch are compared with the unmutated file's. Damage
(everything not re-digested) must give bit-identical logits; a re-digested edit may change them but must stay
finite. Counted: refusals, identical loads, changed loads, silent changes (damage that changed the logits),
non-finite logits, other exception types, hangs (a 10 s alarm per file).

    python -m benchmarks.robustness_files [--per-kind 120] [--seed 0]
writes benchmarks/results/robustness_files.json and benchmarks/results/robustness_files.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import struct
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, markdown_table, write_results
from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.attach import adapted_layers, attach, load_adapter_state
from qpeft_deploy.errors import FormatError, QpeftError
from qpeft_deploy.io.model_io import load_adapted_model, save_adapter
from qpeft_deploy.io.qpeft_file import DIGEST_KEY, integrity_digest, read_adapter
from qpeft_deploy.models import load_task_model, load_tokenizer, tokenize

LABELS = {0: "neg", 1: "pos"}
TEXTS = ["a gorgeous, moving film", "dull and far too long", "not bad at all", "the worst plot of the year"]
TAYLOR_TARGETS = r".*attention\.self\.(query|value)"
# name -> (attach options, save options)
VARIANTS = {
    "pauli K=8 4-bit fp16 +head": ({"rank": 8}, {"bits": 4, "lambda_dtype": "fp16"}),
    "pauli K=8 8-bit fp16 -head": ({"rank": 8}, {"bits": 8, "lambda_dtype": "fp16", "drop_head": True}),
    "pauli K=8 fp32 +head": ({"rank": 8}, {"lambda_dtype": "fp32"}),
    "pauli full rank 4-bit fp16 +head": ({"rank": "full"}, {"bits": 4, "lambda_dtype": "fp16"}),
    "taylor K=8 fp16 +head": (
        {"rank": 8, "variant": "taylor", "targets": TAYLOR_TARGETS},
        {"lambda_dtype": "fp16"},
    ),
    "taylor K=8 fp32 -head": (
        {"rank": 8, "variant": "taylor", "targets": TAYLOR_TARGETS},
        {"lambda_dtype": "fp32", "drop_head": True},
    ),
    "pauli K=8 2-bit fp16 +head, no fingerprint": (
        {"rank": 8},
        {"bits": 2, "lambda_dtype": "fp16", "base": None},
    ),
}
DAMAGE = ["flip header", "flip a", "flip l", "flip m", "flip h", "flip f", "flip 2 anywhere", "truncate"]
DAMAGE += ["insert", "delete", "header edit"]
REDIGESTED = ["header edit, re-digested", "value edit, re-digested"]
BENIGN = ["re-serialise"]
KINDS = DAMAGE + REDIGESTED + BENIGN
HOSTILE = [1e30, -1e30, 3.4028234663852886e38, -3.4028234663852886e38, float("inf"), float("nan"), 65504.0]
HOSTILE += [-65504.0, 65505.0, 1e5, 300.0, 1e-40]
ALPHAS = ["1e308", "-1e308", "65504", "65505", "1e5", "-3", "0", "1e-300", "2.5", "nan", "inf"]
META_VALUES = [
    "",
    "0",
    "1",
    "2",
    "3",
    "4",
    "8",
    "16",
    "32",
    "fp16",
    "fp32",
    "pauli",
    "taylor",
    "1e999",
    "-0.5",
]
META_VALUES += [
    '["a"]',
    '["a","b","c"]',
    "[]",
    "{}",
    "weight:384x2;bias:2",
    "bias:2;weight:2x384",
    "blake2b-8",
]
TIMEOUT_S = 10


class Hang(Exception):
    """A file took longer than TIMEOUT_S."""


def _alarm(signum: int, frame: object) -> None:
    raise Hang


# ------------------------------------------------------------------------------------------------- files


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes, indent: int | None = None) -> bytes:
    raw = json.dumps(header, indent=indent).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def redigest(data: bytes) -> bytes:
    """The file with its digest recomputed (what a deliberate editor does); unchanged if it no longer parses."""
    try:
        header, body = split(data)
        spans = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
        meta = header["__metadata__"]
        meta[DIGEST_KEY] = integrity_digest(meta, {k: body[b:e] for k, (b, e) in spans.items()})
        return join(header, body)
    except (ValueError, KeyError, TypeError, AttributeError, struct.error):
        return data


def flip(data: bytearray, low: int, high: int, rng: random.Random, count: int) -> bytes:
    for _ in range(count):
        at = rng.randrange(low, high)
        data[at] ^= 1 << rng.randrange(8)
    return bytes(data)


def header_edit(data: bytes, rng: random.Random) -> bytes:
    """One structured edit of the header JSON: a metadata value, a dropped or swapped key, a tensor entry."""
    header, body = split(data)
    meta = header["__metadata__"]
    what = rng.choice(["value", "value", "drop", "swap", "dtype", "shape", "offsets", "targets", "head"])
    tensors = sorted(k for k in header if k != "__metadata__")
    if what == "value":
        meta[rng.choice(sorted(meta))] = rng.choice(META_VALUES + ALPHAS)
    elif what == "drop":
        meta.pop(rng.choice(sorted(meta)))
    elif what == "swap":
        a, b = rng.sample(sorted(meta), 2)
        meta[a], meta[b] = meta[b], meta[a]
    elif what == "dtype":
        header[rng.choice(tensors)]["dtype"] = rng.choice(["F16", "F32", "U8", "BF16", "I64"])
    elif what == "shape":
        entry = header[rng.choice(tensors)]
        entry["shape"] = [d + rng.choice([-1, 1]) for d in entry["shape"]]
    elif what == "offsets":
        entry = header[rng.choice(tensors)]
        entry["data_offsets"] = [o + rng.choice([-2, -1, 1, 2]) for o in entry["data_offsets"]]
    elif what == "targets":  # the canonical order changes: a different mapping of the same bytes
        groups = meta["targets"].split(";")
        rng.shuffle(groups)
        meta["targets"] = ";".join(groups)
    elif "head_shapes" in meta:  # reordered or transposed head shapes
        items = meta["head_shapes"].split(";")
        meta["head_shapes"] = (
            ";".join(reversed(items)) if rng.random() < 0.5 else meta["head_shapes"].replace("2x384", "384x2")
        )
    return join(header, body)


def value_edit(data: bytes, rng: random.Random) -> bytes:
    """Float elements of a, l or h (or α) set to hostile or ordinary values, digest recomputed."""
    header, body = split(data)
    floats = [k for k in ("a", "l", "h") if k in header and header[k]["dtype"] in ("F16", "F32")]
    if rng.random() < 0.2 or not floats:
        header["__metadata__"]["alpha"] = rng.choice(ALPHAS)
        return redigest(join(header, body))
    name = rng.choice(floats)
    dtype = "<f2" if header[name]["dtype"] == "F16" else "<f4"
    begin, end = header[name]["data_offsets"]
    values = np.frombuffer(body[begin:end], dtype=dtype).copy()
    for _ in range(rng.choice([1, 1, 2, 8])):
        ordinary = rng.gauss(0, 1) * 10 ** rng.uniform(-3, 3)
        with np.errstate(over="ignore"):
            values[rng.randrange(len(values))] = rng.choice(HOSTILE) if rng.random() < 0.6 else ordinary
    return redigest(join(header, body[:begin] + values.tobytes() + body[end:]))


def reserialise(data: bytes, rng: random.Random) -> bytes:
    """The same content stored differently: a pretty-printed header, or the tensors in another order."""
    header, body = split(data)
    if rng.random() < 0.5:
        return join(dict(reversed(list(header.items()))), body, indent=rng.choice([1, 2, 4]))
    names = sorted(k for k in header if k != "__metadata__")
    rng.shuffle(names)
    chunks, position = [], 0
    for name in names:
        begin, end = header[name]["data_offsets"]
        chunks.append(body[begin:end])
        header[name]["data_offsets"] = [position, position + end - begin]
        position += end - begin
    return join(header, b"".join(chunks))


def mutate(data: bytes, kind: str, rng: random.Random) -> bytes:
    """One mutated copy of ``data``."""
    start = 8 + struct.unpack("<Q", data[:8])[0]
    if kind == "flip header":
        return flip(bytearray(data), 0, start, rng, rng.choice([1, 1, 2, 3]))
    if kind.startswith("flip ") and len(kind) == 6:
        begin, end = split(data)[0][kind[-1]]["data_offsets"]
        return flip(bytearray(data), start + begin, start + end, rng, rng.choice([1, 1, 2, 3]))
    if kind == "flip 2 anywhere":
        return flip(bytearray(data), 0, len(data), rng, 2)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "insert":
        at = rng.randrange(len(data) + 1)
        return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]
    if kind == "delete":
        at = rng.randrange(len(data))
        return data[:at] + data[at + rng.randint(1, 16) :]
    if kind == "header edit":
        return header_edit(data, rng)
    if kind == "header edit, re-digested":
        return redigest(header_edit(data, rng))
    if kind == "value edit, re-digested":
        return value_edit(data, rng)
    return reserialise(data, rng)


# ------------------------------------------------------------------------------------------------- logits


class Checker:
    """One loaded model per variant; an accepted file's adapter is swapped in to compute its logits."""

    def __init__(self, path: Path, inputs: dict):
        self.path, self.inputs = path, inputs
        self.model = load_adapted_model("minilm", path)
        self.adapter = read_adapter(path)
        self.reference = self.outputs(self.model)

    def outputs(self, model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = model(**self.inputs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    def logits(self, adapter: AdapterFile, path: Path) -> torch.Tensor:
        """The outputs with ``adapter`` (read from ``path``) loaded: swapped in when its structure matches."""
        config = self.adapter.config
        new = adapter.config
        same_structure = (new.targets, new.layers, new.variant, new.head, len(new.labels())) == (
            config.targets,
            config.layers,
            config.variant,
            config.head,
            len(config.labels()),
        )
        if not same_structure or adapter.shapes != self.adapter.shapes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self.outputs(load_adapted_model("minilm", path, force=True))
        layers = adapted_layers(self.model).values()
        try:
            load_adapter_state(self.model, adapter.state)
            for layer in layers:
                layer.alpha = new.alpha
            return self.outputs(self.model)
        finally:
            load_adapter_state(self.model, self.adapter.state)
            for layer in layers:
                layer.alpha = config.alpha


def outcome(checker: Checker, path: Path, kind: str) -> tuple[str, str | None]:
    """(outcome, refusal reason) of one mutated file."""
    signal.alarm(TIMEOUT_S)
    try:
        out = checker.logits(read_adapter(path), path)
    except FormatError as e:
        return "refused", re.sub(r"-?\d[\d.e+-]*", "#", str(e).removeprefix(f"{path}: "))[:48]
    except QpeftError as e:  # a valid file that does not fit the base (a re-digested edit): one-line error
        return f"refused at load: {type(e).__name__}: {str(e)[:80]}", None
    except Hang:
        return "hang", None
    except Exception as e:  # noqa: BLE001 - counting every other exception type is the point
        return f"other error: {type(e).__name__}: {str(e)[:80]}", None
    finally:
        signal.alarm(0)
    if not torch.isfinite(out).all():
        return "non-finite logits", None
    if torch.equal(out, checker.reference):
        return "loaded, identical", None
    return ("loaded, changed (re-digested edit)" if kind in REDIGESTED else "silent change"), None


# ------------------------------------------------------------------------------------------------- run


def original_file(name: str, folder: Path) -> Path:
    """The unmutated file of variant ``name`` (random λ, head and Taylor parameters, seeded)."""
    options, save = VARIANTS[name]
    model = attach(load_task_model("minilm", LABELS), **({"targets": "all-linear"} | options))
    g = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("spectrum.lam") or key.startswith("classifier."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif key.endswith((".u.b", ".v.b")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = folder / (re.sub(r"[^a-z0-9]+", "-", name.lower()) + ".qpeft")
    return save_adapter(model, path, **({"base": "minilm"} | save))


def run(per_kind: int, seed: int) -> dict:
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(seed)
    inputs = tokenize(load_tokenizer("minilm"), TEXTS)
    rows, reasons, errors = [], Counter(), []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in VARIANTS:
            original = original_file(name, folder)
            checker, data = Checker(original, inputs), original.read_bytes()
            header = split(data)[0]
            for kind in KINDS:
                if kind.startswith("flip ") and len(kind) == 6 and kind[-1] not in header:
                    continue
                counts = Counter()
                for i in range(per_kind):
                    path = folder / "mutated.qpeft"
                    mutated = mutate(data, kind, rng)
                    path.write_bytes(mutated)
                    result, reason = outcome(checker, path, kind) if mutated != data else ("no-op", None)
                    counts[result.split(":")[0]] += 1
                    if reason:
                        reasons[reason] += 1
                    if result.startswith(("other error", "refused at load")) and len(errors) < 20:
                        errors.append(f"{name} / {kind}: {result}")
                rows.append({"variant": name, "kind": kind, "bytes": len(data), "files": per_kind} | counts)
            print(f"{name}: {sum(r['files'] for r in rows if r['variant'] == name)} files", flush=True)
    return {
        "rows": rows,
        "reasons": reasons.most_common(40),
        "errors": errors,
        "seconds": time.perf_counter() - start,
    }


COLUMNS = [
    "no-op",
    "refused",
    "refused at load",
    "loaded, identical",
    "loaded, changed (re-digested edit)",
    "silent change",
]
COLUMNS += ["non-finite logits", "other error", "hang"]


def totals(rows: list[dict], key: str) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for row in rows:
        out.setdefault(row[key], Counter()).update({c: row.get(c, 0) for c in ["files"] + COLUMNS})
    return {k: dict(v) for k, v in out.items()}


def report(result: dict, machine: dict, per_kind: int, seed: int) -> tuple[dict, str]:
    rows = result["rows"]
    overall = Counter()
    for row in rows:
        overall.update({c: row.get(c, 0) for c in ["files"] + COLUMNS})
    data = {
        "machine": machine,
        "per_kind": per_kind,
        "seed": seed,
        "timeout_s": TIMEOUT_S,
        "seconds": round(result["seconds"], 1),
        "total": dict(overall),
        "by_kind": totals(rows, "kind"),
        "by_variant": totals(rows, "variant"),
        "rows": rows,
        "refusal_reasons": result["reasons"],
        "other_errors": result["errors"],
    }
    head = [
        "",
        "files",
        "no-op",
        "refused",
        "refused at load",
        "identical",
        "changed (re-digested)",
        "silent",
        "non-finite",
        "other",
        "hangs",
    ]

    def line(label: str, c: dict) -> list:
        return [label, c["files"]] + [c.get(col, 0) for col in COLUMNS]

    md = "## Robustness of .qpeft reading (mutated files)\n\n"
    md += (
        f"{overall['files']:,} mutated files from {len(VARIANTS)} MiniLM adapter files, "
        f"{result['seconds']:.0f} s on {machine['cpu_model']} ({machine['cpu_count']} cores, 1 torch thread, "
        f"load {', '.join(f'{x:.1f}' for x in machine['load_average_1_5_15min'] or [])}); "
        f"a {TIMEOUT_S} s timeout per file. Damage must be refused or give bit-identical logits; a re-digested "
        "edit may change the logits but must keep them finite. No-op: the mutation left the bytes unchanged.\n\n"
    )
    md += markdown_table(
        head, [line(k, c) for k, c in data["by_kind"].items()] + [line("**total**", overall)]
    )
    md += "\n" + markdown_table(head, [line(k, c) for k, c in data["by_variant"].items()])
    md += "\nMost frequent refusals (numbers as #):\n\n"
    md += markdown_table(["reason", "files"], [[f"`{r}`", n] for r, n in result["reasons"][:12]])
    return data, md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=120, help="Mutated files per variant and kind.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    machine = machine_info()
    result = run(args.per_kind, args.seed)
    machine["load_average_1_5_15min_after"] = machine_info()["load_average_1_5_15min"]
    data, md = report(result, machine, args.per_kind, args.seed)
    write_results("robustness_files", data, md)
    print(md)


if __name__ == "__main__":
    main()
