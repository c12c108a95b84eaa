"""Tests of qpeft_deploy.export.onnx.decoder and qpeft_deploy.io.onnx_decoder: causal LMs exported with past
key/values in every mode (a tiny random Llama: GQA, tied embeddings, a random adapter), run by real
onnxruntime sessions against transformers: logits on a padded batch and a second shape, greedy generation."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qpeft_deploy.errors import ConfigError
from qpeft_deploy.export.onnx.circuit import DOMAIN, OP_TYPE
from qpeft_deploy.export.onnx.decoder import CHECK_TOKENS
from qpeft_deploy.export.onnx.export import export_onnx
from qpeft_deploy.io.onnx_adapter import MODEL_FILE, PARAM_PREFIX
from qpeft_deploy.io.onnx_decoder import (
    PAST,
    TOTAL,
    CacheLayout,
    decode,
    left_pad,
    past_names,
    prefill_feeds,
    present_names,
    session_runner,
)
from qpeft_deploy.io.ort import session_options
from tests.helpers import tiny_llama_adapter, tiny_llama_folder

MODES = [("merged", "factors"), ("runtime", "factors"), ("swappable", "factors"), ("swappable", "angles")]
PROMPTS = [[5, 17, 33, 2, 60, 61, 9], [40, 41], [7, 8, 9, 10]]  # left-padded into one batch
TOKENS = 32

# The tiny base, its adapters and their exports are made once per process and shared with
# tests/test_ort_generate.py (which imports these helpers).
_FILES = tempfile.TemporaryDirectory(prefix="qpeft-onnx-decoder-tests-")


@functools.cache
def tiny() -> tuple[Path, dict[str, Path], dict[str, torch.nn.Module]]:
    """(base folder, adapter files by name, adapted torch models by name) of the tiny Llama."""
    root = Path(_FILES.name)
    base = tiny_llama_folder(root / "base")
    models = {
        name: tiny_llama_adapter(base, root / f"{name}.qpeft", seed) for name, seed in (("a", 1), ("b", 2))
    }
    return base, {name: root / f"{name}.qpeft" for name in models}, models


@functools.cache
def exported(mode: str, swap: str = "factors", adapter: str = "a") -> tuple[Path, dict]:
    """(folder, report) of the tiny Llama + ``adapter`` exported in ``mode``."""
    base, files, _ = tiny()
    folder = Path(_FILES.name) / f"{mode}-{swap}-{adapter}"
    report = export_onnx(str(base), files[adapter], folder, mode=mode, swap=swap, quiet=True)
    return folder, report


@functools.cache
def session(folder: Path) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(folder / MODEL_FILE), session_options(1), providers=["CPUExecutionProvider"]
    )


def layout_of(sess: ort.InferenceSession) -> CacheLayout:
    return CacheLayout.of_inputs({i.name: i.shape for i in sess.get_inputs()})


def hf_logits(model: torch.nn.Module, feeds: dict[str, np.ndarray], past=None) -> tuple[np.ndarray, object]:
    """transformers' own forward (its mask code, its cache): logits and the cache."""
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(feeds["input_ids"]),
            attention_mask=torch.from_numpy(feeds["attention_mask"]),
            position_ids=torch.from_numpy(feeds["position_ids"]),
            past_key_values=past,
            use_cache=True,
        )
    return out.logits.numpy(), out.past_key_values


def hf_greedy(model: torch.nn.Module, rows: list[list[int]], tokens: int = TOKENS) -> list[list[int]]:
    """transformers' generate() on the left-padded rows, greedy."""
    ids, mask = left_pad(rows, 0)
    with torch.no_grad():
        out = model.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].tolist()


# ------------------------------------------------------------------------------------------------ graphs


@pytest.mark.parametrize("mode,swap", MODES)
def test_export_checks_itself_and_has_the_decoder_io(mode, swap):
    folder, report = exported(mode, swap)
    assert report["task"] == "text-generation" and report["mode"] == mode
    assert report["max_abs_diff_vs_torch"] <= 1e-4 and report["greedy_tokens_equal"] is True
    sess = session(folder)
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert list(inputs)[3:] == past_names(2)
    assert inputs["past_key_values.1.value"] == ["batch_size", 2, PAST, 16]  # 2 key/value heads of 16
    outputs = {o.name: o.shape for o in sess.get_outputs()}
    assert list(outputs) == ["logits", *present_names(2)]
    assert outputs["present.0.key"] == ["batch_size", 2, TOTAL, 16]
    model = onnx.load(str(folder / MODEL_FILE))
    circuits = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    assert len(circuits) == (0 if mode == "merged" else 14)  # 7 projections × 2 layers; lm_head not a target
    overridable = [i.name for i in sess.get_overridable_initializers() if i.name.startswith(PARAM_PREFIX)]
    assert len(overridable) == (14 * (2 if swap == "factors" else 3) if mode == "swappable" else 0)
    assert (folder / "generation_config.json").is_file() and (folder / "config.json").is_file()
    vocab = [i for i in model.graph.initializer if 97 in i.dims]
    assert [list(i.dims) for i in vocab] == [
        [97, 64]
    ]  # the tied embedding is stored once (lm_head transposes)


