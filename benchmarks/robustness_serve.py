"""Robustness of ``qpeft serve`` under load: one bad request harms no other (issue #15).

A real server (``serve()`` in a child process, torch backend, MiniLM, 3 small adapters and one broken file in
its folder, which start-up must skip) on 127.0.0.1; ``--threads`` client threads each send ``--requests``
requests, ``--poison-percent`` of them poisoned (a lone surrogate, a number for a text, a number for the
adapter, an unknown adapter, an over-long text, an oversized body) and mixed among valid ones. Every valid
answer must equal the single-process reference (each adapter's own model, no server: same label, scores within
1e-4) and every poisoned request must get its 4xx. Latency percentiles, throughput, counts, machine and load
are recorded.

    python -m benchmarks.robustness_serve [--threads 8] [--requests 1000] [--max-seconds 540]
writes benchmarks/results/robustness_serve.json and .md. Every client loop is bounded by its request count and
by ``--max-seconds`` (a run that hits the time bound says so and fails).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from benchmarks.common import latency_spread, machine_info, markdown_table, write_results
from qpeft_deploy.core.attach import adapted_layers, attach
from qpeft_deploy.io.model_io import load_adapted_model, save_adapter
from qpeft_deploy.models import load_task_model, load_tokenizer, tokenize

TWO = {0: "negative", 1: "positive"}
SIX = {i: name for i, name in enumerate(["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])}
ADAPTERS = {
    "sentiment": (TWO, 11, ["query", "value"]),
    "topic": (SIX, 12, ["query", "value"]),
    "spam": (TWO, 13, ["query", "value", "dense"]),
}
TEXTS = [
    "a gorgeous, moving film",
    "dull and far too long",
    "who wrote hamlet?",
    "how far is the moon?",
    "call now to win a prize",
    "see you at 8",
    "not bad at all",
    "what does NASA stand for?",
    "the plot never comes alive",
    "free entry in a weekly draw",
    "where is the nearest station?",
    "a quiet, clever little story",
    "when did the war end?",
    "ok, running late, sorry",
    "txt STOP to opt out",
    "an overlong mess",
]
MAX_TEXTS, MAX_TEXT_CHARS, MAX_BODY = 4, 512, 16 << 10  # the server's limits for this run
POISONS = {  # kind -> (body, the status it must get)
    "lone surrogate": ({"adapter": "topic", "texts": ["fine", "bad \ud800 text"]}, 422),
    "text not a string": ({"adapter": "topic", "texts": ["fine", 7]}, 422),
    "adapter not a string": ({"adapter": 3, "texts": ["fine"]}, 422),
    "unknown adapter": ({"adapter": "no-such-adapter", "texts": ["fine"]}, 404),
    "over-long text": ({"adapter": "spam", "texts": ["x" * (MAX_TEXT_CHARS + 1)]}, 422),
    "oversized body": ({"adapter": "spam", "texts": ["y" * (MAX_BODY + 1)]}, 413),
}


def make_adapters(folder: Path) -> None:
    """The served adapters (random λ and heads, so they differ) and one broken file start-up must skip."""
    for name, (labels, seed, targets) in ADAPTERS.items():
        model = attach(load_task_model("minilm", labels, seed=seed), targets=targets, rank=4, seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in adapted_layers(model).values():
                layer.spectrum.lam.copy_(torch.randn(layer.rank, generator=g) * 0.5)
            for p in model.classifier.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        save_adapter(model, folder / f"{name}.qpeft", base="minilm")
    (folder / "broken.qpeft").write_bytes(b"\x08" + b"\x00" * 15)


def reference(folder: Path) -> dict[str, list[tuple[str, dict[str, float]]]]:
    """(label, scores) of every adapter on every text from each adapter's own model, in this process."""
    inputs = tokenize(load_tokenizer("minilm"), TEXTS)
    out = {}
    for name in ADAPTERS:
        model = load_adapted_model("minilm", folder / f"{name}.qpeft")
        labels = list(model.config.id2label.values())
        with torch.no_grad():
            probs = torch.softmax(model(**inputs).logits, -1)
        out[name] = [(labels[int(p.argmax())], dict(zip(labels, p.tolist()))) for p in probs]
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, port: int, log: Path, server_threads: int) -> subprocess.Popen:
    """``serve()`` on 127.0.0.1:port in a child process with this run's limits."""
    code = (
        "import sys, torch; from qpeft_deploy.serve.app import ServeSettings, serve; "
        f"torch.set_num_threads({server_threads}); "
        f"serve('minilm', sys.argv[1], port={port}, log_level='warning', settings=ServeSettings("
        f"max_texts={MAX_TEXTS}, max_text_chars={MAX_TEXT_CHARS}, max_body_bytes={MAX_BODY}, "
        "max_batch_rows=64, batch_window_s=0.005))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(server_threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log, "wb") as stderr:
        return subprocess.Popen([sys.executable, "-c", code, str(folder)], env=env, stderr=stderr)


def wait_ready(client: httpx.Client, child: subprocess.Popen, timeout_s: float = 180) -> dict:
    """The server's /healthz once it answers (RuntimeError when the child dies or the time runs out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the server exited with code {child.returncode}")
        try:
            return client.get("/healthz").json()
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {timeout_s:.0f} s")


@dataclass
class Tally:
    """One client thread's outcomes."""

    valid_latency: list[float] = field(default_factory=list)
    poison_latency: list[float] = field(default_factory=list)
    valid_status: Counter = field(default_factory=Counter)
    valid_wrong: int = 0
    poison_status: dict[str, Counter] = field(default_factory=dict)
    poison_bad: int = 0  # poisoned requests answered with anything but their expected 4xx
    transport_errors: int = 0
    stopped_early: bool = False


def correct(body: dict, name: str, rows: list[int], want: dict) -> bool:
    """Whether a 200 body holds the reference label and scores (within 1e-4) of every row."""
    predictions = body.get("predictions", [])
    if body.get("adapter") != name or len(predictions) != len(rows):
        return False
    for p, i in zip(predictions, rows):
        label, scores = want[name][i]
        if p["label"] != label or p["scores"].keys() != scores.keys():
            return False
        if any(abs(p["scores"][k] - v) > 1e-4 for k, v in scores.items()):
            return False
    return True


def client_loop(
    url: str, thread: int, requests: int, poison_every: int, deadline: float, want: dict
) -> Tally:
    """``requests`` requests (every ``poison_every``-th poisoned, offset per thread), bounded by ``deadline``."""
    tally, rng, names, kinds = Tally(), random.Random(thread), list(ADAPTERS), list(POISONS)
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=url, timeout=60) as client:
        for r in range(requests):
            if time.monotonic() > deadline:
                tally.stopped_early = True
                break
            serial = thread * requests + r
            poisoned = serial % poison_every == poison_every // 2
            if poisoned:
                kind = kinds[(serial // poison_every) % len(kinds)]
                body, expected = POISONS[kind]
            else:
                name, rows = rng.choice(names), rng.sample(range(len(TEXTS)), rng.randint(1, 3))
                body = {"adapter": name, "texts": [TEXTS[i] for i in rows]}
            content = json.dumps(body)  # ASCII: a lone surrogate travels as an escape
            start = time.perf_counter()
            try:
                response = client.post("/v1/classify", content=content, headers=headers)
            except httpx.TransportError:
                tally.transport_errors += 1
                continue
            elapsed = time.perf_counter() - start
            if poisoned:
                tally.poison_latency.append(elapsed)
                tally.poison_status.setdefault(kind, Counter())[response.status_code] += 1
                tally.poison_bad += response.status_code != expected or "error" not in response.json()
            else:
                tally.valid_latency.append(elapsed)
                tally.valid_status[response.status_code] += 1
                tally.valid_wrong += response.status_code != 200 or not correct(
                    response.json(), name, rows, want
                )
    return tally


def percentiles_ms(times: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of ``times`` in milliseconds."""
    if not times:
        return {}
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return {"p50": cuts[49] * 1e3, "p90": cuts[89] * 1e3, "p99": cuts[98] * 1e3, "max": max(times) * 1e3}


def merge(tallies: list[Tally]) -> Tally:
    """The tallies of all threads as one."""
    total = Tally()
    for t in tallies:
        total.valid_latency += t.valid_latency
        total.poison_latency += t.poison_latency
        total.valid_status.update(t.valid_status)
        total.valid_wrong += t.valid_wrong
        for kind, counts in t.poison_status.items():
            total.poison_status.setdefault(kind, Counter()).update(counts)
        total.poison_bad += t.poison_bad
        total.transport_errors += t.transport_errors
        total.stopped_early |= t.stopped_early
    return total


def run(threads: int, requests: int, poison_percent: float, max_seconds: float, server_threads: int) -> dict:
    """One load run against a fresh server; the numbers and the verdict."""
    with tempfile.TemporaryDirectory(prefix="qpeft-robustness-") as tmp:
        folder = Path(tmp) / "adapters"
        folder.mkdir()
        make_adapters(folder)
        want = reference(folder)
        port, log = free_port(), Path(tmp) / "server.log"
        child = start_server(folder, port, log, server_threads)
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                health = wait_ready(client, child)
                skipped = client.get("/v1/adapters").json()["skipped"]
            tallies: list[Tally] = [Tally()] * threads
            poison_every = round(100 / poison_percent)
            deadline = time.monotonic() + max_seconds
            load_before = os.getloadavg()

            def work(i: int) -> None:
                tallies[i] = client_loop(url, i, requests, poison_every, deadline, want)

            workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - start
        finally:
            child.terminate()
            child.wait(timeout=60)
        server_log = log.read_text(errors="replace")
    total = merge(tallies)
    valid, poisoned = len(total.valid_latency), len(total.poison_latency)
    ok = (
        not total.stopped_early
        and total.transport_errors == 0
        and total.valid_wrong == 0
        and total.poison_bad == 0
        and valid + poisoned == threads * requests
    )
    return {
        "ok": ok,
        "threads": threads,
        "requests_per_thread": requests,
        "poison_percent": poison_percent,
        "server_torch_threads": server_threads,
        "server_limits": {
            "max_texts": MAX_TEXTS,
            "max_text_chars": MAX_TEXT_CHARS,
            "max_body_bytes": MAX_BODY,
        },
        "adapters": health["adapters"],
        "skipped_at_start": skipped,
        "skip_logged": "skipped adapter file broken.qpeft" in server_log,
        "valid_requests": valid,
        "valid_answered_correctly": valid - total.valid_wrong,
        "valid_status": dict(total.valid_status),
        "poisoned_requests": poisoned,
        "poisoned_answered_expected_4xx": poisoned - total.poison_bad,
        "poison_status": {kind: dict(c) for kind, c in total.poison_status.items()},
        "poison_expected_status": {kind: status for kind, (_, status) in POISONS.items()},
        "transport_errors": total.transport_errors,
        "stopped_early": total.stopped_early,
        "wall_s": wall,
        "requests_per_s": (valid + poisoned) / wall,
        "valid_latency_ms": percentiles_ms(total.valid_latency),
        "poisoned_latency_ms": percentiles_ms(total.poison_latency),
        "load_average_before": list(load_before),
    }


def _of(result: dict, key: str) -> str:
    """'answered / sent' for a count of the valid or the poisoned requests."""
    sent = result["valid_requests" if key.startswith("valid") else "poisoned_requests"]
    return f"{result[key]} / {sent}"


def table(result: dict, machine: dict) -> str:
    """The markdown summary of a run."""
    load = machine["load_average_1_5_15min"]
    head = (
        f"One run on {machine['cpu_model']} ({machine['cpu_count']} cores, 1-minute load "
        f"{result['load_average_before'][0]:.1f} before and {load[0]:.1f} after, shared with other work): "
        f"{result['threads']} client threads x {result['requests_per_thread']} requests against a real "
        f"`qpeft serve` (torch backend, {result['server_torch_threads']} torch thread, MiniLM, "
        f"{result['adapters']} adapters) on 127.0.0.1, {result['poison_percent']:g}% poisoned. "
        f"Verdict: {'PASS' if result['ok'] else 'FAIL'}.\n\n"
    )
    skipped = f"{len(result['skipped_at_start'])} ({'yes' if result['skip_logged'] else 'no'})"
    rows = [
        ["valid requests answered correctly (= reference)", _of(result, "valid_answered_correctly"), "all"],
        ["poisoned requests answered their 4xx", _of(result, "poisoned_answered_expected_4xx"), "all"],
        ["transport errors", result["transport_errors"], "0"],
        ["adapter files skipped at start-up (logged)", skipped, "1 (yes)"],
        ["valid latency ms p50 / p90 / p99 / max", latency_spread(result["valid_latency_ms"]), ""],
        ["poisoned latency ms p50 / p90 / p99 / max", latency_spread(result["poisoned_latency_ms"]), ""],
        ["throughput, requests/s", f"{result['requests_per_s']:.0f}", ""],
        ["wall time, s", f"{result['wall_s']:.0f}", ""],
    ]
    for kind, expected in result["poison_expected_status"].items():
        got = ", ".join(f"{n}x {s}" for s, n in sorted(result["poison_status"].get(kind, {}).items()))
        rows.append([f"poison: {kind}", got or "none sent", str(expected)])
    return head + markdown_table(["measure", "value", "goal"], rows)


def main(argv: list[str] | None = None) -> int:
    """Run once, write the results; exit code 1 when any valid request was harmed or any poison not refused."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.robustness_serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000, help="requests per client thread")
    parser.add_argument("--poison-percent", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=540, help="bound on the load phase")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args(argv)
    result = run(args.threads, args.requests, args.poison_percent, args.max_seconds, args.server_threads)
    machine = machine_info()
    write_results("robustness_serve", {"machine": machine, **result}, table(result, machine))
    print(table(result, machine))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
