"""Serving at scale on Ray Serve: many adapters over replicas, every answer checked, one replica killed (#21).

A local Ray cluster on 127.0.0.1 (``--cpus`` CPUs, ``local_cluster``) runs ``qpeft_deploy.serve.ray_engine``
with ``--replicas`` replicas (MiniLM, 1 torch thread each, an LRU of ``--max-adapters-per-replica``) over a
folder of ``--adapters`` distinct random .qpeft files (2- and 6-label heads). ``--threads`` client threads send
``/v1/classify`` requests (``--texts`` texts each) over HTTP, each naming its adapter in the
``serve_multiplexed_model_id`` header. Every answer is compared with the single-process reference (an
AdapterBank in this process holding every adapter: same label, scores within 1e-4).

1. warm-up: every adapter requested twice with the header, then ``--spread`` times without it, so that Ray's
   default routing loads it on both replicas (an LRU of 100 holds all). With each adapter on one replica only,
   multiplexed routing pins every request of that adapter to that replica however busy it is (up to
   ``--max-ongoing``), and the many-adapter p99 rose to 1.4x the one-adapter p99 in a run like this one; held by
   both, Ray picks the less loaded of the two, as it does for one adapter. A replica reports the load time of every adapter it loads, in any
   phase (``x-qpeft-load-ms``: read, validate, pack the file's kilobytes into the bank). Goal: p99 <= 10 ms.
2. latency: ``--rounds`` rounds, each one block of ``--block`` requests all naming one adapter and one block
   naming a random adapter of all ``--adapters`` per request (interleaved, so load drift hits both alike).
   Goal: p99 (all adapters) <= 1.2x p99 (one adapter); 0 wrong, 0 errors. The one-adapter requests go without
   the multiplexing header (Ray's default routing over every replica, each holding that adapter): with the
   header Ray sends every request of one adapter to the replica that holds it, so the baseline would run on
   one replica of two. Answers are checked after the cluster is down (no reference work during the timing).
3. fault: a block like (2)'s many-adapter one; a third into it one replica actor is killed (``ray.kill``,
   no restart: Serve's controller starts a new one). A request answered 5xx or cut off is retried once by the
   client; none may be lost, and the count retried is recorded.

    python -m benchmarks.scale [--threads 8] [--adapters 100] [--replicas 2] [--rounds 4] [--block 200]
writes benchmarks/results/scale.json and scale.md. Every phase is bounded by its request count and
``--max-seconds``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import ray
import torch
from ray import serve

from benchmarks.common import latency_spread, machine_info, markdown_table, write_results
from benchmarks.robustness_serve import TEXTS, free_port, percentiles_ms
from benchmarks.swap import qpeft_files
from qpeft_deploy.runtime.bank import AdapterBank, Prediction
from qpeft_deploy.serve.ray_engine import (
    APP,
    DEPLOYMENT,
    LOAD_CPU_HEADER,
    LOAD_HEADER,
    MODEL_ID_HEADER,
    REPLICA_HEADER,
    build_app,
    local_cluster,
)

GOAL_LOAD_MS, GOAL_RATIO = 10.0, 1.2


@dataclass
class Tally:
    """What one phase's client threads saw."""

    latency: list[float] = field(default_factory=list)  # seconds, first tries answered 200
    status: Counter = field(default_factory=Counter)  # final status per request ("transport" when cut off)
    wrong: int = 0
    retried: int = 0
    lost: int = 0  # not answered 200 even after the retry
    replicas: Counter = field(default_factory=Counter)
    load_ms: list[float] = field(default_factory=list)  # wall
    load_cpu_ms: list[float] = field(default_factory=list)  # the loading thread's CPU time
    answers: list[tuple[str, list[str], dict]] = field(default_factory=list)  # checked after the run
    stopped_early: bool = False


class Reference:
    """The single-process answers: one AdapterBank with every adapter, memoised per (adapter, texts). Used once
    the cluster is down, so that no reference work competes with the replicas for the cores."""

    def __init__(self, folder: Path, names: list[str]):
        self.bank = AdapterBank.from_pretrained("minilm")
        for name in names:
            self.bank.load(name, folder / f"{name}.qpeft")
        self.memo: dict[tuple[str, str], Prediction] = {}

    def wrong(self, tally: Tally) -> int:
        """How many of the tally's answers differ from the reference (each distinct (adapter, text) classified
        once, in mixed batches of 64 rows)."""
        rows = sorted({(name, text) for name, texts, _ in tally.answers for text in texts} - self.memo.keys())
        for start in range(0, len(rows), 64):
            batch = rows[start : start + 64]
            answers = self.bank.classify([t for _, t in batch], adapter=[n for n, _ in batch])
            self.memo.update(zip(batch, answers))
        return sum(not self.correct(answer, name, texts) for name, texts, answer in tally.answers)

    def correct(self, answer: dict, name: str, texts: list[str]) -> bool:
        want = [self.memo[name, text] for text in texts]
        got = answer.get("predictions", [])
        return len(got) == len(want) and all(
            g["adapter"] == w.adapter
            and g["label"] == w.label
            and g["scores"].keys() == w.scores.keys()
            and max(abs(g["scores"][k] - w.scores[k]) for k in w.scores) < 1e-4
            for g, w in zip(got, want)
        )


