"""Runtime adapter swap on MiniLM: AdapterBank (.qpeft, K = 8 all-linear) vs PEFT LoRA (r = 8 all-linear).

(a) make a new adapter servable, forward excluded: ``bank.load`` (read, validate, fingerprint compare; U/V
    built lazily on first use) and ``bank.load`` + ``bank.warm`` (U/V built now), vs PEFT ``load_adapter`` +
    ``set_adapter``. Goal: >= 10x faster.
(b) latency of a request (``--request-texts`` rows) when every request names a different adapter vs all the
    same one, over 64 loaded adapters: the bank with its U/V cache warm, and with the cache off (every request
    materialises U/V); PEFT ``set_adapter`` + forward as the peer. Goal: <= 1.05x.
(c) one batch of 64 rows naming 64 distinct adapters (2- and 6-label heads) vs the same rows on one adapter,
    rows/s; PEFT's mixed batch (``adapter_names=``, 2-label adapters only: its heads cannot differ in size) as
    the peer. Goal: >= 0.9x.
(d) resident memory per loaded adapter: process RSS growth and tensor bytes over ``--memory-adapters`` loads
    (cache off). Goal: 10,000 adapters in < 1 GB.

    python -m benchmarks.swap [--threads 1] [--memory-adapters 10000]
writes benchmarks/results/swap.json and benchmarks/results/swap.md. Timings are medians of interleaved rounds;
(a) runs each call after a garbage collection and with collection held off, as timeit does.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from benchmarks.common import interleaved_times, machine_info, markdown_table, write_results
from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.attach import attach
from qpeft_deploy.data.text import load_task
from qpeft_deploy.io.model_io import adapter_from_model
from qpeft_deploy.io.qpeft_file import write_adapter
from qpeft_deploy.models import load_task_model, load_tokenizer, tokenize
from qpeft_deploy.runtime.bank import AdapterBank, FactorCache

TWO = {0: "rotten", 1: "fresh"}
SIX = {i: name for i, name in enumerate(["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])}
ADAPTERS = 64


def qpeft_files(folder: Path, count: int) -> list[Path]:
    """``count`` distinct .qpeft files (random angles, λ and heads; even ones 2 labels, odd ones 6)."""
    templates = [
        adapter_from_model(attach(load_task_model("minilm", labels), rank=8), base="minilm")
        for labels in (TWO, SIX)
    ]
    g, paths = torch.Generator().manual_seed(0), []
    for i in range(count):
        template = templates[i % 2]
        state = {
            k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
            for k, v in template.state.items()
        }
        adapter = AdapterFile(template.config, state, template.shapes, template.fingerprint)
        paths.append(write_adapter(folder / f"q{i}.qpeft", adapter))
    return paths


def peft_model_and_dirs(folder: Path, count: int) -> tuple[PeftModel, list[Path]]:
    """A PEFT LoRA model (2 labels) and ``count`` saved adapters with random B and head."""
    config = LoraConfig(r=8, target_modules="all-linear", task_type="SEQ_CLS")
    model = get_peft_model(load_task_model("minilm", TWO), config).eval()
    g, dirs = torch.Generator().manual_seed(1), []
    for i in range(count):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(str(folder / f"p{i}"))
        dirs.append(folder / f"p{i}")
    return model, dirs


def timed(fn, *args) -> float:
    """Wall seconds of one call of ``fn(*args)``, garbage collection done before and held off during it (as
    timeit does), so that neither side pays for collecting the other's garbage."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start
    finally:
        gc.enable()


def bench_servable(
    bank: AdapterBank, paths: list[Path], peft: PeftModel, dirs: list[Path], repeats: int, warmup: int = 3
) -> dict:
    """(a) median seconds to make a new adapter servable, the three ways timed round-robin."""

    def bank_new(name: str, path: Path, warm: bool) -> None:
        bank.load(name, path)
        if warm:
            bank.warm(name)

    def peft_new(name: str, path: Path) -> None:
        peft.load_adapter(str(path), adapter_name=name)
        peft.set_adapter(name)

    times: dict[str, list[float]] = {
        "bank_load_s": [],
        "bank_load_and_materialise_s": [],
        "peft_load_adapter_set_adapter_s": [],
    }
    for i in range(warmup + repeats):
        path, folder = paths[i % len(paths)], dirs[i % len(dirs)]
        rounds = [
            timed(bank_new, "lazy", path, False),
            timed(bank_new, "warm", path, True),
            timed(peft_new, "new", folder),
        ]
        bank.unload("lazy")
        bank.unload("warm")
        peft.set_adapter("default")
        peft.delete_adapter("new")  # untimed, so the PEFT model does not grow
        if i >= warmup:
            for key, seconds in zip(times, rounds):
                times[key].append(seconds)
    return {key: statistics.median(values) for key, values in times.items()}


