"""Tests of qpeft_deploy.runtime.ort_session and the onnxruntime boundary (io/onnx_adapter.py, io/ort.py): one
onnxruntime session over a swappable MiniLM export serving trained adapters with 2 and 6 labels, per call and per
row, from several threads, reloaded while they run; bad, damaged and unsigned adapter files; onnxruntime's errors
as one line."""

from __future__ import annotations

import gc
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from test_onnx_export import adapter_file, exported, other_base_adapter, probe_batches, torch_logits

from qpeft_deploy.core.attach import adapted_layers, attach
from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.export.onnx.export import export_onnx_adapter
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.io.onnx_adapter import (
    DIGEST_BYTES,
    DIGEST_MAGIC,
    MAX_ABS,
    MODEL_FILE,
    read_onnx_adapter,
    swap_parameters,
    write_ort_adapter,
)
from qpeft_deploy.io.ort import ort_errors, ort_message
from qpeft_deploy.io.qpeft_file import read_adapter
from qpeft_deploy.models import load_task_model
from qpeft_deploy.runtime.ort_session import OrtAdapterSession
from tests.helpers import make_adapter


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


def test_a_peft_native_folder_loads_like_its_qpeft_file(files, batches, expected, tmp_path):
    from qpeft_deploy.io.peft_native import export_peft

    export_peft(files / "six.qpeft", tmp_path / "six-peft")
    session = OrtAdapterSession(files / "factors" / MODEL_FILE, threads=1)
    session.load("six", tmp_path / "six-peft")
    for i, batch in enumerate(batches):
        assert close(session(batch, adapter="six"), expected["six"][i])


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
    for bad in (other, tmp_path / "qv.onnx_adapter"):
        with pytest.raises(ConfigError, match="does not fit"):
            session.load("bad", bad)
    foreign = other_base_adapter(files / "two.qpeft", tmp_path / "foreign.qpeft")
    export_onnx_adapter(foreign, tmp_path / "foreign.onnx_adapter")
    for bad in (foreign, tmp_path / "foreign.onnx_adapter"):
        with pytest.raises(BaseMismatchError):
            session.load("bad", bad)
    structure, base, params, _ = read_onnx_adapter(files / "six-factors.onnx_adapter")
    params["qpeft.encoder.layer.2.output.dense.v"][3, 1] = np.nan
    write_ort_adapter(tmp_path / "nan.onnx_adapter", params, structure, base)
    with pytest.raises(FormatError, match="NaN"):
        session.load("bad", tmp_path / "nan.onnx_adapter")
    with pytest.raises(FormatError, match="not an onnxruntime adapter"):
        session.load("bad", files / "factors" / "config.json")
    assert session.names() == []
    assert close(session(batches[0]), expected["two"][0])


def test_an_adapter_of_the_other_swap_kind_says_which_kind_the_model_expects(files, tmp_path):
    factors, angles = (OrtAdapterSession(files / kind / MODEL_FILE) for kind in ("factors", "angles"))
    for session, adapter, kind, other in (
        (factors, files / "six-angles.onnx_adapter", "angles", "factors"),
        (angles, files / "two-factors.onnx_adapter", "factors", "angles"),
    ):
        with pytest.raises(ConfigError) as error:
            session.load("bad", adapter)
        assert str(error.value) == (
            f"{adapter}: a --swap {kind} adapter, but {session.path} is a --swap {other} export: it expects "
            f"--swap {other} adapters (qpeft export onnx-adapter --swap {other}, or the .qpeft file)"
        )
    taylor = make_adapter(tmp_path / "taylor.qpeft", {0: "neg", 1: "pos"}, 3, variant="taylor")
    with pytest.raises(ConfigError) as error:
        angles.load("bad", taylor)
    assert str(error.value) == (
        f"{taylor}: a taylor adapter has no circuit angles, but {angles.path} is a --swap angles export: it "
        "expects Pauli adapters (serve this one from a --swap factors export)"
    )
    assert factors.names() == angles.names() == []


def test_a_swappable_session_logs_no_initializer_warnings(files, batches, capfd):
    """onnxruntime warns once per overridable initialiser ("Initializer ... appears in graph inputs") at its
    default log level; the library's sessions (io/ort.py) log errors only."""
    model, warning = files / "angles" / MODEL_FILE, "appears in graph inputs"
    capfd.readouterr()
    ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])  # the control: ORT's defaults
    control = capfd.readouterr().err.count(warning)
    session = OrtAdapterSession(model, threads=1)
    session.load("two", files / "two-angles.onnx_adapter")
    session(batches[0], adapter="two")
    assert capfd.readouterr().err.count(warning) == 0
    assert control >= len(session._params) > 0  # the count would see them: one or more per parameter


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


# ------------------------------------------------------------------------------- the onnxruntime boundary


def small_params(seed: int = 0) -> dict[str, np.ndarray]:
    """A few float32 parameters of several shapes (a made-up adapter)."""
    rng = np.random.default_rng(seed)
    return {f"qpeft.t{i}.v": rng.standard_normal((64, 4 + i)).astype(np.float32) for i in range(6)}


