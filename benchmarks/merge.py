"""Benchmark ``qpeft merge`` against copying the same safetensors files and against PEFT LoRA's merge + save.

    python -m benchmarks.merge                       # MiniLM: all-linear Q-PEFT K=8 vs LoRA r=8, median of 5
    python -m benchmarks.merge --synthetic llama-7b  # and a generated sharded bf16 Llama-7B-shaped checkpoint

MiniLM (warm page cache, one untimed round first, methods timed round-robin so load from other processes
hits all alike): qpeft merge of a head adapter (writes the task model's checkpoint), with its fingerprint
check (the default: hashes every targeted base tensor) and with ``--force`` (no check); ``copy``:
shutil.copyfile of the base's safetensors file; PEFT: ``merge_and_unload()`` + ``save_pretrained`` of the
same task model with LoRA r=8 on the same 37 modules, timed with the model already loaded (``peft
merge+save``) and from files to files (``peft load+merge+save``). Peak RSS is measured in a child process
per method, above its baseline after the imports (VmHWM reset through /proc/self/clear_refs).

``--synthetic NAME`` writes a sharded bf16 checkpoint with Llama shapes (``SHAPES``: llama-7b is 4096/11008,
32 layers, ~13.5 GB; llama-ci is the CI shape, ~115 MB), a K=8 adapter on all 7 projections of every layer
(with the base's fingerprint), and times one qpeft merge (and one with ``--force``) between two copies, each
in a child process (RSS as above). PEFT is not run there (it would hold the 13.5 GB model in memory). All of
it is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.common import machine_info, markdown_table, write_results
from qpeft_deploy.core.adapter import AdapterConfig, AdapterFile
from qpeft_deploy.core.circuit import parameter_count
from qpeft_deploy.io.fingerprint import base_fingerprint
from qpeft_deploy.io.qpeft_file import write_adapter
from qpeft_deploy.io.safetensors import INDEX_FILE, read_checkpoint
from qpeft_deploy.merge.checkpoint import merge_checkpoint
from qpeft_deploy.models import resolve_base

SHAPES = {
    "llama-7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "vocab": 32000, "heads": 32},
    "llama-ci": {"hidden": 1024, "intermediate": 2752, "layers": 2, "vocab": 16000, "heads": 16},
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIN_FREE_BYTES = 40 * 10**9
LABELS = {0: "neg", 1: "pos"}


# -------------------------------------------------------------------------------------- synthetic checkpoints


def llama_tensors(shape: dict[str, int]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor of a LlamaForCausalLM checkpoint, in save order."""
    hidden, inter = shape["hidden"], shape["intermediate"]
    yield "model.embed_tokens.weight", (shape["vocab"], hidden)
    for layer in range(shape["layers"]):
        prefix = f"model.layers.{layer}"
        for name in PROJECTIONS[:4]:
            yield f"{prefix}.self_attn.{name}.weight", (hidden, hidden)
        yield f"{prefix}.mlp.gate_proj.weight", (inter, hidden)
        yield f"{prefix}.mlp.up_proj.weight", (inter, hidden)
        yield f"{prefix}.mlp.down_proj.weight", (hidden, inter)
        yield f"{prefix}.input_layernorm.weight", (hidden,)
        yield f"{prefix}.post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (shape["vocab"], hidden)


