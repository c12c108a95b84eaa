"""Tests of qpeft_deploy.runtime.ort_generate (through ``OrtAdapterSession.generate``) and
qpeft_deploy.runtime.generation: greedy and seeded sampled generation in plain onnxruntime from decoder
exports of a tiny random Llama, against the torch ``AdapterBank.generate`` on the same adapters; an adapter per
request, swapping, mixed batches and bad input."""

from __future__ import annotations

import functools

import pytest

from qpeft_deploy.errors import BaseMismatchError, ConfigError
from qpeft_deploy.export.onnx.export import export_onnx_adapter
from qpeft_deploy.io.onnx_adapter import MODEL_FILE
from qpeft_deploy.runtime.bank import AdapterBank
from qpeft_deploy.runtime.ort_session import OrtAdapterSession
from tests.helpers import tiny_llama_adapter, tiny_llama_folder
from tests.test_onnx_decoder import exported, tiny

PROMPTS = ["What is 2+2?", "Hi", "Name a colour, please."]
TOKENS = 32


@functools.cache
def bank() -> AdapterBank:
    """The torch reference: a bank on the tiny base with adapters a and b."""
    base, files, _ = tiny()
    b = AdapterBank.from_pretrained(str(base))
    for name, path in files.items():
        b.load(name, path)
    return b


@functools.cache
def ort_session(mode: str, swap: str = "factors") -> OrtAdapterSession:
    """An OrtAdapterSession over the export of adapter a in ``mode`` (a swappable one with a and b loaded)."""
    folder, _ = exported(mode, swap)
    session = OrtAdapterSession(folder / MODEL_FILE, threads=1)
    if mode == "swappable":
        for name, path in tiny()[1].items():
            session.load(name, path)
    return session


def tokens(rows) -> list[list[int]]:
    return [row.tokens for row in rows]


@pytest.mark.parametrize("mode", ["merged", "runtime"])
def test_baked_adapter_generates_the_torch_tokens(mode):
    want = bank().generate(PROMPTS, "a", TOKENS)
    got = ort_session(mode).generate(PROMPTS, max_new_tokens=TOKENS)
    assert tokens(got) == tokens(want) and [g.text for g in got] == [w.text for w in want]
    assert all(len(g.tokens) == TOKENS and g.finish_reason == "length" and g.adapter is None for g in got)


@pytest.mark.parametrize("swap", ["factors", "angles"])
def test_swapping_adapters_in_one_session_gives_each_adapters_torch_tokens(swap):
    session = ort_session("swappable", swap)
    want = {name: tokens(bank().generate(PROMPTS, name, TOKENS)) for name in ("a", "b")}
    assert want["a"] != want["b"]  # the adapters change the answers
    for name in ("a", "b", "a"):
        assert tokens(session.generate(PROMPTS, name, TOKENS)) == want[name], name
    assert tokens(session.generate(PROMPTS, None, TOKENS)) == want["a"]  # the exported default


def test_mixed_batch_equals_each_rows_own_generation():
    session, names = ort_session("swappable"), ["b", "a", "b"]
    mixed = session.generate(PROMPTS, names, TOKENS)
    want = bank().generate(PROMPTS, names, TOKENS)
    assert tokens(mixed) == tokens(want) and [g.adapter for g in mixed] == names
    for prompt, name, row in zip(PROMPTS, names, mixed):
        assert tokens(session.generate(prompt, name, TOKENS)) == [row.tokens]


def test_sampling_is_seeded_and_matches_torch():
    session = ort_session("swappable")

    def sample(seed, run=session.generate):
        return tokens(run(PROMPTS, "b", 12, temperature=1.0, top_p=0.9, seed=seed))

    assert sample(3) == sample(3) and sample(3) != sample(4)
    assert sample(3) == sample(3, bank().generate)  # one adapter: the same draws from the same logits


def test_default_adapter_is_used_when_none_is_named():
    session = OrtAdapterSession(exported("swappable", "factors")[0] / MODEL_FILE, threads=1)
    session.load("b", tiny()[1]["b"])
    session.default_adapter = "b"
    assert tokens(session.generate(PROMPTS[:1], max_new_tokens=8)) == tokens(
        bank().generate(PROMPTS[:1], "b", 8)
    )


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Adapters that do not fit the swappable export: another base, another target set, another rank."""
    folder = tmp_path_factory.mktemp("foreign")
    other = tiny_llama_folder(folder / "other-base", seed=9)
    tiny_llama_adapter(other, folder / "other-base.qpeft", 3)
    tiny_llama_adapter(tiny()[0], folder / "targets.qpeft", 3, targets=["q_proj", "v_proj"])
    tiny_llama_adapter(tiny()[0], folder / "rank.qpeft", 3, rank=2)
    export_onnx_adapter(tiny()[1]["a"], folder / "angles.onnx_adapter", swap="angles")
    return folder


@pytest.mark.parametrize(
    "file,error,words",
    [
        ("other-base.qpeft", BaseMismatchError, "another base model"),
        ("targets.qpeft", ConfigError, "other targets, ranks or head"),
        ("rank.qpeft", ConfigError, "the model takes float32[64, 4]"),
        ("angles.onnx_adapter", ConfigError, "expects --swap factors adapters"),
    ],
)
def test_adapters_that_do_not_fit_are_refused_with_one_line(foreign, file, error, words):
    session = ort_session("swappable")
    with pytest.raises(error) as info:
        session.load("x", foreign / file)
    message = str(info.value)
    assert words in message and str(foreign / file) in message and "\n" not in message
    assert "x" not in session.names()


def test_a_factors_adapter_in_an_angles_export_is_refused(tmp_path):
    export_onnx_adapter(tiny()[1]["a"], tmp_path / "f.onnx_adapter", swap="factors")
    with pytest.raises(ConfigError, match="expects --swap angles adapters"):
        ort_session("swappable", "angles").load("x", tmp_path / "f.onnx_adapter")


def test_bad_generation_arguments_are_refused():
    session = ort_session("swappable")
    for kwargs, words in [
        ({"prompts": []}, "non-empty list"),
        ({"prompts": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompts": "x", "temperature": -1}, "temperature"),
        ({"prompts": "x", "top_p": 0}, "top_p"),
        ({"prompts": "x" * 120}, "context of 128 tokens"),
        ({"prompts": ["x", "y"], "adapter": ["a"]}, "1 adapter names for a batch of 2 rows"),
        ({"prompts": "x", "adapter": "nope"}, "unknown adapter 'nope'"),
    ]:
        with pytest.raises(ConfigError, match=words):
            session.generate(**kwargs)


def test_generate_on_a_model_without_past_key_values_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])],
        "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "sequence"])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
        tmp_path / "m.onnx",
    )
    with pytest.raises(ConfigError, match="not a decoder with past key/values"):
        OrtAdapterSession(tmp_path / "m.onnx").generate("hi")