def test_read_arrays_survive_garbage_collection(files, tmp_path):
    written = small_params()
    write_ort_adapter(tmp_path / "a.onnx_adapter", written, 11, 12)
    structure, base, params, signed = read_onnx_adapter(tmp_path / "a.onnx_adapter")
    gc.collect()
    churn = [np.full((64, 8), -7.0, np.float32) for _ in range(2000)]  # reuses freed memory, if any
    assert (structure, base, signed) == (11, 12, True) and params.keys() == written.keys()
    assert all(np.array_equal(params[k], v) for k, v in written.items()) and len(churn) == 2000
    from_qpeft = swap_parameters(read_adapter(files / "six.qpeft"), "factors")
    real = read_onnx_adapter(files / "six-factors.onnx_adapter").params
    gc.collect()
    assert real.keys() == from_qpeft.keys()
    assert all(np.array_equal(real[k], v) for k, v in from_qpeft.items())


def test_every_flipped_bit_is_refused(files, tmp_path):
    path = tmp_path / "a.onnx_adapter"
    write_ort_adapter(path, small_params(), 3, 4)
    data = path.read_bytes()
    flipped = tmp_path / "flipped.onnx_adapter"
    for bit in range(len(data) * 8):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        flipped.write_bytes(damaged)
        with pytest.raises(FormatError, match=f"^{flipped}: integrity digest mismatch") as caught:
            read_onnx_adapter(flipped)
        assert "\n" not in str(caught.value)
    real = (files / "two-factors.onnx_adapter").read_bytes()
    session = OrtAdapterSession(files / "factors" / MODEL_FILE)
    for position in np.random.default_rng(0).integers(0, len(real), 8):
        damaged = bytearray(real)
        damaged[position] ^= 0x10
        flipped.write_bytes(damaged)
        with pytest.raises(FormatError, match="integrity digest mismatch"):
            session.load("two", flipped)
    assert session.names() == []


def test_file_without_digest_loads_with_a_warning(files, batches, expected, tmp_path):
    old = tmp_path / "old.onnx_adapter"
    old.write_bytes((files / "six-factors.onnx_adapter").read_bytes()[: -len(DIGEST_MAGIC) - DIGEST_BYTES])
    with pytest.warns(UserWarning, match="no integrity digest"):
        assert read_onnx_adapter(old).signed is False
    session = OrtAdapterSession(files / "factors" / MODEL_FILE)
    with pytest.warns(UserWarning, match=f"{old}: no integrity digest"):
        session.load("six", old)
    assert close(session(batches[0], adapter="six"), expected["six"][0])


def test_values_beyond_the_bound_are_refused(files, tmp_path):
    structure, base, params, _ = read_onnx_adapter(files / "two-factors.onnx_adapter")
    params["qpeft.classifier.bias"][0] = 2 * MAX_ABS
    write_ort_adapter(tmp_path / "big.onnx_adapter", params, structure, base)
    with pytest.raises(FormatError, match=r"big.onnx_adapter: qpeft.classifier.bias has values beyond"):
        OrtAdapterSession(files / "factors" / MODEL_FILE).load("big", tmp_path / "big.onnx_adapter")


def test_reload_while_other_threads_run(files, batches):
    """One name reloaded continually (alternating a 2-label and a 6-label adapter, .onnx_adapter and .qpeft)
    while threads run with it: every run gives one of the two single-threaded outputs, and never an error."""
    session = OrtAdapterSession(files / "factors" / MODEL_FILE, threads=1)
    sources = [files / "two-factors.onnx_adapter", files / "six.qpeft", files / "two.qpeft"]
    sources.append(files / "six-factors.onnx_adapter")
    reference = {}
    for path in sources[:2]:
        session.load("x", path)
        out = session(batches[0], adapter="x")
        reference[out.shape] = out
    done = threading.Event()

    def reload() -> int:
        count = 0
        while not done.is_set():
            session.load("x", sources[count % len(sources)])
            count += 1
        return count

    def runs(_: int) -> float:
        worst = 0.0
        for _ in range(25):
            out = session(batches[0], adapter="x")
            worst = max(worst, float(np.abs(out - reference[out.shape]).max()))
        return worst

    with ThreadPoolExecutor(4) as pool:
        reloads = pool.submit(reload)
        worst = list(pool.map(runs, range(3)))
        done.set()
    assert reloads.result() > 3 and max(worst) <= 1e-6


def test_onnxruntime_errors_are_one_line_naming_the_file(files, batches, tmp_path):
    def check(error: pytest.ExceptionInfo, path) -> None:
        message = str(error.value)
        assert str(path) in message and "\n" not in message
        assert ".cc:" not in message and "onnxruntime_src" not in message and "::" not in message

    unwritable = tmp_path / "missing" / "a.onnx_adapter"
    with pytest.raises(ConfigError) as error:
        write_ort_adapter(unwritable, small_params(), 1, 1)
    check(error, unwritable)
    garbage = tmp_path / "garbage.onnx_adapter"
    garbage.write_bytes(b"\x08\x00\x00\x00TORT" + bytes(range(200)))
    with pytest.raises(FormatError, match="not an onnxruntime adapter file") as error:
        read_onnx_adapter(garbage)
    check(error, garbage)
    with pytest.raises(FormatError, match="cannot load the ONNX model") as error:
        OrtAdapterSession(garbage)
    check(error, garbage)
    session = OrtAdapterSession(files / "factors" / MODEL_FILE)
    with pytest.raises(ConfigError, match="cannot run the model") as error:
        session({k: v[:, :, None] for k, v in batches[0].items()})
    check(error, files / "factors" / MODEL_FILE)


def test_ort_message_drops_source_and_signature():
    import onnxruntime as ort

    with pytest.raises(ort_errors()) as error:
        ort.AdapterFormat.read_adapter("/nonexistent/a.onnx_adapter")
    assert ".cc:" in str(error.value)  # what onnxruntime says
    assert ort_message(error.value) == "Invalid fd was supplied: -1"
