"""Tests of qpeft_deploy.serve.app and ``qpeft serve``: real uvicorn on loopback, real adapters and HTTP."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from click.testing import CliRunner

from qpeft_deploy.cli.main import QpeftGroup
from qpeft_deploy.cli.serve import serve_command
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.export.onnx.export import export_onnx
from qpeft_deploy.io.model_io import load_adapted_model
from qpeft_deploy.io.qpeft_file import read_adapter, write_adapter
from qpeft_deploy.models import load_tokenizer, resolve_base, tokenize
from qpeft_deploy.runtime.bank import AdapterBank
from qpeft_deploy.serve.app import (
    MicroBatcher,
    Redactor,
    ServeSettings,
    create_app,
    load_folder,
    make_backend,
    redactor,
)
from tests.helpers import make_adapter

TWO = {0: "ham", 1: "spam"}
SIX = {i: name for i, name in enumerate(["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])}
TEXTS = [
    "a gorgeous, moving film",
    "dull and far too long",
    "who wrote hamlet?",
    "how far is the moon?",
    "call now to win a prize",
    "see you at 8",
    "not bad at all",
    "what does NASA stand for?",
]
SPECS = {
    "sentiment": (TWO, {"seed": 11}),
    "topic": (SIX, {"seed": 12, "rank": 4}),
    "spam": (TWO, {"seed": 13, "targets": ["query", "value", "dense"]}),
}
SETTINGS = ServeSettings(
    max_texts=4,
    max_text_chars=300,
    max_batch_rows=16,
    batch_window_s=0.01,
    max_body_bytes=64 << 10,
    max_upload_bytes=1 << 20,
)


POISON = "bad \ud800 text"  # a lone surrogate: valid JSON (an escape), but no tokenizer encodes it
FAULT = "this text trips an injected fault"
ABSOLUTE_PATH = re.compile(r"(^|[\s'\"(])/\w")


class RecordingBank(AdapterBank):
    """The real bank, also noting the adapters each backend call mixed (to see the server batch requests);
    a call with the text FAULT fails with a RuntimeError while ``faulty`` is set (a stand-in for a bug)."""

    batches: list[list[str]]
    calls: list[list[str]]
    faulty = False

    def classify(self, texts, adapter=None):
        self.batches.append(list(adapter))
        self.calls.append(list(texts))
        if self.faulty and FAULT in texts:
            raise RuntimeError("injected fault")
        return super().classify(texts, adapter)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    for name, (labels, options) in SPECS.items():
        make_adapter(folder / f"{name}.qpeft", labels, **options)
    return folder


@pytest.fixture(scope="module")
def expected(folder):
    """(label, scores) of every adapter on every text, from each adapter's own model (no bank involved)."""
    inputs = tokenize(load_tokenizer("minilm"), TEXTS)
    out = {}
    for name in SPECS:
        model = load_adapted_model("minilm", folder / f"{name}.qpeft")
        labels = list(model.config.id2label.values())
        with torch.no_grad():
            probs = torch.softmax(model(**inputs).logits, -1)
        out[name] = [(labels[int(p.argmax())], dict(zip(labels, p.tolist()))) for p in probs]
    return out


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running(app):
    """A real uvicorn server for ``app`` on 127.0.0.1 (a free port) in a thread, as an httpx client."""
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server(folder):
    """The torch backend (a real bank, recording its batches) served over loopback HTTP."""
    backend = RecordingBank.from_pretrained("minilm")
    backend.batches, backend.calls = [], []
    assert load_folder(backend, folder).names == sorted(SPECS)
    with running(create_app(backend, folder, SETTINGS)) as client:
        yield client, backend


def check(response, name, texts_idx, expected):
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["adapter"] == name and len(body["predictions"]) == len(texts_idx)
    for p, i in zip(body["predictions"], texts_idx):
        label, scores = expected[name][i]
        if p["label"] != label or p["scores"].keys() != scores.keys():
            return False
        if any(abs(p["scores"][k] - v) > 1e-4 for k, v in scores.items()):
            return False
    return True