def send(client: httpx.Client, name: str, texts: list[str], routed: bool) -> httpx.Response | None:
    """One /v1/classify request for adapter ``name``, in the multiplexing header when ``routed`` (None when the
    connection failed)."""
    headers = {MODEL_ID_HEADER: name} if routed else {}
    try:
        return client.post("/v1/classify", json={"adapter": name, "texts": texts}, headers=headers)
    except httpx.TransportError:
        return None


def phase(
    url: str,
    jobs: list[tuple[str, list[str]]],
    threads: int,
    deadline: float,
    routed: bool = True,
    fault: tuple[int, threading.Thread] | None = None,
) -> Tally:
    """Send ``jobs`` (adapter, texts) from ``threads`` threads (``routed``: with the multiplexing header); a
    failed request is retried once. ``fault``: (job index, thread) started when that job is taken."""
    tally, lock, cursor = Tally(), threading.Lock(), iter(range(len(jobs)))

    def work() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                if time.monotonic() > deadline:
                    tally.stopped_early = True
                    return
                if fault is not None and i == fault[0]:
                    fault[1].start()
                name, texts = jobs[i]
                start = time.perf_counter()
                answer = send(client, name, texts, routed)
                elapsed, retried = time.perf_counter() - start, False
                if answer is None or answer.status_code >= 500:
                    answer, retried = send(client, name, texts, routed), True
                with lock:
                    record(tally, answer, retried, elapsed, name, texts)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return tally


def record(
    tally: Tally, answer: httpx.Response | None, retried: bool, elapsed: float, name: str, texts: list[str]
) -> None:
    """Count one request's outcome into the tally."""
    tally.retried += retried
    tally.status["transport" if answer is None else answer.status_code] += 1
    if answer is None or answer.status_code != 200:
        tally.lost += 1
        return
    if not retried:
        tally.latency.append(elapsed)
    tally.replicas[answer.headers.get(REPLICA_HEADER, "?")] += 1
    if LOAD_HEADER in answer.headers:
        tally.load_ms.append(float(answer.headers[LOAD_HEADER]))
        tally.load_cpu_ms.append(float(answer.headers[LOAD_CPU_HEADER]))
    tally.answers.append((name, texts, answer.json()))


def jobs_for(names: list[str], count: int, texts: int, rng: random.Random) -> list[tuple[str, list[str]]]:
    """``count`` requests, each naming a random adapter of ``names`` and ``texts`` random texts."""
    return [(rng.choice(names), rng.sample(TEXTS, texts)) for _ in range(count)]


