"""Tests of qpeft_deploy.serve.ray_engine and ``qpeft serve --engine ray``: a real local Ray cluster (2 CPUs,
Ray's files under the pytest tmp folder), real replicas on 127.0.0.1, real adapters and HTTP.

The Ray tests skip, with their reason, only when ray is not importable (the ``[ray]`` extra); the missing-extra
error is checked without ray."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from benchmarks.swap import qpeft_files
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.runtime.bank import AdapterBank


def _ray_missing() -> str | None:
    """Why ray cannot be imported (None when it can)."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as error:
        return f"ray is not importable ({error}): pip install 'qpeft-deploy[ray]' to run this test"
    return None


RAY_MISSING = _ray_missing()
needs_ray = pytest.mark.skipif(RAY_MISSING is not None, reason=RAY_MISSING or "")
TEXTS = ["a gorgeous, moving film", "who wrote hamlet?", "dull and far too long"]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes(temp_dir: Path) -> list[str]:
    """Command lines of the processes still running from a Ray temp folder (raylet, GCS, workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if str(temp_dir) in cmdline and proc.name != str(os.getpid()):
            found.append(cmdline[:120])
    return found


def wait_gone(temp_dir: Path, seconds: float = 20) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := ray_processes(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    """Three .qpeft files (2- and 6-label heads, random angles and λ) in a folder, and one outside it."""
    folder = tmp_path_factory.mktemp("adapters")
    qpeft_files(folder, 3)
    outside = tmp_path_factory.mktemp("outside")
    (folder / "q0.qpeft").rename(outside / "q0.qpeft")
    qpeft_files(folder, 4)  # q0 again in the folder (the same bytes), q3 new
    (folder / "link.qpeft").symlink_to(outside / "q0.qpeft")
    return folder


@pytest.fixture(scope="module")
def reference(adapters) -> AdapterBank:
    bank = AdapterBank.from_pretrained("minilm")
    for i in range(4):
        bank.load(f"q{i}", adapters / f"q{i}.qpeft")
    return bank


def assert_same(answer: dict, expected) -> None:
    """An HTTP answer equals the in-process bank's: the same labels, scores within 1e-4."""
    for got, want in zip(answer["predictions"], expected, strict=True):
        assert (got["adapter"], got["label"]) == (want.adapter, want.label)
        assert got["scores"].keys() == want.scores.keys()
        assert max(abs(got["scores"][k] - want.scores[k]) for k in want.scores) < 1e-4