def test_health_and_listing(server):
    client, _ = server
    assert client.get("/healthz").json() == {"status": "ok", "adapters": 3, "skipped": 0}
    listing = client.get("/v1/adapters").json()
    assert {a["name"]: a["labels"] for a in listing["adapters"]} == {
        n: list(s[0].values()) for n, s in SPECS.items()
    }
    assert listing["skipped"] == []


def test_classify_matches_each_adapters_own_model(server, expected):
    client, _ = server
    for name in SPECS:
        response = client.post("/v1/classify", json={"adapter": name, "texts": TEXTS[:4]})
        assert check(response, name, range(4), expected)


def test_8_threads_x_50_requests_across_3_adapters_all_correct(server, expected):
    client, backend = server
    backend.batches.clear()
    names = list(SPECS)

    def run(thread: int) -> int:
        wrong = 0
        for r in range(50):
            name = names[(thread + r) % 3]
            idx = [(thread * 7 + r) % len(TEXTS), (thread + 3 * r) % len(TEXTS)][: 1 + (r % 2)]
            response = client.post("/v1/classify", json={"adapter": name, "texts": [TEXTS[i] for i in idx]})
            wrong += not check(response, name, idx, expected)
        return wrong

    with ThreadPoolExecutor(8) as pool:
        wrong = sum(pool.map(run, range(8)))
    assert wrong == 0
    assert sum(len(b) for b in backend.batches) == 8 * 50 * 1.5
    assert any(len(set(b)) > 1 for b in backend.batches), "concurrent requests were never batched together"


def test_micro_batcher_splits_at_max_rows_and_stops(server, expected):
    _, backend = server
    batcher = MicroBatcher(backend, window_s=0.2, max_rows=4)
    batcher.start()
    backend.batches.clear()
    jobs = [("topic", [0, 1]), ("spam", [2, 3]), ("sentiment", [4, 5]), ("nope", [6])]
    futures = [batcher.submit([name] * len(idx), [TEXTS[i] for i in idx]) for name, idx in jobs]
    batcher.close()  # finishes the queued work first
    # 2 + 2 rows, then 2 + 1 (and then the bad job retried alone)
    assert [len(b) for b in backend.batches][:2] == [4, 3]
    for (name, idx), future in zip(jobs[:3], futures[:3]):
        assert [p.label for p in future.result(timeout=0)] == [expected[name][i][0] for i in idx]
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        futures[3].result(timeout=0)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"adapter": "nope", "texts": ["hi"]}, 404, "no adapter named 'nope'"),
        ({"adapter": "topic", "texts": []}, 422, "1 to 4 strings"),
        ({"adapter": "topic", "texts": ["hi"] * 5}, 422, "1 to 4 strings"),
        ({"adapter": "topic", "texts": ["x" * 301]}, 422, "texts[0] has 301 characters"),
        ({"adapter": "topic", "texts": ["ok", 7]}, 422, "texts.1: Input should be a valid string"),
        ({"adapter": "topic", "texts": "hi"}, 422, "texts: Input should be a valid list"),
        ({"adapter": 3, "texts": ["hi"]}, 422, "adapter"),
        ({"adapter": ["topic"], "texts": ["a", "b"]}, 422, "1 adapter names for 2 texts"),
        ({"adapter": ["topic", "nope"], "texts": ["a", "b"]}, 404, "(loaded: "),
        ({"texts": ["hi"]}, 422, "adapter: Field required"),
        ([1, 2], 422, "JSON object"),
    ],
)
def test_bad_classify_requests_are_json_4xx(server, body, status, message):
    client, _ = server
    response = client.post("/v1/classify", json=body)
    assert response.status_code == status and message in response.json()["error"]


