"""Size of a .qpeft file vs a PEFT LoRA adapter on the same targets, both measured in this run.

Peer: real ``peft`` LoRA (r = 8 and r = 2, ``target_modules="all-linear"``, ``task_type="SEQ_CLS"``, so the
same 37 MiniLM linear layers plus the classifier head) saved with ``save_pretrained``; we count the bytes of
``adapter_model.safetensors``. Ours: ``save_adapter`` on MiniLM with all-linear targets for several
(K, L, bits, λ/head dtype, λ codes, head codes, head, fingerprint), with the bytes split into header / angles / λ / scales /
mask / head / fingerprint as ``read_adapter`` reports them.

    python -m benchmarks.filesize [--ranks 1 4 8 16 full] [--layers 1 2 4]
writes benchmarks/results/filesize.json and benchmarks/results/filesize.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine_info, markdown_table, write_results
from qpeft_deploy.core.attach import attach
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.io.qpeft_file import read_adapter
from qpeft_deploy.models import load_task_model

LABELS = {0: "rotten", 1: "fresh"}
# (bits, λ/head dtype, head, fingerprint, λ bits, head bits) saved from each (K, L) model; bits None = fp32
# angles, λ bits None = λ in the λ/head dtype (format version 2), else b-bit λ codes (version 4); head bits: the
# head's weights as b-bit row codes (version 5)
VARIANTS = [
    (4, "fp16", True, True, None, None),
    (4, "fp16", False, True, None, None),
    (4, "fp16", True, False, None, None),
    (2, "fp16", True, True, None, None),
    (8, "fp16", True, True, None, None),
    (16, "fp16", True, True, None, None),
    (None, "fp32", True, True, None, None),
]
# λ and head codes: what makes full rank small (the studies' compact settings: 4-bit angles + 4-bit λ, 6 + 3,
# and 6 + 3 with an 8-bit head, the recommended one)
LAMBDA_CODES = [
    (4, "fp16", True, True, 4, None),
    (6, "fp16", True, True, 3, None),
    (6, "fp16", True, True, 3, 8),
    (4, "fp16", True, True, 2, None),
]


def lora_bytes(rank: int, folder: Path) -> int:
    """Bytes of adapter_model.safetensors of a real PEFT LoRA on MiniLM (all-linear, SEQ_CLS)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load_task_model("minilm", LABELS),
        LoraConfig(r=rank, target_modules="all-linear", task_type="SEQ_CLS"),
    )
    model.save_pretrained(str(folder))
    return (folder / "adapter_model.safetensors").stat().st_size


def adapted(rank: int | str, layers: int) -> torch.nn.Module:
    """MiniLM with an all-linear adapter whose λ is random (sizes do not depend on the values)."""
    model = attach(load_task_model("minilm", LABELS), "all-linear", rank=rank, layers=layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("spectrum.lam"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return model


def measure(ranks: list[int | str], layers: list[int], folder: Path) -> tuple[dict, list[dict]]:
    """LoRA sizes and one row per saved .qpeft file."""
    lora = {f"r{r}": lora_bytes(r, folder / f"lora{r}") for r in (8, 2)}
    rows = []
    shapes = [(k, 1) for k in ranks] + [(8, L) for L in layers if L != 1]
    for rank, depth in shapes:
        model = adapted(rank, depth)
        variants = VARIANTS if (rank, depth) == (8, 1) else VARIANTS[:2]
        if depth == 1 and rank in (8, "full"):
            variants = variants + LAMBDA_CODES
        for bits, dtype, head, fingerprint, lambda_bits, head_bits in variants:
            path = save_adapter(
                model,
                folder / "a.qpeft",
                bits=bits,
                lambda_dtype=dtype,
                lambda_bits=lambda_bits,
                head_bits=head_bits,
                drop_head=not head,
                base="minilm" if fingerprint else None,
            )
            info = read_adapter(path).stored
            size = info.nbytes["total"]
            rows.append(
                {
                    "K": rank,
                    "L": depth,
                    "bits": bits or 32,
                    "lambda_dtype": dtype,
                    "lambda_bits": lambda_bits,
                    "head_bits": head_bits,
                    "head": head,
                    "fingerprint": fingerprint,
                    "parameters": info.parameters["total"],
                    "bytes": size,
                    "parts": {k: v for k, v in info.nbytes.items() if k != "total"},
                    "header_share": info.nbytes["header"] / size,
                    "ratio_vs_lora_r8": lora["r8"] / size,
                    "ratio_vs_lora_r2": lora["r2"] / size,
                }
            )
    return lora, rows


def table(lora: dict, rows: list[dict]) -> str:
    """Markdown table of the rows, with the LoRA peer in the title."""
    headers = ["K", "L", "bits", "λ/head", "λ bits", "head bits", "head", "fp", "params", "bytes", "header %"]
    headers += ["angles"]
    headers += ["λ+scales+mask"]
    headers += ["head B", "× LoRA r8", "× LoRA r2"]
    body = [
        [
            r["K"],
            r["L"],
            r["bits"],
            r["lambda_dtype"],
            r.get("lambda_bits") or "-",
            r.get("head_bits") or "-",
            "yes" if r["head"] else "no",
            "yes" if r["fingerprint"] else "no",
            r["parameters"],
            r["bytes"],
            round(100 * r["header_share"], 1),
            r["parts"]["angles"],
            r["parts"]["lambda"] + r["parts"].get("scales", 0) + r["parts"].get("mask", 0),
            sum(r["parts"].get(k, 0) for k in ("head", "head_codes", "head_scales")),
            round(r["ratio_vs_lora_r8"], 1),
            round(r["ratio_vs_lora_r2"], 1),
        ]
        for r in rows
    ]
    title = (
        f"MiniLM all-linear (37 targets). Peer: PEFT LoRA r=8 {lora['r8']:,} B, r=2 {lora['r2']:,} B "
        "(adapter_model.safetensors, same targets + head).\n\n"
    )
    return title + markdown_table(headers, body)


def main() -> None:
    """Measure, print the table, write JSON + markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", nargs="+", default=["1", "4", "8", "16", "full"])
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 2, 4])
    args = parser.parse_args()
    ranks = [r if r == "full" else int(r) for r in args.ranks]
    with tempfile.TemporaryDirectory() as tmp:
        lora, rows = measure(ranks, args.layers, Path(tmp))
    headline = next(
        (
            r
            for r in rows
            if (r["K"], r["L"], r["bits"], r["head"], r["fingerprint"], r["lambda_bits"], r["head_bits"])
            == (8, 1, 4, True, True, None, None)
        ),
        None,
    )
    md = table(lora, rows)
    if headline is not None:
        md += (
            f"\nHeadline (K=8, L=1, 4-bit angles, fp16 λ and head, fingerprint): {headline['bytes']:,} B, "
            f"{headline['ratio_vs_lora_r8']:.0f}× smaller than LoRA r=8, header "
            f"{100 * headline['header_share']:.1f}% of the file.\n"
        )
    print(md)
    write_results("filesize", {"machine": machine_info(), "lora_bytes": lora, "rows": rows}, md)


if __name__ == "__main__":
    main()
