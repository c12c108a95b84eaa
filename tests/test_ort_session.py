"""Tests of qpeft_deploy.runtime.ort_session: one onnxruntime session over a swappable MiniLM export serving
trained adapters with 2 and 6 labels, per call and per row, from several threads; bad adapters refused."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_onnx_export import adapter_file, exported, other_base_adapter, probe_batches, torch_logits

from qpeft_deploy.core.attach import adapted_layers, attach
from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.export.onnx.export import export_onnx_adapter
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.io.onnx_adapter import MODEL_FILE, read_onnx_adapter, write_ort_adapter
from qpeft_deploy.models import load_task_model
from qpeft_deploy.runtime.ort_session import OrtAdapterSession


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Trained adapters (rt: 2 labels, trec6: 6 labels; shared with test_onnx_export), their ORT adapter files
    and two swappable exports of the 2-label one (factors and angles)."""
    folder = tmp_path_factory.mktemp("runtime")
    for name in ("two", "six"):
        shutil.copy(adapter_file(name), folder / f"{name}.qpeft")
        for swap in ("factors", "angles"):
            export_onnx_adapter(adapter_file(name), folder / f"{name}-{swap}.onnx_adapter", swap=swap)
    for swap in ("factors", "angles"):
        (folder / swap).symlink_to(
            exported("two", "swappable", **({"swap": "angles"} if swap == "angles" else {}))[0]
        )
    return folder


@pytest.fixture(scope="module")
def batches():
    """A padded batch and a batch of another shape (as in test_onnx_export)."""
    return probe_batches()


@pytest.fixture(scope="module")
def expected():
    """torch logits of each adapter on each batch."""
    return {name: [torch_logits(name, i) for i in range(2)] for name in ("two", "six")}


@pytest.fixture(scope="module")
def shared(files):
    """One session over the factors export with 'six' (an ORT adapter file) and 'two' (a .qpeft) loaded."""
    session = OrtAdapterSession(files / "factors" / MODEL_FILE, threads=1)
    session.load("six", files / "six-factors.onnx_adapter")
    session.load("two", files / "two.qpeft")
    return session


def close(got, want) -> bool:
    return got.shape == want.shape and float(np.abs(got - want).max()) <= 1e-4


def test_swapping_two_adapters_in_one_session(shared, batches, expected):
    session = shared
    assert session.names() == ["six", "two"] and session.labels("two") == ["rotten", "fresh"]
    for i, batch in enumerate(batches):
        for name in ("six", "two", "six"):
            assert close(session(batch, adapter=name), expected[name][i])
        assert close(session(batch, adapter=None), expected["two"][i])  # the exported default


def test_angles_session_swaps_too(files, batches, expected):
    session = OrtAdapterSession(files / "angles" / MODEL_FILE)
    session.load("six", files / "six-angles.onnx_adapter")
    for i, batch in enumerate(batches):
        assert close(session(batch, adapter="six"), expected["six"][i])
        assert close(session(batch), expected["two"][i])


def test_mixed_batch_is_split_and_merged_in_row_order(shared, batches, expected):
    session = shared
    rows = session(batches[0], adapter=["six", None, "two"])
    assert isinstance(rows, list)  # 6 and 2 labels cannot share one array
    assert [r.shape for r in rows] == [(6,), (2,), (2,)]
    assert close(rows[0], expected["six"][0][0]) and close(rows[2], expected["two"][0][2])
    same = session(batches[0], adapter=["two", None, "two"])
    assert close(same, expected["two"][0])
    session.default_adapter = "six"
    try:
        assert close(session(batches[1]), expected["six"][1])
    finally:
        session.default_adapter = None


def test_concurrent_calls_get_their_own_adapter(shared, batches, expected):
    session = shared
    jobs = [("six" if i % 2 else "two", i % 2) for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: session(batches[job[1]], adapter=job[0]), jobs))
    assert all(close(got, expected[name][b]) for got, (name, b) in zip(results, jobs))


def test_unknown_and_unloaded_names(files, batches):
    session = OrtAdapterSession(files / "factors" / MODEL_FILE)
    session.load("two", files / "two-factors.onnx_adapter")
    with pytest.raises(ConfigError, match="unknown adapter 'nope'"):
        session(batches[0], adapter="nope")
    with pytest.raises(ConfigError, match="3 rows"):
        session(batches[0], adapter=["two"])
    session.unload("two")
    assert session.names() == []
    with pytest.raises(ConfigError, match="unknown adapter 'two'"):
        session(batches[0], adapter="two")


def other_targets_adapter(path):
    """A 2-label adapter on the attention queries and values only (another target set)."""
    model = load_task_model("minilm", {0: "neg", 1: "pos"}, seed=5)
    attach(model, targets=["query", "value"], rank=8, seed=5)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.spectrum.lam.normal_(0, 0.3)
    return save_adapter(model, path, base="minilm")


def test_bad_adapters_are_refused_before_any_run(files, batches, expected, tmp_path):
    session = OrtAdapterSession(files / "factors" / MODEL_FILE)
    other = other_targets_adapter(tmp_path / "qv.qpeft")
    export_onnx_adapter(other, tmp_path / "qv.onnx_adapter")
    for bad in (other, tmp_path / "qv.onnx_adapter", files / "six-angles.onnx_adapter"):
        with pytest.raises(ConfigError, match="does not fit"):
            session.load("bad", bad)
    foreign = other_base_adapter(files / "two.qpeft", tmp_path / "foreign.qpeft")
    export_onnx_adapter(foreign, tmp_path / "foreign.onnx_adapter")
    for bad in (foreign, tmp_path / "foreign.onnx_adapter"):
        with pytest.raises(BaseMismatchError):
            session.load("bad", bad)
    structure, base, params = read_onnx_adapter(files / "six-factors.onnx_adapter")
    params["qpeft.encoder.layer.2.output.dense.v"][3, 1] = np.nan
    write_ort_adapter(tmp_path / "nan.onnx_adapter", params, structure, base)
    with pytest.raises(FormatError, match="NaN"):
        session.load("bad", tmp_path / "nan.onnx_adapter")
    with pytest.raises(FormatError, match="not an onnxruntime adapter"):
        session.load("bad", files / "factors" / "config.json")
    assert session.names() == []
    assert close(session(batches[0]), expected["two"][0])


def test_plain_model_cannot_load_adapters(files, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["y"])],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "s"])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
        tmp_path / "m.onnx",
    )
    session = OrtAdapterSession(tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="not a swappable model"):
        session.load("two", files / "two-factors.onnx_adapter")
    assert session({"input_ids": np.ones((2, 3), np.int64)}).tolist() == [[1, 1, 1], [1, 1, 1]]