def replica_actors() -> list[str]:
    """Names of the deployment's live replica actors."""
    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return sorted(n for n in actors if n.startswith(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"))


def killer(killed: dict) -> threading.Thread:
    """A thread that kills one replica actor of the deployment (no restart: Serve starts a new one)."""

    def kill() -> None:
        before = replica_actors()
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        killed.update(replica=before[0].rpartition("#")[2], before=before, at=time.monotonic())

    return threading.Thread(target=kill)


def replica_states() -> dict[str, int]:
    """How many replicas of the deployment Serve reports in each state."""
    states = serve.status().applications[APP].deployments[DEPLOYMENT].replica_states
    return {getattr(state, "value", state): count for state, count in states.items()}


def summary(tally: Tally, sent: int) -> dict:
    return {
        "sent": sent,
        "answered_200": tally.status.get(200, 0),
        "wrong": tally.wrong,
        "lost": tally.lost,
        "retried": tally.retried,
        "status": {str(k): v for k, v in tally.status.items()},
        "latency_ms": percentiles_ms(tally.latency),
        "by_replica": dict(tally.replicas),
        "stopped_early": tally.stopped_early,
    }


def run(args: argparse.Namespace) -> dict:
    """One run: cluster up, the three phases, cluster down."""
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="qs", dir="/tmp") as tmp:  # short: Ray's socket paths
        folder = Path(tmp) / "a"
        folder.mkdir()
        qpeft_files(folder, args.adapters)
        names = [f"q{i}" for i in range(args.adapters)]
        sizes = [(folder / f"{n}.qpeft").stat().st_size for n in names]
        port = free_port()
        config = {
            "base": "minilm",
            "adapters": str(folder),
            "num_replicas": args.replicas,
            "num_cpus_per_replica": args.cpus / args.replicas,
            "max_adapters_per_replica": args.max_adapters_per_replica,
            "max_ongoing_requests": args.max_ongoing,
        }
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + args.max_seconds
        with local_cluster(num_cpus=args.cpus, port=port, temp_dir=str(Path(tmp) / "r"), quiet=True):
            start = time.perf_counter()
            serve.run(build_app(config), name=APP, route_prefix="/")
            startup_s = time.perf_counter() - start
            load_before = os.getloadavg()
            warm_jobs = [(n, rng.sample(TEXTS, args.texts)) for n in names * 2]
            warm = phase(url, warm_jobs, args.threads, deadline)
            spread = [(n, rng.sample(TEXTS, args.texts)) for n in names * args.spread]
            merge_into(warm, phase(url, spread, args.threads, deadline, routed=False))
            one, many = Tally(), Tally()
            for _ in range(args.rounds):  # one adapter: Ray's default routing over both replicas (see below)
                for tally, pool, routed in ((one, names[:1], False), (many, names, True)):
                    jobs = jobs_for(pool, args.block, args.texts, rng)
                    merge_into(tally, phase(url, jobs, args.threads, deadline, routed))
            killed: dict = {}
            fault_jobs = jobs_for(names, args.block, args.texts, rng)
            kill = killer(killed)
            fault = phase(url, fault_jobs, args.threads, deadline, fault=(len(fault_jobs) // 3, kill))
            kill.join()
            recovered_s = wait_replicas(args.replicas, killed, deadline)
        reference = Reference(folder, names)
        for tally in (warm, one, many, fault):
            tally.wrong = reference.wrong(tally)
    p99_one, p99_many = one_p99(one), one_p99(many)
    tallies = (warm, one, many, fault)
    loads = [ms for t in tallies for ms in t.load_ms]  # every load any replica reported
    load = percentiles_ms([ms / 1e3 for ms in loads])
    load_cpu = percentiles_ms([ms / 1e3 for t in tallies for ms in t.load_cpu_ms])
    result = {
        "threads": args.threads,
        "adapters": args.adapters,
        "replicas": args.replicas,
        "ray_cpus": args.cpus,
        "max_adapters_per_replica": args.max_adapters_per_replica,
        "texts_per_request": args.texts,
        "replica_torch_threads": 1,
        "adapter_file_bytes": {"min": min(sizes), "max": max(sizes)},
        "startup_s": startup_s,
        "load_average_before": list(load_before),
        "warmup": summary(warm, len(warm_jobs) + len(spread)),
        "warmup_unrouted_requests_per_adapter": args.spread,
        "max_ongoing_requests_per_replica": args.max_ongoing,
        "adapter_loads": len(loads),
        "adapter_load_ms": load,
        "adapter_load_cpu_ms": load_cpu,
        "one_adapter": summary(one, args.rounds * args.block),
        "many_adapters": summary(many, args.rounds * args.block),
        "p99_ratio_many_vs_one": p99_many / p99_one,
        "fault": summary(fault, len(fault_jobs))
        | {"killed_replica": killed.get("replica"), "replacement_running_after_s": recovered_s},
    }
    phases = [warm, one, many]
    result["ok"] = (
        all(t.wrong == 0 and t.lost == 0 and not t.stopped_early for t in [*phases, fault])
        and all(t.retried == 0 for t in phases)
        and bool(killed)
        and load_cpu["p99"] <= GOAL_LOAD_MS
        and result["p99_ratio_many_vs_one"] <= GOAL_RATIO
    )
    return result


def merge_into(total: Tally, part: Tally) -> None:
    total.latency += part.latency
    total.status.update(part.status)
    total.replicas.update(part.replicas)
    total.load_ms += part.load_ms
    total.load_cpu_ms += part.load_cpu_ms
    total.answers += part.answers
    total.wrong += part.wrong
    total.retried += part.retried
    total.lost += part.lost
    total.stopped_early |= part.stopped_early


def one_p99(tally: Tally) -> float:
    return statistics.quantiles(tally.latency, n=100, method="inclusive")[98]


def wait_replicas(count: int, killed: dict, deadline: float) -> float | None:
    """Seconds from the kill until a new replica actor exists and Serve reports exactly ``count`` replicas,
    all RUNNING (None if not before the deadline)."""
    while time.monotonic() < deadline:
        new = killed and set(replica_actors()) - set(killed["before"])
        if new and replica_states() == {"RUNNING": count}:
            return time.monotonic() - killed["at"]
        time.sleep(0.5)
    return None


def table(result: dict, machine: dict) -> str:
    """The markdown summary of a run."""
    load = machine["load_average_1_5_15min"]
    head = (
        f"One run on {machine['cpu_model']} ({machine['cpu_count']} cores, 1-minute load "
        f"{result['load_average_before'][0]:.1f} before and {load[0]:.1f} after, shared with other work): a local "
        f"Ray cluster ({result['ray_cpus']} CPUs) on 127.0.0.1 serving MiniLM from {result['replicas']} "
        f"replicas (1 torch thread each, LRU of {result['max_adapters_per_replica']} adapters), "
        f"{result['adapters']} adapters of {result['adapter_file_bytes']['min']}-"
        f"{result['adapter_file_bytes']['max']} bytes, {result['threads']} client threads, "
        f"{result['texts_per_request']} texts per request, every answer checked against the single-process "
        f"AdapterBank. Verdict: {'PASS' if result['ok'] else 'FAIL'}.\n\n"
    )
    rows = []
    for key, label in (
        (
            "warmup",
            f"warm-up (every adapter 2x, then {result['warmup_unrouted_requests_per_adapter']}x without the header)",
        ),
        ("one_adapter", "1 adapter"),
        ("many_adapters", f"{result['adapters']} adapters, one per request"),
        ("fault", "fault: one replica killed"),
    ):
        s = result[key]
        rows.append(
            [
                label,
                f"{s['answered_200']} / {s['sent']}",
                s["wrong"],
                s["lost"],
                s["retried"],
                latency_spread(s["latency_ms"]),
                ", ".join(f"{v}" for v in s["by_replica"].values()),
            ]
        )
    table_md = markdown_table(
        [
            "phase",
            "answered 200",
            "wrong",
            "lost",
            "retried once",
            "latency ms p50 / p90 / p99 / max",
            "per replica",
        ],
        rows,
    )
    fault = result["fault"]
    recovered = fault["replacement_running_after_s"]
    goals = markdown_table(
        ["measure", "value", "goal"],
        [
            [
                f"adapter load on a replica, CPU ms p50 / p99 ({result['adapter_loads']} loads)",
                f"{result['adapter_load_cpu_ms']['p50']:.2f} / {result['adapter_load_cpu_ms']['p99']:.2f}",
                f"p99 <= {GOAL_LOAD_MS:g}",
            ],
            [
                "adapter load on a replica, wall ms p50 / p99 (includes waiting for a core)",
                f"{result['adapter_load_ms']['p50']:.2f} / {result['adapter_load_ms']['p99']:.2f}",
                "",
            ],
            [
                "p99 latency, many adapters / one adapter",
                f"{result['p99_ratio_many_vs_one']:.3f}x",
                f"<= {GOAL_RATIO}x",
            ],
            ["requests lost after one client retry (fault phase)", fault["lost"], "0"],
            [
                "requests retried once (fault phase)",
                f"{fault['retried']} of {fault['sent']}",
                "counted",
            ],
            [
                "replacement replica running after the kill, s",
                "not within the bound" if recovered is None else f"{recovered:.1f}",
                "",
            ],
            [
                "wrong answers, all phases",
                sum(result[k]["wrong"] for k in ("warmup", "one_adapter", "many_adapters", "fault")),
                "0",
            ],
            ["Serve start-up (replicas ready), s", f"{result['startup_s']:.1f}", ""],
        ],
    )
    return head + table_md + "\n" + goals


def main(argv: list[str] | None = None) -> int:
    """Run once, write the results; exit code 1 when a goal is missed or any answer was wrong or lost."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=8, help="client threads")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--max-adapters-per-replica", type=int, default=100)
    parser.add_argument("--texts", type=int, default=2, help="texts per request")
    parser.add_argument("--max-ongoing", type=int, default=4, help="requests a replica takes at once")
    parser.add_argument(
        "--spread",
        type=int,
        default=4,
        help="warm-up requests per adapter without the header (both replicas)",
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved (1 adapter, many) block pairs")
    parser.add_argument("--block", type=int, default=200, help="requests per block")
    parser.add_argument("--max-seconds", type=float, default=900, help="bound on the whole run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run(args)
    machine = machine_info()
    write_results("scale", {"machine": machine, **result}, table(result, machine))
    print(table(result, machine))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