def _llama_config(shape: dict[str, int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["heads"],
        "vocab_size": shape["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }


def synthetic_llama(folder: Path, name: str, max_shard_bytes: int = 2 * 10**9, seed: int = 0) -> Path:
    """Write a sharded bf16 LlamaForCausalLM checkpoint of shape ``SHAPES[name]`` (weights ~N(0, 0.02))."""
    folder.mkdir(parents=True)
    shape, generator = SHAPES[name], torch.Generator().manual_seed(seed)
    (folder / "config.json").write_text(json.dumps(_llama_config(shape), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    for key, dims in llama_tensors(shape):
        if len(dims) == 1:
            tensor = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensor = torch.randn(dims, generator=generator, dtype=torch.bfloat16) * 0.02
        if shards[-1] and sum(t.nbytes for t in shards[-1].values()) + tensor.nbytes > max_shard_bytes:
            _save_shard(folder, shards, len(shards) - 1)
            shards.append({})
        shards[-1][key] = tensor
    _save_shard(folder, shards, len(shards) - 1)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for i, shard_name in enumerate(names):
        (folder / f"shard-{i}.tmp").rename(folder / shard_name)
    weight_map = {key: shard_name for shard_name, keys in zip(names, shards) for key in keys}
    total = sum(math.prod(d) * 2 for _, d in llama_tensors(shape))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder


def _save_shard(folder: Path, shards: list[dict[str, torch.Tensor]], i: int) -> None:
    save_file(shards[i], folder / f"shard-{i}.tmp", metadata={"format": "pt"})
    shards[i] = dict.fromkeys(shards[i])  # keep the keys, drop the tensors


def synthetic_adapter(base: Path, path: Path, rank: int = 8, seed: int = 0) -> Path:
    """A Pauli K=``rank`` adapter on every projection of a synthetic Llama (random angles, λ; fingerprint)."""
    tensors = read_checkpoint(base).tensors
    keys = [k.removeprefix("model.") for k in tensors if k.removesuffix(".weight").endswith(PROJECTIONS)]
    generator, state, shapes = torch.Generator().manual_seed(seed), {}, {}
    for key in keys:
        n_out, n_in = tensors["model." + key].shape
        prefix = key.removesuffix(".weight")
        for side, dim in (("u", n_out), ("v", n_in)):
            angles = torch.rand(parameter_count(dim), generator=generator)
            state[f"{prefix}.{side}.theta"] = (angles * 2 - 1) * math.pi
        state[f"{prefix}.spectrum.lam"] = torch.randn(rank, generator=generator) * 0.1
        state[f"{prefix}.spectrum.mask"] = torch.ones(rank, dtype=torch.bool)
        shapes[key] = (n_out, n_in)
    config = AdapterConfig({k: rank for k in keys}, layers=1, alpha=1.0, variant="pauli", seed=seed)
    return write_adapter(path, AdapterFile(config, state, shapes, base_fingerprint(base, keys)))


# -------------------------------------------------------------------------------------------------- methods


def copy_safetensors(base: Path, out: Path) -> None:
    """The peer: copy the base's safetensors files (and index) into a new folder."""
    out.mkdir()
    for file in sorted(base.iterdir()):
        if file.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(file, out / file.name)


def qpeft_merge(base: Path, adapter: Path, out: Path, force: bool = False) -> None:
    """The subject: ``qpeft merge`` through its library function (``force``: no fingerprint check)."""
    merge_checkpoint(str(base), [adapter], out, force=force, quiet=True)


def _load_peft(base: Path, lora: Path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=len(LABELS))
    return PeftModel.from_pretrained(model, str(lora))


def peft_merge_save(model, out: Path) -> None:
    """PEFT's own path: merge_and_unload() and save_pretrained (safetensors)."""
    model.merge_and_unload().save_pretrained(str(out))


def minilm_inputs(work: Path) -> tuple[Path, Path]:
    """A Q-PEFT head adapter (all-linear, K=8, with fingerprint) and a PEFT LoRA r=8 on the same modules."""
    from peft import LoraConfig, get_peft_model

    from qpeft_deploy.core.attach import adapter_config, attach
    from qpeft_deploy.io.model_io import save_adapter
    from qpeft_deploy.models import load_task_model

    generator = torch.Generator().manual_seed(0)
    model = attach(load_task_model("minilm", LABELS), "all-linear", rank=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("spectrum.lam") or name.startswith("classifier."):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    adapter = save_adapter(model, work / "minilm.qpeft", base="minilm")
    modules = [f"bert.{k.removesuffix('.weight')}" for k in adapter_config(model).targets]
    lora = get_peft_model(
        load_task_model("minilm", LABELS),
        LoraConfig(r=8, lora_alpha=8, target_modules=modules, task_type="SEQ_CLS"),
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=generator)
    lora.save_pretrained(str(work / "lora"))
    return adapter, work / "lora"


# ---------------------------------------------------------------------------------------------- measurement


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def import_modeling(base: Path) -> None:
    """Import transformers' modeling code of the base's task model (~80 MB of RSS, whoever needs it)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    model_type = json.loads((base / "config.json").read_text())["model_type"]
    getattr(transformers, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[model_type])


def child(method: str, base: Path, adapter: Path, out: Path) -> dict:
    """Run one method in this (fresh) process: seconds and peak RSS above the baseline after the imports
    (torch, peft, the tool, and transformers' modeling code for the base), alike for every method."""
    import peft  # noqa: F401

    import_modeling(base)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    if method.startswith("qpeft"):
        qpeft_merge(base, adapter, out, force=method == "qpeft-force")
    elif method == "copy":
        copy_safetensors(base, out)
    else:
        peft_merge_save(_load_peft(base, adapter), out)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_rss_bytes": _status_bytes("VmHWM") - baseline}


def run_child(method: str, base: Path, adapter: Path, out: Path) -> dict:
    """:func:`child` in a new Python process (so the peak RSS is this method's alone)."""
    command = [sys.executable, "-m", "benchmarks.merge", "--child", method, str(base), str(adapter), str(out)]
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=root)
    return json.loads(result.stdout.strip().splitlines()[-1])


def round_robin(
    methods: dict[str, tuple[Callable[[], object], Callable[[object], None]]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each method's run(setup()), setup untimed, one call of each per round after ``warmup``."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(warmup + repeats):
        for name, (setup, run) in methods.items():
            argument = setup()
            start = time.perf_counter()
            run(argument)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def largest_tensor(base: Path) -> int:
    """Bytes of the base checkpoint's largest tensor."""
    return max(t.nbytes for t in read_checkpoint(base).tensors.values())


def bench_minilm(work: Path, repeats: int) -> dict:
    """MiniLM: median seconds of each method (warm cache) and each one's extra peak RSS."""
    base = resolve_base("minilm")
    adapter, lora = minilm_inputs(work)
    outputs = iter(work / f"out-{i}" for i in range(10**6))
    methods = {
        "qpeft merge": (lambda: next(outputs), lambda out: qpeft_merge(base, adapter, out)),
        "qpeft merge --force": (lambda: next(outputs), lambda out: qpeft_merge(base, adapter, out, True)),
        "copy": (lambda: next(outputs), lambda out: copy_safetensors(base, out)),
        "peft merge+save": (lambda: (_load_peft(base, lora), next(outputs)), lambda a: peft_merge_save(*a)),
        "peft load+merge+save": (
            lambda: next(outputs),
            lambda out: peft_merge_save(_load_peft(base, lora), out),
        ),
    }
    times = round_robin(methods, repeats)
    rss = {
        "qpeft merge": run_child("qpeft", base, adapter, work / "rss-qpeft"),
        "qpeft merge --force": run_child("qpeft-force", base, adapter, work / "rss-qpeft-force"),
        "copy": run_child("copy", base, adapter, work / "rss-copy"),
        "peft merge+save": run_child("peft", base, lora, work / "rss-peft"),
    }
    return {
        "base": str(base),
        "largest_tensor_bytes": largest_tensor(base),
        "repeats": repeats,
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "samples": times,
        "extra_rss_bytes": {name: r["extra_rss_bytes"] for name, r in rss.items()},
    }


def bench_synthetic(work: Path, name: str) -> dict:
    """One qpeft merge (with and without the fingerprint check) between two copies of a generated
    Llama-shaped bf16 checkpoint, each in a child process (copies first and last: the page cache cannot hold
    base and output together, so the order would bias)."""
    free = shutil.disk_usage(work).free
    if name == "llama-7b" and free < MIN_FREE_BYTES:
        return {"skipped": f"only {free / 1e9:.1f} GB free in {work}; needs {MIN_FREE_BYTES / 1e9:.0f} GB"}
    base, start = work / name, time.perf_counter()
    try:
        synthetic_llama(base, name)
        adapter = synthetic_adapter(base, work / f"{name}.qpeft")
        setup_seconds = time.perf_counter() - start
        size, largest = sum(f.stat().st_size for f in base.glob("*.safetensors")), largest_tensor(base)
        runs = []
        for i, method in enumerate(("copy", "qpeft", "qpeft-force", "copy")):
            runs.append((method, run_child(method, base, adapter, work / f"{name}-{i}")))
            shutil.rmtree(work / f"{name}-{i}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    labels = {"qpeft": "qpeft merge", "qpeft-force": "qpeft merge --force", "copy": "copy"}
    copies = [r for m, r in runs if m == "copy"]
    result = dict(runs[1:3]) | {
        "copy": {
            "seconds": statistics.mean(r["seconds"] for r in copies),
            "extra_rss_bytes": max(r["extra_rss_bytes"] for r in copies),
        }
    }
    return {
        "checkpoint_bytes": size,
        "largest_tensor_bytes": largest,
        "setup_seconds": setup_seconds,
        "adapter_bytes": adapter.stat().st_size,
        "targets": 7 * SHAPES[name]["layers"],
        "runs": runs,
        "seconds": {labels[m]: r["seconds"] for m, r in result.items()},
        "extra_rss_bytes": {labels[m]: r["extra_rss_bytes"] for m, r in result.items()},
    }


# --------------------------------------------------------------------------------------------------- report


def table(data: dict) -> str:
    """One markdown row per case and method: seconds, × copy, extra peak RSS vs the largest tensor."""
    rows = []
    for case in ("minilm", *SHAPES):
        result = data.get(case)
        if not result or "seconds" not in result:
            continue
        copy, largest = result["seconds"]["copy"], result["largest_tensor_bytes"]
        for method, seconds in result["seconds"].items():
            extra = result["extra_rss_bytes"].get(method)
            rows.append(
                [
                    case,
                    method,
                    seconds,
                    seconds / copy,
                    "-" if extra is None else extra / 2**20,
                    "-" if extra is None else extra / largest,
                ]
            )
    headers = ["checkpoint", "method", "seconds", "x copy", "extra peak RSS (MiB)", "x largest tensor"]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the table, write benchmarks/results/merge.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", choices=sorted(SHAPES), help="also merge a generated Llama checkpoint")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: temp folder)")
    parser.add_argument(
        "--child", nargs=4, metavar=("METHOD", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        method, base, adapter, out = args.child
        print(json.dumps(child(method, Path(base), Path(adapter), Path(out))))
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    data = {"machine": machine_info(), "note": "shared 2-core machine, other engineers' jobs running: noisy"}
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        data["minilm"] = bench_minilm(Path(work), args.repeats)
        if args.synthetic:
            data[args.synthetic] = bench_synthetic(Path(work), args.synthetic)
    data["machine_after"] = machine_info()["load_average_1_5_15min"]
    text = table(data)
    print(text)
    write_results("merge", data, text)


if __name__ == "__main__":
    main()