def test_a_missing_ray_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch):
    from qpeft_deploy.cli.main import QpeftGroup
    from qpeft_deploy.cli.serve import serve_command

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without the extra
    monkeypatch.delitem(sys.modules, "qpeft_deploy.serve.ray_engine", raising=False)
    group = QpeftGroup("qpeft")
    group.add_command(serve_command)
    args = ["serve", "--engine", "ray", "--base", "minilm", "--adapters", str(tmp_path)]
    result = CliRunner().invoke(group, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("qpeft: error: ") and "[ray]" in lines[0], lines[0]


@needs_ray
def test_bad_cli_input_is_one_line_before_ray_starts(tmp_path):
    from qpeft_deploy.cli.main import QpeftGroup
    from qpeft_deploy.cli.serve import serve_command

    group = QpeftGroup("qpeft")
    group.add_command(serve_command)
    ray_cli = ["serve", "--engine", "ray", "--base"]
    for args, words in (
        (
            [*ray_cli, str(tmp_path / "nobase"), "--adapters", str(tmp_path)],
            "nobase: base model folder not found",
        ),
        ([*ray_cli, "minilm", "--adapters", str(tmp_path / "none")], "none: adapters folder not found"),
        ([*ray_cli, "minilm", "--adapters", str(tmp_path), "--backend", "onnx"], "torch backend only"),
    ):
        result = CliRunner().invoke(group, args)
        assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
        assert words in result.output


@needs_ray
def test_builder_arguments_are_checked():
    from qpeft_deploy.serve.ray_engine import build_app

    with pytest.raises(ConfigError, match="max_adapters_per_replica"):
        build_app({"base": "minilm", "adapters": "x", "max_adapters_per_replica": 0})
    with pytest.raises(ConfigError, match="replicas"):
        build_app({"base": "minilm", "adapters": "x", "replicas": 2})  # the field is num_replicas


@needs_ray
def test_an_evicted_adapter_is_unloaded_once(adapters):
    from qpeft_deploy.serve.ray_engine import LoadedAdapter

    bank = AdapterBank.from_pretrained("minilm")
    bank.load("q1", adapters / "q1.qpeft")
    first = LoadedAdapter(bank, "q1", (1.5, 1.0))
    assert (
        first.first_load_ms() == (1.5, 1.0) and first.first_load_ms() is None
    )  # reported to one request only
    first.__del__()  # Ray's eviction
    assert bank.names() == []
    bank.load("q1", adapters / "q1.qpeft")  # loaded again: a new LoadedAdapter owns it
    first.__del__()  # garbage collection of the evicted one must not unload the new one
    assert bank.names() == ["q1"]


@needs_ray
@pytest.mark.slow
def test_ray_serve_classifies_generates_and_survives_a_replica_kill(adapters, reference, tmp_path_factory):
    import ray
    from ray import serve

    from qpeft_deploy.serve.ray_engine import APP, DEPLOYMENT, MODEL_ID_HEADER, build_app, local_cluster
    from tests.helpers import make_causal_adapter

    temp_dir, port = tmp_path_factory.mktemp("ray"), free_port()
    causal = tmp_path_factory.mktemp("causal")
    make_causal_adapter(causal / "lm.qpeft", seed=3)
    args = {"base": "minilm", "adapters": str(adapters), "num_replicas": 2, "max_adapters_per_replica": 2}
    args["num_cpus_per_replica"] = 0.5
    generator = {"base": "smollm2", "adapters": str(causal), "num_cpus_per_replica": 0.5}
    with local_cluster(num_cpus=2, port=port, temp_dir=str(temp_dir)):
        serve.run(build_app(args), name=APP, route_prefix="/")
        serve.run(build_app(generator), name="gen", route_prefix="/gen")
        assert ray_processes(temp_dir)  # the leak check below sees Ray's processes while they run
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

        def classify(name: str, retries: int = 0) -> httpx.Response:
            body = {"adapter": name, "texts": TEXTS}
            for attempt in range(retries + 1):
                try:
                    answer = client.post("/v1/classify", json=body, headers={MODEL_ID_HEADER: name})
                except httpx.TransportError:
                    if attempt == retries:
                        raise
                    continue
                if answer.status_code < 500 or attempt == retries:
                    return answer
            raise AssertionError("unreachable")

        loads = []
        for name in ["q0", "q1", "q2", "q3", "q0", "q2"]:  # 4 adapters over 2 replicas of 2: evictions
            answer = classify(name)
            assert answer.status_code == 200, answer.text
            assert_same(answer.json(), reference.classify(TEXTS, name))
            loads += [float(answer.headers["x-qpeft-load-ms"])] if "x-qpeft-load-ms" in answer.headers else []
        assert loads and all(ms < 1000 for ms in loads)
        replicas = {}
        for _ in range(12):
            health = client.get("/healthz").json()
            replicas[health["replica"]] = health["adapters"]
        assert all(1 <= count <= 2 for count in replicas.values()), replicas  # the LRU bound

        handle = serve.get_app_handle(APP).options(multiplexed_model_id="q3")  # the Python path
        answer = handle.classify.remote({"adapter": "q3", "texts": TEXTS}).result()
        assert_same(answer, reference.classify(TEXTS, "q3"))

        outside = adapters.parent / "outside0" / "q0.qpeft"
        for bad, status in (("../q0", 422), (str(outside), 422), ("link", 404), ("q9", 404)):
            answer = classify(bad)
            assert answer.status_code == status, (bad, answer.text)
            assert str(adapters) not in answer.text and "outside" not in answer.text

        prompt = {"prompt": "Name a colour.", "max_new_tokens": 6}
        generated = client.post("/gen/v1/generate", json=prompt, headers={MODEL_ID_HEADER: "lm"})
        assert generated.status_code == 200, generated.text
        bank = AdapterBank.from_pretrained("smollm2")
        bank.load("lm", causal / "lm.qpeft")
        (want,) = bank.generate("Name a colour.", "lm", 6)
        assert generated.json()["generations"][0]["tokens"] == want.tokens  # greedy: the same tokens
        base = client.post("/gen/v1/generate", json=prompt).json()["generations"][0]  # no adapter: the base
        assert (
            base["adapter"] is None and base["tokens"] == bank.generate("Name a colour.", None, 6)[0].tokens
        )
        wrong = client.post("/gen/v1/classify", json={"adapter": "lm", "texts": ["x"]})
        assert wrong.status_code == 422 and "v1/generate" in wrong.json()["error"]

        actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        victim = next(name for name in actors if name.startswith(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"))
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        retried = 0
        for i in range(8):  # every request answered, with at most one client retry
            first = classify(f"q{i % 4}")
            answer = first if first.status_code == 200 else classify(f"q{i % 4}", retries=1)
            retried += first.status_code != 200
            assert answer.status_code == 200, answer.text
            assert_same(answer.json(), reference.classify(TEXTS, f"q{i % 4}"))
        print(f"after the replica kill: {retried} of 8 requests retried once")
    assert wait_gone(temp_dir) == []  # no raylet, GCS or worker left


@needs_ray
@pytest.mark.slow
def test_cli_serves_with_ray_and_stops_on_sigterm(adapters, reference, tmp_path_factory):
    temp_dir, port = tmp_path_factory.mktemp("rayc"), free_port()
    command = [sys.executable, "-m", "qpeft_deploy.cli.main", "serve", "--engine", "ray", "--base", "minilm"]
    command += ["--adapters", str(adapters), "--port", str(port), "--replicas", "1", "--quiet"]
    server = subprocess.Popen(
        command, env=os.environ | ENV | {"RAY_TMPDIR": str(temp_dir)}, stdout=subprocess.DEVNULL
    )
    try:
        client, deadline, answer = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30), 90, None
        start = time.monotonic()
        while answer is None and time.monotonic() - start < deadline and server.poll() is None:
            try:
                answer = client.post("/v1/classify", json={"adapter": "q2", "texts": TEXTS})
                answer = answer if answer.status_code == 200 else None
            except httpx.TransportError:
                time.sleep(1)
        assert answer is not None, "the Ray server did not answer"
        assert_same(answer.json(), reference.classify(TEXTS, "q2"))
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert wait_gone(temp_dir) == []


@needs_ray
def test_the_sample_serve_config_is_valid():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from qpeft_deploy.serve.ray_engine import DEPLOYMENT, build_app

    config = yaml.safe_load((Path(__file__).parents[1] / "samples" / "serve_ray.yaml").read_text())
    app = ServeDeploySchema.model_validate(config).applications[0]
    assert app.import_path == "qpeft_deploy.serve.ray_engine:build_app"
    built = build_app(app.args)  # the arguments are RayServeArgs'
    deployment = built._bound_deployment
    assert deployment.name == DEPLOYMENT
    assert deployment._deployment_config.autoscaling_config.max_replicas == 8
