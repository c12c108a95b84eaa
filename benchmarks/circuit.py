"""Per-token cost of a Quantum-PEFT update: circuit mode vs dense-U mode vs the base layer's own matmul.

For square N×N layers and ranks K, times on a batch of T tokens (fp32, torch.no_grad, median of repeats):
  circuit  QuantumPeftLinear.delta(x, base) with mode="circuit" (Q_Mᵀ and Q_N applied to the activations)
  dense    the same with mode="dense" and U, V already cached
  base     x @ Wᵀ alone (nn.Linear(N, N, bias=False)), the cost the update is compared against
  build_u  materialising U = Q_N[:, :K] once (PauliCircuit.columns(K)), what dense mode pays per angle change
and records what ``cheapest_mode()`` picks and whether that pick was the faster one. Then (unless
``--no-accuracy``) trains a K=8, L=1 all-linear adapter and the head-only baseline on the same Rotten Tomatoes
budget (2,000 training reviews, 1,000 test reviews by default) and reports both test accuracies.

    python -m benchmarks.circuit [--tokens 256] [--sizes 384 768 1024 4096] [--repeats 7] [--no-accuracy]
writes benchmarks/results/circuit.json and benchmarks/results/circuit.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from benchmarks.common import interleaved_times, machine_info, markdown_table, write_results
from qpeft_deploy.core import circuit as qcircuit
from qpeft_deploy.core.layer import CIRCUIT_MAC_COST, QuantumPeftLinear
from qpeft_deploy.training.train import TrainSpec, run_spec


def make_layer(base: nn.Linear, rank: int, mode: str, seed: int = 0) -> QuantumPeftLinear:
    """A Quantum-PEFT layer with seeded angles and a non-zero random spectrum."""
    layer = QuantumPeftLinear(base, rank, mode=mode, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.spectrum.lam.copy_(torch.randn(rank, generator=torch.Generator().manual_seed(seed + 1)))
    return layer


def bench_case(n: int, k: int, tokens: int, repeats: int, warmup: int) -> dict:
    """Time circuit, dense, base and building U for one (N, K); raw fields are seconds per batch."""
    base = nn.Linear(n, n, bias=False)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(2))
    circuit, dense = make_layer(base, k, "circuit"), make_layer(base, k, "dense")
    dense.factors()  # fill the U, V cache: dense mode is timed at steady state
    max_diff = (circuit.delta(x, circuit.base) - dense.delta(x, dense.base)).abs().max().item()
    fns = {
        "circuit": lambda: circuit.delta(x, circuit.base),
        "dense": lambda: dense.delta(x, dense.base),
        "base": lambda: base(x),
        "build_u": lambda: circuit.u.columns(k),
    }
    times = interleaved_times(fns, repeats, warmup)
    med = {name: statistics.median(t) for name, t in times.items()}
    t_circuit, t_dense, t_base, t_build_u = med["circuit"], med["dense"], med["base"], med["build_u"]
    pick = circuit.cheapest_mode()
    faster = "circuit" if t_circuit < t_dense else "dense"
    circuit_cost = circuit.u.cost_per_vector() + circuit.v.cost_per_vector()
    per_token = 1e6 / tokens
    return {
        "N": n,
        "K": k,
        "circuit_us_per_token": t_circuit * per_token,
        "dense_us_per_token": t_dense * per_token,
        "base_us_per_token": t_base * per_token,
        "build_u_us": t_build_u * 1e6,
        "circuit_over_base": t_circuit / t_base,
        "dense_over_base": t_dense / t_base,
        # what cheapest_mode() compares: the circuit's multiply-adds × CIRCUIT_MAC_COST vs K·(N+M)
        "predicted_cost_per_token": {
            "circuit": CIRCUIT_MAC_COST * circuit_cost,
            "dense": k * 2 * n,
            "base": n * n,
        },
        "auto_pick": pick,
        "faster": faster,
        "pick_was_faster": pick == faster,
        "max_abs_diff_circuit_vs_dense": max_diff,
        "min_seconds_per_batch": {name: min(t) for name, t in times.items()},
        "median_seconds_per_batch": med,
    }


def accuracy_vs_head_only(train: int, test: int, epochs: int) -> dict:
    """RT test accuracy of a K=8 adapter and of head-only training on the same budget."""
    spec = TrainSpec(
        task="rt", rank=8, layers=1, epochs=epochs, max_examples=train, max_test=test, max_length=64
    )
    reports = {}
    for method, adapter in (("qpeft K=8 L=1", True), ("head-only", False)):
        _, report = run_spec(spec, adapter=adapter, quiet=True)
        reports[method] = report
        print(
            f"{method}: accuracy {report['test_accuracy']:.4f}, {report['trainable_parameters']:,} trainable, "
            f"{report['train_seconds']:.0f} s",
            flush=True,
        )
    return {"spec": vars(spec), "results": reports}


def accuracy_table(study: dict) -> str:
    """Markdown table of the accuracy study."""
    spec = study["spec"]
    rows = [
        [method, r["trainable_parameters"], r["test_accuracy"], r["train_seconds"]]
        for method, r in study["results"].items()
    ]
    return (
        f"\n## Accuracy on Rotten Tomatoes\n\n{spec['max_examples']} training reviews, {spec['max_test']} test "
        f"reviews, {spec['epochs']} epochs, max length {spec['max_length']}, seed {spec['seed']}, all-linear "
        f"targets (LoRA r=8 on the same targets: "
        f"{study['results']['qpeft K=8 L=1']['lora_r8_parameters']:,} parameters).\n\n"
        + markdown_table(["method", "trainable parameters", "test accuracy", "train s"], rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per batch (T)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 768, 1024, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="ranks besides full rank K = N")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--max-group",
        type=int,
        default=qcircuit.MAX_GROUP_QUBITS,
        help="override MAX_GROUP_QUBITS (largest qubit group of one Kronecker factor)",
    )
    parser.add_argument("--name", default="circuit", help="results file stem under benchmarks/results/")
    parser.add_argument(
        "--no-accuracy", dest="accuracy", action="store_false", help="skip the RT training study"
    )
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    qcircuit.MAX_GROUP_QUBITS = args.max_group
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cases = []
    with torch.no_grad():
        for n in args.sizes:
            for k in [*args.ranks, n]:
                case = bench_case(n, k, args.tokens, args.repeats, args.warmup)
                cases.append(case)
                print(
                    f"N={n:5d} K={k:5d}  circuit {case['circuit_us_per_token']:8.2f} µs  "
                    f"dense {case['dense_us_per_token']:8.2f} µs  "
                    f"base {case['base_us_per_token']:8.2f} µs  "
                    f"build U {case['build_u_us'] / 1e3:8.2f} ms  auto={case['auto_pick']} "
                    f"faster={case['faster']}",
                    flush=True,
                )
    study = (
        accuracy_vs_head_only(args.train_examples, args.test_examples, args.epochs) if args.accuracy else None
    )
    elapsed = time.perf_counter() - start
    headers = [
        "N",
        "K",
        "circuit µs",
        "dense µs",
        "base matmul µs",
        "circuit/base",
        "dense/base",
        "build U ms",
        "auto pick",
        "faster",
    ]
    rows = [
        [
            c["N"],
            c["K"],
            c["circuit_us_per_token"],
            c["dense_us_per_token"],
            c["base_us_per_token"],
            c["circuit_over_base"],
            c["dense_over_base"],
            c["build_u_us"] / 1e3,
            c["auto_pick"],
            c["faster"] + ("" if c["pick_was_faster"] else " ✗"),
        ]
        for c in cases
    ]
    min_rows = []
    for c in cases:
        best = {name: t * 1e6 / args.tokens for name, t in c["min_seconds_per_batch"].items()}
        faster = "circuit" if best["circuit"] < best["dense"] else "dense"
        min_rows.append(
            [
                c["N"],
                c["K"],
                best["circuit"],
                best["dense"],
                best["base"],
                best["circuit"] / best["base"],
                best["dense"] / best["base"],
                c["auto_pick"],
                faster + ("" if faster == c["auto_pick"] else " ✗"),
            ]
        )
    info = machine_info()
    load = (info["load_average_1_5_15min"] or [0.0])[0]
    warning = (
        f"\n**The machine was overloaded (load average {load:.1f} on {info['cpu_count']} cores): "
        f"other processes shared the cores, so medians are unreliable; the min table is the better "
        f"guide.**\n"
        if load > (info["cpu_count"] or 1)
        else ""
    )
    table = (
        f"# Quantum-PEFT update apply time (per token)\n\n"
        f"Square N×N layers, L = 1, fp32, T = {args.tokens} tokens per batch, torch.no_grad, median of "
        f"{args.repeats} runs after {args.warmup} warm-up; {info['torch_threads']} threads on "
        f"{info['cpu_model']}, torch {info['torch_version']}, MAX_GROUP_QUBITS = {args.max_group}.\n"
        f"The four timings of a case run round-robin. µs columns are per token (batch time / T); "
        f"base = x @ Wᵀ alone; build U = columns(K) once. "
        f"✗ marks an auto pick that was the slower mode.\n{warning}\n"
        + markdown_table(headers, rows)
        + "\nThe same runs' fastest (min) times, less sensitive to other load on the machine:\n\n"
        + markdown_table([*headers[:7], "auto pick", "faster"], min_rows)
        + f"\nTotal benchmark time {elapsed:.0f} s; load average (1, 5, 15 min) at the end "
        f"{', '.join(f'{v:.1f}' for v in info['load_average_1_5_15min'] or [])}.\n"
        + (accuracy_table(study) if study else "")
    )
    data = {
        "machine": info,
        "settings": {**vars(args), "layers": 1, "dtype": "float32"},
        "cases": cases,
        "accuracy": study,
        "total_seconds": elapsed,
    }
    write_results(args.name, data, table)
    print(table)


if __name__ == "__main__":
    main()