@pytest.mark.parametrize("mode,swap", MODES)
def test_ort_logits_match_transformers_on_a_padded_batch_and_a_second_shape(mode, swap):
    folder, _ = exported(mode, swap)
    sess, model = session(folder), tiny()[2]["a"]
    layout = layout_of(sess)
    first = prefill_feeds(layout, *left_pad(PROMPTS, 0))
    got = sess.run(layout.outputs(), first)
    want, cache = hf_logits(model, first)
    real = first["attention_mask"].astype(bool)  # padding positions are not compared
    assert np.abs(got[0] - want)[real].max() <= 1e-4
    for i, (k, v) in enumerate(zip(got[1::2], got[2::2])):  # batch × heads × positions × head size
        for ours, theirs in ((k, cache.layers[i].keys), (v, cache.layers[i].values)):
            assert np.abs(ours - theirs.numpy()).transpose(0, 2, 1, 3)[real].max() <= 1e-4
    # second shape: two new tokens on every row's cache
    new = np.array([[11, 12], [13, 14], [15, 16]])
    second = {
        "input_ids": new,
        "attention_mask": np.concatenate([first["attention_mask"], np.ones((3, 2), np.int64)], axis=1),
        "position_ids": first["position_ids"][:, -1:] + 1 + np.arange(2),
    } | dict(zip(past_names(2), got[1:]))
    want_second, _ = hf_logits(model, second, cache)
    assert np.abs(sess.run(["logits"], second)[0] - want_second).max() <= 1e-4


@pytest.mark.parametrize("mode,swap", MODES)
def test_greedy_tokens_equal_transformers_generate(mode, swap):
    folder, _ = exported(mode, swap)
    sess = session(folder)
    want = hf_greedy(tiny()[2]["a"], PROMPTS)
    got = decode(
        session_runner(sess, layout_of(sess)), layout_of(sess), PROMPTS, TOKENS, lambda x: x.argmax(-1)
    )
    assert got == want
    assert len({tuple(row) for row in want}) == len(PROMPTS) and len(set(want[0])) > 3  # not a constant loop


def test_adapter_changes_the_generation():
    _, _, models = tiny()
    assert hf_greedy(models["a"], PROMPTS[:1]) != hf_greedy(models["b"], PROMPTS[:1])


def test_check_tokens_fit_the_context():
    assert CHECK_TOKENS + max(map(len, PROMPTS)) <= 128


# ------------------------------------------------------------------------------------------------ bad input


def test_decoder_export_refuses_a_check_task(tmp_path):
    base, files, _ = tiny()
    with pytest.raises(ConfigError, match="checked by generating"):
        export_onnx(str(base), files["a"], tmp_path / "out", check_task="rt", quiet=True)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ optimum


@pytest.mark.parametrize("mode", ["runtime", "swappable"])
def test_optimum_folder_in_every_mode_generates_like_torch(tmp_path, mode):
    pytest.importorskip(
        "optimum.onnxruntime", reason="no optimum: the [optimum] extra needs transformers < 4.58"
    )
    from optimum.onnxruntime import ORTModelForCausalLM

    base, files, models = tiny()
    report = export_onnx(str(base), files["a"], tmp_path / "opt", mode=mode, via="optimum", quiet=True)
    assert report["max_abs_diff_vs_torch"] <= 1e-4 and report["greedy_tokens_equal"] is True
    ort_model = ORTModelForCausalLM.from_pretrained(str(tmp_path / "opt"), use_cache=True)
    prompt = torch.tensor([PROMPTS[0]])
    kwargs = {"max_new_tokens": TOKENS, "do_sample": False, "pad_token_id": 0}
    got = ort_model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert got[0, prompt.shape[1] :].tolist() == hf_greedy(models["a"], PROMPTS[:1])[0]


# ------------------------------------------------------------------------------------------------ SmolLM2


@pytest.mark.slow
def test_smollm2_runtime_and_swappable_generate_the_torch_tokens(tmp_path):
    """End to end on the real SmolLM2 (30 layers, tied embeddings, GQA) with a random all-linear K=8 adapter:
    each mode's export checks itself, and 32 greedy tokens from ``OrtAdapterSession.generate`` equal the torch
    ``AdapterBank.generate``'s on a padded two-prompt batch."""
    from qpeft_deploy.runtime.bank import AdapterBank
    from qpeft_deploy.runtime.ort_session import OrtAdapterSession
    from tests.helpers import make_causal_adapter

    adapter = make_causal_adapter(tmp_path / "a.qpeft", seed=1)
    prompts = ["What is the capital of France?", "Write a haiku about rain."]
    bank = AdapterBank.from_pretrained("smollm2")
    bank.load("a", adapter)
    want = [row.tokens for row in bank.generate(prompts, "a", TOKENS)]
    assert want != [row.tokens for row in bank.generate(prompts, None, TOKENS)]  # the adapter changes them
    for mode in ("runtime", "swappable"):
        report = export_onnx("smollm2", adapter, tmp_path / mode, mode=mode, quiet=True)
        assert report["max_abs_diff_vs_torch"] <= 1e-4 and report["greedy_tokens_equal"] is True, report
        session = OrtAdapterSession(tmp_path / mode / MODEL_FILE, threads=1)
        if mode == "swappable":
            session.load("a", adapter)
        assert [row.tokens for row in session.generate(prompts, "a" if mode == "swappable" else None)] == want
        del session
        shutil.rmtree(tmp_path / mode)  # 650 MB each