def cycling(fn, names: list[str]):
    """A zero-argument function calling ``fn(next name)``, round-robin."""
    state = {"i": 0}

    def run():
        state["i"] += 1
        return fn(names[state["i"] % len(names)])

    return run


def bench_latency(bank: AdapterBank, peft: PeftModel, inputs: dict, repeats: int) -> dict:
    """(b) median request latency, every request a different adapter vs all the same one."""
    names = [f"a{i}" for i in range(ADAPTERS)]
    peft_names = [f"a{i}" for i in range(0, ADAPTERS, 2)]

    def peft_forward(name: str):
        peft.set_adapter(name)
        with torch.inference_mode():
            return peft(**inputs).logits

    fns = {
        "bank_different": cycling(lambda n: bank(inputs, adapter=n), names),
        "bank_same": lambda: bank(inputs, adapter="a0"),
        "peft_different": cycling(peft_forward, peft_names),
        "peft_same": lambda: peft_forward("a0"),
    }
    samples = interleaved_times(fns, repeats, warmup=ADAPTERS // 8)
    times = {k: statistics.median(v) for k, v in samples.items()}
    warm_cache, bank.cache = bank.cache, FactorCache(0)
    try:
        cold_fn = cycling(lambda n: bank(inputs, adapter=n), names)
        cold = interleaved_times({"bank_different_cache_off": cold_fn}, max(5, repeats // 4), warmup=1)
    finally:
        bank.cache = warm_cache
    times["bank_different_cache_off"] = statistics.median(cold["bank_different_cache_off"])
    return times


def bench_mixed(bank: AdapterBank, peft: PeftModel, inputs: dict, repeats: int) -> dict:
    """(c) median seconds of one 64-row batch over 64 distinct adapters vs the same batch on one adapter."""
    rows = inputs["input_ids"].shape[0]
    names = [f"a{i % ADAPTERS}" for i in range(rows)]
    peft_names = [f"a{2 * (i % (ADAPTERS // 2))}" for i in range(rows)]

    def peft_batch(adapter_names):
        with torch.inference_mode():
            return peft(**inputs, adapter_names=adapter_names).logits

    fns = {
        "bank_mixed": lambda: bank(inputs, adapter=names),
        "bank_single": lambda: bank(inputs, adapter="a0"),
        "peft_mixed": lambda: peft_batch(peft_names),
        "peft_single": lambda: peft_batch(["a0"] * rows),
    }
    return {k: statistics.median(v) for k, v in interleaved_times(fns, repeats, warmup=1).items()}


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_memory(bank: AdapterBank, paths: list[Path], count: int) -> dict:
    """(d) RSS growth and tensor bytes per adapter over ``count`` loads (U/V cache off)."""
    warm_cache, bank.cache = bank.cache, FactorCache(0)
    gc.collect()
    rss, tensors = rss_bytes(), bank.memory()["adapter_bytes"]
    start = time.perf_counter()
    for i in range(count):
        bank.load(f"m{i}", paths[i % len(paths)])
    seconds = time.perf_counter() - start
    gc.collect()
    grown, tensor_bytes = rss_bytes() - rss, bank.memory()["adapter_bytes"] - tensors
    for i in range(count):
        bank.unload(f"m{i}")
    bank.cache = warm_cache
    return {
        "adapters": count,
        "rss_bytes_per_adapter": grown / count,
        "tensor_bytes_per_adapter": tensor_bytes / count,
        "rss_bytes_for_10000": grown / count * 10_000,
        "load_seconds_total": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)"
    )
    parser.add_argument("--repeats", type=int, default=64, help="timed calls per latency measurement")
    parser.add_argument("--batch-repeats", type=int, default=7, help="timed rounds of the 64-row batches")
    parser.add_argument("--request-texts", type=int, default=4, help="rows per request in (b)")
    parser.add_argument("--memory-adapters", type=int, default=10_000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = [text for text, _ in load_task("rt", max_train=1, max_test=ADAPTERS).test]
    tokenizer = load_tokenizer("minilm")
    with tempfile.TemporaryDirectory() as tmp:
        paths = qpeft_files(Path(tmp), ADAPTERS)
        peft, dirs = peft_model_and_dirs(Path(tmp), ADAPTERS // 2)
        bank = AdapterBank.from_pretrained("minilm")
        for i, path in enumerate(paths):
            bank.load(f"a{i}", path)
            bank.warm(f"a{i}")
        servable = {"peft_holds_1": bench_servable(bank, paths, peft, dirs, args.repeats // 2)}
        for i, d in enumerate(dirs):
            peft.load_adapter(str(d), adapter_name=f"a{2 * i}")
        servable[f"peft_holds_{len(dirs) + 1}"] = bench_servable(bank, paths, peft, dirs, args.repeats // 4)
        latency = bench_latency(bank, peft, tokenize(tokenizer, texts[: args.request_texts]), args.repeats)
        mixed = bench_mixed(bank, peft, tokenize(tokenizer, texts), args.batch_repeats)
        memory = bench_memory(bank, paths, args.memory_adapters)
    report(args, servable, latency, mixed, memory)


def servable_rows(servable: dict) -> list[list]:
    """(a): the bank's two ways against PEFT, for each PEFT model size measured."""
    rows = []
    for held, times in servable.items():
        peer = times["peft_load_adapter_set_adapter_s"]
        for label, key in (
            ("bank.load, U/V lazy", "bank_load_s"),
            ("bank.load + U/V materialised", "bank_load_and_materialise_s"),
        ):
            rows.append(
                [
                    f"(a) new adapter servable, ms: {label} (PEFT holds {held.rsplit('_', 1)[1]})",
                    times[key] * 1e3,
                    peer * 1e3,
                    f"{peer / times[key]:.1f}x faster",
                    ">= 10x faster",
                ]
            )
    return rows


def report(args, servable: dict, latency: dict, mixed: dict, memory: dict) -> None:
    """Print and write the table of the four goals."""
    lat, ms, tensors = latency, 1e3, memory["tensor_bytes_per_adapter"]
    rows = servable_rows(servable) + [
        [
            "(b) request latency, ms: different / same adapter, cache warm",
            f"{lat['bank_different'] * ms:.1f} / {lat['bank_same'] * ms:.1f}",
            f"{lat['peft_different'] * ms:.1f} / {lat['peft_same'] * ms:.1f}",
            (
                f"{lat['bank_different'] / lat['bank_same']:.3f}x "
                f"(PEFT {lat['peft_different'] / lat['peft_same']:.3f}x)"
            ),
            "<= 1.05x",
        ],
        [
            "(b) request latency, ms: different adapter, cache off / same",
            f"{lat['bank_different_cache_off'] * ms:.1f} / {lat['bank_same'] * ms:.1f}",
            "",
            f"{lat['bank_different_cache_off'] / lat['bank_same']:.2f}x",
            "<= 1.05x",
        ],
        [
            "(c) 64-row batch, rows/s: 64 adapters / 1 adapter",
            f"{64 / mixed['bank_mixed']:.1f} / {64 / mixed['bank_single']:.1f}",
            f"{64 / mixed['peft_mixed']:.1f} / {64 / mixed['peft_single']:.1f} (32 adapters)",
            (
                f"{mixed['bank_single'] / mixed['bank_mixed']:.3f}x "
                f"(PEFT {mixed['peft_single'] / mixed['peft_mixed']:.3f}x)"
            ),
            ">= 0.9x",
        ],
        [
            f"(d) RSS bytes per adapter ({memory['adapters']} loaded, tensors {tensors:.0f} B)",
            memory["rss_bytes_per_adapter"],
            "",
            f"{memory['rss_bytes_for_10000'] / 1e9:.3f} GB per 10,000",
            "< 1 GB",
        ],
    ]
    table = markdown_table(["measure", "qpeft bank", "PEFT LoRA r=8 (peer)", "result", "goal"], rows)
    print(table)
    data = {
        "machine": machine_info(),
        "args": vars(args),
        "servable_seconds": servable,
        "request_latency_seconds": latency,
        "batch64_seconds": mixed,
        "memory": memory,
    }
    write_results("swap", data, f"{run_note(data['machine'])}\n\n" + table)


def run_note(machine: dict) -> str:
    """One line on what the timings ran on (one run: they carry run-to-run noise)."""
    loads = machine["load_average_1_5_15min"]
    load = f"1-minute load {loads[0]:.1f} at the end" if loads else "load unknown"
    return (
        f"One run on {machine['cpu_model']} ({machine['cpu_count']} cores, {load}): a single run, so timings "
        "carry run-to-run noise."
    )


if __name__ == "__main__":
    main()