def test_malformed_oversized_and_untyped_bodies(server, expected):
    client, _ = server
    json_type = {"content-type": "application/json"}
    for raw, status in (
        (b'{"adapter": "topic", "texts": [', 400),
        (b"\xff\xfe", 400),
        (b"NaN", 400),
        (b'{"adapter": "topic", "adapter": "spam", "texts": ["a"]}', 400),
        (b"x" * (65 << 10), 413),
    ):
        response = client.post("/v1/classify", content=raw, headers=json_type)
        assert response.status_code == status and response.json()["error"]
    response = client.post("/v1/classify", content=b"adapter=topic", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert check(
        client.post("/v1/classify", json={"adapter": "topic", "texts": TEXTS[:2]}), "topic", [0, 1], expected
    )


def test_loading_from_the_folder_only(server, folder, expected, tmp_path):
    client, backend = server
    (folder / "topic2.qpeft").write_bytes((folder / "topic.qpeft").read_bytes())
    outside = tmp_path / "outside.qpeft"
    outside.write_bytes((folder / "spam.qpeft").read_bytes())
    (folder / "escape.qpeft").symlink_to(outside)
    try:
        loaded = load_folder(backend, folder)  # at start-up too, a link out of the folder is refused
        assert "no adapter file escape.qpeft" in loaded.skipped["escape.qpeft"]
        assert "escape" not in loaded.names and "topic2" in loaded.names
        check_folder_loading(client, outside, expected)
    finally:
        (folder / "topic2.qpeft").unlink()
        (folder / "escape.qpeft").unlink()


def check_folder_loading(client, outside, expected):
    response = client.post("/v1/adapters", json={"name": "topic2"})
    assert response.status_code == 201 and response.json()["labels"] == list(SIX.values())
    response = client.post("/v1/classify", json={"adapter": "topic2", "texts": TEXTS[:3]})
    assert check(response, "topic2", range(3), {"topic2": expected["topic"]})
    assert client.post("/v1/adapters", json={"name": "escape"}).status_code == 404
    assert client.post("/v1/adapters", json={"name": "missing"}).status_code == 404
    for name in ("../spam", str(outside), "/etc/passwd", "a/b", ""):
        response = client.post("/v1/adapters", json={"name": name})
        assert response.status_code == 422 and "invalid adapter name" in response.json()["error"]
    assert client.post("/v1/adapters", json={"path": str(outside)}).status_code == 422
    assert client.delete("/v1/adapters/topic2").json() == {"unloaded": "topic2"}
    assert client.delete("/v1/adapters/topic2").status_code == 404


def test_uploads_are_verified_like_files(server, folder, expected):
    client, _ = server
    good = (folder / "spam.qpeft").read_bytes()
    octet = {"content-type": "application/octet-stream"}
    for data in (good[:-5], b"\x08" + b"\x00" * 15, b"not a safetensors file at all"):
        response = client.post("/v1/adapters", params={"name": "up"}, content=data, headers=octet)
        assert response.status_code == 400 and "upload up" in response.json()["error"]
        assert "/tmp" not in response.json()["error"]
    too_big = client.post("/v1/adapters", params={"name": "up"}, content=bytes((1 << 20) + 1), headers=octet)
    assert too_big.status_code == 413
    bad_name = client.post("/v1/adapters", params={"name": "../up"}, content=good, headers=octet)
    assert bad_name.status_code == 422
    response = client.post("/v1/adapters", params={"name": "up"}, content=good, headers=octet)
    assert response.status_code == 201 and not (folder / "up.qpeft").exists()
    assert check(
        client.post("/v1/classify", json={"adapter": "up", "texts": TEXTS[4:6]}),
        "up",
        [4, 5],
        {"up": expected["spam"]},
    )
    client.delete("/v1/adapters/up")
    assert client.get("/healthz").json()["adapters"] == 3


def post_json(client, body, path="/v1/classify"):
    """POST ``body`` as ASCII JSON (a lone surrogate travels as an escape, as careless clients send it)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def test_micro_batcher_fails_only_the_bad_jobs_of_a_batch(server, expected):
    """A tokenizer refusal (lone surrogate) and a bug (injected RuntimeError) in one mixed batch each fail
    their own job only; the other jobs of that batch get the right answers."""
    _, backend = server
    batcher = MicroBatcher(backend, window_s=0.3, max_rows=16)
    batcher.start()
    backend.batches.clear()
    backend.calls.clear()
    jobs = [("topic", [0, 1]), ("spam", POISON), ("sentiment", [2]), ("topic", FAULT), ("spam", [3, 4])]
    backend.faulty = True
    try:
        futures = [
            batcher.submit(
                [name] * (1 if isinstance(rows, str) else len(rows)),
                [rows] if isinstance(rows, str) else [TEXTS[i] for i in rows],
            )
            for name, rows in jobs
        ]
        batcher.close()
    finally:
        backend.faulty = False
    assert len(backend.calls[0]) == 7 and POISON in backend.calls[0] and FAULT in backend.calls[0]
    for (name, rows), future in zip(jobs, futures):
        if rows == POISON:
            with pytest.raises(ConfigError, match="cannot tokenize"):
                future.result(timeout=0)
        elif rows == FAULT:
            with pytest.raises(RuntimeError, match="injected fault"):
                future.result(timeout=0)
        else:
            assert [p.label for p in future.result(timeout=0)] == [expected[name][i][0] for i in rows]


def test_bad_requests_fail_alone_among_concurrent_good_ones(server, folder, expected):
    """Over HTTP, 8 requests at once into one batching window: a lone surrogate is a 422 (checked before
    batching), a request that trips a bug is a 500; the 6 good ones are answered correctly."""
    _, backend = server
    slow = replace(SETTINGS, batch_window_s=0.3)
    requests = [("topic", [TEXTS[i]], i) for i in range(3)] + [("spam", [TEXTS[i]], i) for i in range(3, 6)]
    requests += [("sentiment", [POISON], None), ("sentiment", [FAULT], None)]
    barrier = threading.Barrier(len(requests))
    backend.faulty = True
    try:
        with running(create_app(backend, folder, slow)) as client:
            backend.calls.clear()

            def send(request):
                name, texts, _ = request
                barrier.wait()
                return post_json(client, {"adapter": name, "texts": texts})

            with ThreadPoolExecutor(len(requests)) as pool:
                responses = list(pool.map(send, requests))
    finally:
        backend.faulty = False
    for (name, texts, i), response in zip(requests, responses):
        if texts == [POISON]:
            assert response.status_code == 422
            assert response.json() == {
                "error": "texts[0] is not valid Unicode: a lone surrogate at character 4"
            }
        elif texts == [FAULT]:
            assert response.status_code == 500 and response.json() == {"error": "internal error"}
        else:
            assert check(response, name, [i], expected)
    assert not any(POISON in call for call in backend.calls)
    assert any(FAULT in call and len(call) > 1 for call in backend.calls), "the fault was never co-batched"


def other_base(source, target):
    """A copy of an adapter file whose stored base fingerprint matches no real base."""
    adapter = read_adapter(source)
    adapter.fingerprint = {k: b"\x00" * 8 for k in adapter.fingerprint}
    write_adapter(target, adapter)
    return target


def assert_no_server_path(message, *folders):
    assert not ABSOLUTE_PATH.search(message), message
    for path in (*folders, resolve_base("minilm")):
        assert str(path) not in message, message


def test_unreadable_adapter_files_are_skipped_and_listed(server, folder, tmp_path):
    """Start-up loads the good files, skips (with a path-free reason) a truncated, an empty, a wrong-base file
    and a folder named like a file, and lists them until a good file of that name is loaded."""
    _, backend = server
    served = tmp_path / "served"
    served.mkdir()
    good = (folder / "sentiment.qpeft").read_bytes()
    (served / "sentiment.qpeft").write_bytes(good)
    (served / "cut.qpeft").write_bytes(good[:-9])
    (served / "empty.qpeft").write_bytes(b"")
    other_base(folder / "spam.qpeft", served / "foreign.qpeft")
    (served / "folder.qpeft").mkdir()
    loaded = load_folder(backend, served)
    assert loaded.names == ["sentiment"]
    assert sorted(loaded.skipped) == ["cut.qpeft", "empty.qpeft", "folder.qpeft", "foreign.qpeft"]
    assert "differs from the adapter's base model" in loaded.skipped["foreign.qpeft"]
    with running(create_app(backend, served, SETTINGS, loaded.skipped)) as client:
        assert client.get("/healthz").json()["skipped"] == 4
        listing = client.get("/v1/adapters").json()["skipped"]
        assert [entry["file"] for entry in listing] == sorted(loaded.skipped)
        for entry in listing:
            assert entry["error"].startswith(entry["file"]) or "no adapter file" in entry["error"], entry
            assert_no_server_path(entry["error"], served)
        (served / "cut.qpeft").write_bytes(good)
        assert client.post("/v1/adapters", json={"name": "cut"}).status_code == 201
        assert "cut.qpeft" not in [e["file"] for e in client.get("/v1/adapters").json()["skipped"]]
        assert client.delete("/v1/adapters/cut").status_code == 200


def test_error_messages_name_no_server_path(server, folder):
    """409, 400, 404, 413, 415 and 422 answers name adapters and files, never the adapters or base folder."""
    client, _ = server
    other_base(folder / "spam.qpeft", folder / "foreign.qpeft")
    (folder / "cut.qpeft").write_bytes((folder / "spam.qpeft").read_bytes()[:-9])
    octet = {"content-type": "application/octet-stream"}
    try:
        answers = {
            409: client.post("/v1/adapters", json={"name": "foreign"}),
            400: client.post("/v1/adapters", json={"name": "cut"}),
            404: client.post("/v1/adapters", json={"name": "missing"}),
            413: client.post("/v1/adapters", params={"name": "x"}, content=bytes(2 << 20), headers=octet),
            415: client.post("/v1/classify", content=b"x", headers={"content-type": "text/plain"}),
            422: client.post("/v1/adapters", json={"name": "/etc/passwd"}),
        }
        upload = (folder / "foreign.qpeft").read_bytes()
        answers[4090] = client.post("/v1/adapters", params={"name": "up"}, content=upload, headers=octet)
        answers[4040] = client.get("/no/such/route")
    finally:
        (folder / "foreign.qpeft").unlink()
        (folder / "cut.qpeft").unlink()
    for status, response in answers.items():
        assert response.status_code == (status if status < 1000 else status // 10), response.text
        message = response.json()["error"]
        assert message and "\n" not in message
        assert_no_server_path(message, folder)
    assert answers[409].json()["error"].startswith("foreign.qpeft: the served base model: tensor ")
    assert answers[4090].json()["error"].startswith("upload up: the served base model: tensor ")
    assert answers[400].json()["error"].startswith("cut.qpeft: ")
    assert answers[4040].json() == {"error": "Not Found"}
    wrong_method = client.put("/v1/classify")
    assert wrong_method.status_code == 405 and wrong_method.json() == {"error": "Method Not Allowed"}
    assert wrong_method.headers["allow"] == "POST"


def test_redactor_names_folders_by_role_and_files_by_name():
    redact = redactor(AdapterBank.__new__(AdapterBank), Path("/srv/adapters"))  # no base: the folder only
    assert (
        redact("/srv/adapters/a.qpeft: bad; /srv/adapters: empty")
        == "a.qpeft: bad; the adapters folder: empty"
    )
    redact = Redactor({Path("/opt/base"): "the served base model"})
    message = "x.qpeft: /opt/base: tensor k differs; see /home/u/tmp/y.safetensors (or 'a/b')\n\ud800"
    assert (
        redact(message)
        == "x.qpeft: the served base model: tensor k differs; see y.safetensors (or 'a/b') \\ud800"
    )


def test_cli_errors_are_one_line():
    group = QpeftGroup("qpeft")
    group.add_command(serve_command)
    result = CliRunner().invoke(group, ["serve", "--adapters", "/no/such/folder"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "/no/such/folder: adapters folder not found" in result.output
    result = CliRunner().invoke(group, ["serve", "--adapters", "/", "--backend", "onnx"])
    assert result.exit_code == 2 and "--onnx-model" in result.output


def test_qpeft_serve_command_answers_http(folder, expected, tmp_path):
    """The real command starts with one unreadable file in the folder: it serves the rest and lists it."""
    served = tmp_path / "served"
    served.mkdir()
    for file in folder.glob("*.qpeft"):
        (served / file.name).write_bytes(file.read_bytes())
    (served / "broken.qpeft").write_bytes(b"\x08" + b"\x00" * 15)
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # the child binds it again (SO_REUSEADDR); a clash would show as a failed start below
    code = (
        "import sys; from qpeft_deploy.cli.main import QpeftGroup; from qpeft_deploy.cli.serve import "
        "serve_command; g = QpeftGroup('qpeft'); g.add_command(serve_command); g(sys.argv[1:])"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = ["serve", "--base", "minilm", "--adapters", str(served), "--port", str(port), "--quiet"]
    child = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(600):
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    assert child.poll() is None, child.stderr.read().decode()
                    time.sleep(0.1)
            response = client.post("/v1/classify", json={"adapter": "topic", "texts": TEXTS[2:4]})
            assert check(response, "topic", [2, 3], expected)
            assert client.get("/healthz").json() == {"status": "ok", "adapters": 3, "skipped": 1}
            (skipped,) = client.get("/v1/adapters").json()["skipped"]
            assert skipped["file"] == "broken.qpeft" and str(served) not in skipped["error"]
    finally:
        child.terminate()
        child.wait(timeout=30)


def test_onnx_backend_serves_the_same_answers(tmp_path):
    """The onnx backend (OrtAdapterSession, swappable export) behind the same HTTP API, checked against the
    torch bank on the same adapters (small ones: one target, so the export stays quick)."""
    served = tmp_path / "served"
    served.mkdir()
    for name, labels, seed in (("two", TWO, 21), ("six", SIX, 22)):
        make_adapter(served / f"{name}.qpeft", labels, seed, targets=["query"], rank=4)
    export_onnx("minilm", served / "two.qpeft", tmp_path / "export", mode="swappable", quiet=True)
    backend = make_backend("onnx", "minilm", onnx_model=tmp_path / "export")
    bank = AdapterBank.from_pretrained("minilm")
    assert load_folder(backend, served).names == load_folder(bank, served).names == ["six", "two"]
    names = ["two", "six", "six", "two"]
    reference = bank.classify(TEXTS[:4], adapter=names)
    with running(create_app(backend, served, SETTINGS)) as client:
        listing = client.get("/v1/adapters").json()["adapters"]
        assert listing[0] == {"name": "six", "labels": list(SIX.values())}
        for i, (name, want) in enumerate(zip(names, reference)):
            response = client.post("/v1/classify", json={"adapter": name, "texts": [TEXTS[i]]})
            got = response.json()["predictions"]
            assert got[0]["label"] == want.label
            assert all(abs(got[0]["scores"][k] - v) < 1e-4 for k, v in want.scores.items())
        assert client.post("/v1/classify", json={"adapter": "nope", "texts": ["x"]}).status_code == 404


def test_a_peft_native_folder_is_served_like_its_qpeft_file(folder, expected, tmp_path):
    """A PEFT user's folder (``qpeft export peft`` writes one like ``save_pretrained``) is served by its name
    and answers exactly what the .qpeft file it came from answers."""
    from qpeft_deploy.io.peft_native import export_peft

    served = tmp_path / "served"
    served.mkdir()
    export_peft(folder / "topic.qpeft", served / "topic-peft")
    (served / "notes").mkdir()  # a plain subfolder is not an adapter
    backend = AdapterBank.from_pretrained("minilm")
    assert load_folder(backend, served).names == ["topic-peft"]
    with running(create_app(backend, served, SETTINGS)) as client:
        response = client.post("/v1/classify", json={"texts": TEXTS[:4], "adapter": "topic-peft"})
        assert check(response, "topic-peft", range(4), {"topic-peft": expected["topic"]})
        assert client.post("/v1/adapters", json={"name": "topic-peft"}).status_code == 201  # reloaded
        assert client.post("/v1/adapters", json={"name": "notes"}).status_code == 404


# ------------------------------------------------------------------------------------------- /v1/generate


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory):
    """A causal-LM bank (SmolLM2, two adapters) served over loopback HTTP."""
    from tests.helpers import make_causal_adapter

    folder = tmp_path_factory.mktemp("llm")
    make_causal_adapter(folder / "pirate.qpeft", seed=21, scale=0.5)
    make_causal_adapter(folder / "poet.qpeft", seed=22, scale=1.0, rank=4)
    backend = make_backend("torch", "smollm2")
    assert load_folder(backend, folder).names == ["pirate", "poet"]
    settings = replace(SETTINGS, max_new_tokens=8)
    with running(create_app(backend, folder, settings)) as client:
        yield client, backend


def test_generate_answers_what_the_bank_generates(llm_server):
    client, bank = llm_server
    prompts = ["Name a colour.", "Write a haiku about rain, please."]
    body = {"prompts": prompts, "adapter": ["pirate", None], "max_new_tokens": 6}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    want = bank.generate(prompts, ["pirate", None], 6)
    assert response.json()["generations"] == [
        {"adapter": g.adapter, "text": g.text, "tokens": g.tokens, "finish_reason": g.finish_reason}
        for g in want
    ]
    one = client.post("/v1/generate", json={"prompt": prompts[1], "adapter": "poet", "max_new_tokens": 6})
    assert (
        one.status_code == 200
        and one.json()["generations"][0]["tokens"] == bank.generate(prompts[1], "poet", 6)[0].tokens
    )
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/v1/generate"]["post"]
    request = operation["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompts", "prompt", "adapter", "max_new_tokens"} <= set(request["properties"])
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "GenerateResponse"
    )
    assert "GeneratedText" in schema["components"]["schemas"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"prompt": "hi", "adapter": "nope"},
            404,
            "no adapter named 'nope' is loaded (loaded: pirate, poet)",
        ),
        ({"prompts": ["hi", "yo"], "adapter": ["poet", "nope"]}, 404, "(loaded: pirate, poet)"),
        ({"prompt": "hi", "max_new_tokens": 9}, 422, "max_new_tokens is 9; the limit is 8"),
        ({"prompt": "hi", "max_new_tokens": "8"}, 422, "max_new_tokens: Input should be a valid integer"),
        ({"prompt": "hi", "prompts": ["hi"]}, 422, "either prompts"),
        ({"prompts": []}, 422, "prompts must be a list of 1 to 4"),
        ({"prompts": ["hi"], "adapter": ["poet", "poet"]}, 422, "2 adapter names for 1 prompts"),
        ({"prompt": "hi", "extra": 1}, 422, "extra: Extra inputs are not permitted"),
        ({"prompt": "x" * 301}, 422, "prompts[0] has 301 characters"),
    ],
)
def test_bad_generate_requests_are_json_4xx(llm_server, body, status, message):
    client, _ = llm_server
    response = client.post("/v1/generate", json=body)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_classify_and_generate_each_refuse_the_other_kind_of_base(llm_server, server):
    response = llm_server[0].post("/v1/classify", json={"adapter": "poet", "texts": ["hi"]})
    assert response.status_code == 422 and "use the v1/generate endpoint" in response.json()["error"]
    response = server[0].post("/v1/generate", json={"prompt": "hi", "adapter": "topic"})
    assert response.status_code == 422 and "use the v1/classify endpoint" in response.json()["error"]


def test_classify_takes_an_adapter_per_text_and_publishes_its_schemas(server, expected):
    client, _ = server
    texts, names = [TEXTS[0], TEXTS[1], TEXTS[2]], ["topic", "spam", "topic"]
    body = client.post("/v1/classify", json={"adapter": names, "texts": texts}).json()
    assert body["adapter"] == names and [p["adapter"] for p in body["predictions"]] == names
    for name, text, got in zip(names, texts, body["predictions"]):
        alone = client.post("/v1/classify", json={"adapter": name, "texts": [text]}).json()["predictions"][0]
        assert (
            got["label"] == alone["label"] and got["adapter"] == alone["adapter"]
        )  # neighbours change nothing
        assert all(abs(got["scores"][k] - alone["scores"][k]) <= 1e-5 for k in alone["scores"])
    spec = client.get("/openapi.json").json()
    assert {"ClassifyResponse", "PredictionOut"} <= spec["components"]["schemas"].keys()
    request = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert request["title"] == "ClassifyRequest" and set(request["required"]) == {"adapter", "texts"}
