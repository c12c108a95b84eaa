"""qpeft_deploy.io.peft_native: PEFT-native Quantum-PEFT folders ⇄ .qpeft files, and every tool reading a folder.

Real MiniLM and a tiny GPT-2, real ``get_peft_model`` training steps (λ ≠ 0), real files, the real CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from qpeft_deploy.cli.main import cli
from qpeft_deploy.core.keys import lambda_key
from qpeft_deploy.io.model_io import load_adapted_model
from qpeft_deploy.io.peft_folder import CONFIG_FILE, WEIGHTS_FILE
from qpeft_deploy.io.qpeft_file import read_adapter
from qpeft_deploy.models import resolve_base
from qpeft_deploy.peft_native import QpeftConfig
from tests.helpers import assert_one_line_error, make_adapter, run, tiny_gpt2_folder

MINILM = str(resolve_base("minilm"))
TOKENS = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 2088, 102, 0, 0]])
BATCH = {"input_ids": TOKENS, "attention_mask": (TOKENS != 0).long()}
GPT2_BATCH = {
    "input_ids": torch.tensor([[5, 17, 42, 9, 3]]),
    "attention_mask": torch.ones(1, 5, dtype=torch.long),
}
KEPT = (
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "layers",
    "alpha",
    "variant",
    "init_seed",
    "angle_bits",
    "base_model_prefix",
    "target_shapes",
    "id2label",
)


def minilm(num_labels: int = 2):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=num_labels).eval()


def trained_folder(model, config, batch: dict, folder: Path) -> Path:
    """``folder`` written by ``save_pretrained`` after three AdamW steps of a Quantum-PEFT model."""
    peft_model = get_peft_model(model, config)
    causal = config.task_type == "CAUSAL_LM"
    labels = batch["input_ids"] if causal else torch.ones(len(batch["input_ids"]), dtype=torch.long)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(3):
        peft_model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return tiny_gpt2_folder(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def minilm_folder(tmp_path_factory) -> Path:
    config = QpeftConfig(task_type="SEQ_CLS", r=8, alpha=2.0, init_seed=5, rank_pattern={"pooler.dense": 4})
    return trained_folder(minilm(), config, BATCH, tmp_path_factory.mktemp("minilm") / "adapter")


@pytest.fixture(scope="module")
def gpt2_folder(gpt2_dir, tmp_path_factory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    config = QpeftConfig(task_type="CAUSAL_LM", r="full", variant="taylor")
    return trained_folder(model, config, GPT2_BATCH, tmp_path_factory.mktemp("gpt2peft") / "adapter")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a / WEIGHTS_FILE), load_file(b / WEIGHTS_FILE)
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def kept_fields(folder: Path) -> dict:
    config = json.loads((folder / CONFIG_FILE).read_text())
    return {k: config.get(k) for k in KEPT}


# ------------------------------------------------------------------------------------ lossless round trips


@pytest.mark.parametrize("kind", ["minilm", "gpt2"])
def test_folder_to_qpeft_to_folder_is_bit_identical(kind, minilm_folder, gpt2_folder, gpt2_dir, tmp_path):
    folder, base = (minilm_folder, "minilm") if kind == "minilm" else (gpt2_folder, str(gpt2_dir))
    before = snapshot(folder)
    result = run(cli, "pack", folder, "-o", tmp_path / "a.qpeft")
    assert result.exit_code == 0, result.output
    adapter = read_adapter(tmp_path / "a.qpeft")
    assert adapter.stored.bits is None and adapter.stored.lambda_dtype == "fp32"
    assert any(float(adapter.state[lambda_key(k)].abs().max()) > 0 for k in adapter.config.targets)
    result = run(cli, "export", "peft", tmp_path / "a.qpeft", "-o", tmp_path / "back", "--base", base)
    assert result.exit_code == 0, result.output
    assert_same_tensors(folder, tmp_path / "back")
    assert kept_fields(tmp_path / "back") == kept_fields(folder)
    assert snapshot(folder) == before
    assert (tmp_path / "back" / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_folder_reads_as_the_adapter_the_peft_model_computes(minilm_folder):
    adapter = read_adapter(minilm_folder)
    assert len(adapter.config.targets) == 37 and adapter.config.alpha == 2.0 and adapter.config.seed == 5
    assert adapter.config.targets["pooler.dense.weight"] == 4
    assert adapter.config.targets["encoder.layer.0.attention.self.query.weight"] == 8
    assert adapter.fingerprint is None and adapter.config.trained_on() is None
    assert adapter.config.head == "classifier" and adapter.config.labels() == ["LABEL_0", "LABEL_1"]
    peft_model = PeftModel.from_pretrained(minilm(), minilm_folder).eval()
    with torch.no_grad():
        want = peft_model(**BATCH).logits
    model = load_adapted_model("minilm", minilm_folder)
    with torch.no_grad():
        assert (model(**BATCH).logits - want).abs().max() <= 1e-6


def test_attach_adapter_to_peft_folder_and_back(tmp_path):
    labels = {0: "neg", 1: "pos", 2: "mixed"}
    path = make_adapter(tmp_path / "a.qpeft", labels, seed=3)
    result = run(cli, "export", "peft", path, "-o", tmp_path / "peft")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert config["peft_type"] == "QPEFT" and config["task_type"] == "SEQ_CLS"
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    peft_model = PeftModel.from_pretrained(minilm(len(labels)), tmp_path / "peft").eval()
    attached = load_adapted_model("minilm", path)
    with torch.no_grad():
        got, want = peft_model(**BATCH).logits, attached(**BATCH).logits
    assert (got - want).abs().max() <= 1e-6
    assert run(cli, "pack", tmp_path / "peft", "-o", tmp_path / "b.qpeft").exit_code == 0
    original, back = read_adapter(path), read_adapter(tmp_path / "b.qpeft")
    assert original.state.keys() == back.state.keys() and original.shapes == back.shapes
    for key, tensor in original.state.items():
        assert torch.equal(tensor, back.state[key]), key
    assert back.config.id2label == labels


def test_a_folder_trained_on_the_file_grids_packs_to_what_peft_computes(tmp_path):
    """angle_bits / lambda_bits: the folder holds latent values; read and packed, the adapter is the one the
    PEFT layers compute with, stored as 4-bit angles and 3-bit λ codes."""
    config = QpeftConfig(task_type="SEQ_CLS", r=8, angle_bits=4, lambda_bits=3)
    folder = trained_folder(minilm(), config, BATCH, tmp_path / "peft")
    with torch.no_grad():
        want = PeftModel.from_pretrained(minilm(), folder).eval()(**BATCH).logits
    assert read_adapter(folder).stored.lambda_bits == 3
    assert run(cli, "pack", folder, "-o", tmp_path / "a.qpeft").exit_code == 0
    stored = read_adapter(tmp_path / "a.qpeft").stored
    assert (stored.bits, stored.lambda_bits, stored.format_version) == (4, 3, 4)
    with torch.no_grad():
        got = load_adapted_model("minilm", tmp_path / "a.qpeft")(**BATCH).logits
    assert (got - want).abs().max() <= 1e-6


def test_pack_options_still_apply_to_a_folder(minilm_folder, tmp_path):
    result = run(cli, "pack", minilm_folder, "-o", tmp_path / "a4.qpeft", "--bits", "4", "--base", "minilm")
    assert result.exit_code == 0, result.output
    adapter = read_adapter(tmp_path / "a4.qpeft")
    assert adapter.stored.bits == 4 and adapter.config.trained_on() == "minilm" and adapter.fingerprint


def test_inspect_and_verify_a_folder(minilm_folder):
    result = run(cli, "inspect", minilm_folder, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["container"] == "peft" and summary["targets"] == 37 and summary["bits"] is None
    assert summary["digest"] == "no integrity digest (PEFT-native folder)"
    assert "PEFT-native folder" in run(cli, "inspect", minilm_folder).output
    assert run(cli, "verify", minilm_folder).exit_code == 0


def test_merge_and_onnx_export_from_a_folder(minilm_folder, tmp_path):
    result = run(
        cli, "merge", "--base", "minilm", "--adapter", minilm_folder, "-o", tmp_path / "merged", "--quiet"
    )
    assert result.exit_code == 0, result.output
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    peft_model = PeftModel.from_pretrained(minilm(), minilm_folder).eval()
    with torch.no_grad():
        assert (merged(**BATCH).logits - peft_model(**BATCH).logits).abs().max() <= 1e-4
    from qpeft_deploy.export.onnx.export import export_onnx

    report = export_onnx("minilm", minilm_folder, tmp_path / "onnx", check_examples=4, quiet=True)
    assert (tmp_path / "onnx" / "model.onnx").is_file() and report


# ------------------------------------------------------------------------------------------ refusals


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS_FILE)
    edit(tensors, next(k for k in tensors if k.endswith(".qpeft_delta")))
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})


def _edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(config | fields))


def _drop(tensors, key):
    del tensors[key]


def _truncate(tensors, key):
    tensors[key] = tensors[key][:-1].clone()


def _nan(tensors, key):
    tensors[key][0] = float("nan")


def _bad_mask(tensors, key):
    tensors[key][-1] = 0.5


def _half(tensors, key):
    tensors[key] = tensors[key].half()


def _stray(tensors, key):
    tensors["base_model.model.bert.embeddings.word_embeddings.weight"] = torch.zeros(2, 2)


@pytest.mark.parametrize(
    "edit,words",
    [
        (_drop, ["no tensor", ".qpeft_delta"]),
        (_truncate, ["1-D float vector", ".qpeft_delta"]),
        (_nan, ["NaN", ".qpeft_delta"]),
        (_bad_mask, ["mask", ".qpeft_delta"]),
        (_half, ["F16, expected F32"]),
        (_stray, ["word_embeddings", "neither"]),
    ],
)
def test_bad_tensors_are_one_line_errors(edit, words, minilm_folder, tmp_path):
    folder = _copy(minilm_folder, tmp_path)
    _edit_tensors(folder, edit)
    before = snapshot(folder)
    assert_one_line_error(run(cli, "pack", folder, "-o", tmp_path / "out.qpeft"), str(folder), *words)
    assert snapshot(folder) == before and not (tmp_path / "out.qpeft").exists()


@pytest.mark.parametrize(
    "fields,words",
    [
        ({"layers": 0}, ["layers must be"]),
        ({"variant": "x"}, ["variant 'x'"]),
        ({"alpha": "big"}, ["alpha must be"]),
        ({"task_type": "TOKEN_CLS"}, ["task_type 'TOKEN_CLS'"]),
        ({"angle_bits": 9}, ["angle_bits 9"]),
        ({"lambda_bits": 16}, ["lambda_bits 16"]),
        ({"target_shapes": {"bert.pooler.dense": [384, 384, 999]}}, ["target_shapes"]),
        ({"id2label": None}, ["no id2label"]),
        ({"peft_type": "LORA"}, ["peft_type 'LORA', expected 'QPEFT'"]),
    ],
)
def test_bad_config_fields_are_one_line_errors(fields, words, minilm_folder, tmp_path):
    folder = _copy(minilm_folder, tmp_path)
    _edit_config(folder, **fields)
    before = snapshot(folder)
    assert_one_line_error(run(cli, "pack", folder, "-o", tmp_path / "out.qpeft"), str(folder), *words)
    assert snapshot(folder) == before and not (tmp_path / "out.qpeft").exists()


def test_a_lora_folder_is_refused(tmp_path):
    lora = get_peft_model(minilm(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    lora.save_pretrained(tmp_path / "lora")
    for args in (["pack", tmp_path / "lora", "-o", tmp_path / "x.qpeft"], ["inspect", tmp_path / "lora"]):
        assert_one_line_error(run(cli, *args), "peft_type 'LORA', expected 'QPEFT'", "qpeft import lora")


def test_missing_files_are_refused(minilm_folder, tmp_path):
    folder = _copy(minilm_folder, tmp_path)
    (folder / CONFIG_FILE).unlink()
    assert_one_line_error(run(cli, "pack", folder, "-o", tmp_path / "x.qpeft"), "no adapter_config.json")
    folder = Path(shutil.copytree(minilm_folder, tmp_path / "bin"))
    (folder / WEIGHTS_FILE).rename(folder / "adapter_model.bin")
    assert_one_line_error(run(cli, "pack", folder, "-o", tmp_path / "x.qpeft"), "never read")


def test_another_base_is_refused(minilm_folder, gpt2_dir, tmp_path):
    before = snapshot(minilm_folder)
    pack = ["pack", minilm_folder, "-o", tmp_path / "x.qpeft", "--base", gpt2_dir]
    assert_one_line_error(run(cli, *pack), str(gpt2_dir), "another base model")
    merge = ["merge", "--base", gpt2_dir, "--adapter", minilm_folder, "-o", tmp_path / "m", "--quiet"]
    assert_one_line_error(run(cli, *merge), str(minilm_folder), "another base")
    export = ["export", "peft", minilm_folder, "-o", tmp_path / "p", "--base", gpt2_dir]
    assert_one_line_error(run(cli, *export), str(minilm_folder), "not a module")
    assert snapshot(minilm_folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_task_type_contradictions(gpt2_folder, gpt2_dir, tmp_path):
    path = make_adapter(tmp_path / "a.qpeft", {0: "a", 1: "b"}, seed=1)
    args = ["export", "peft", path, "-o", tmp_path / "p", "--task-type", "CAUSAL_LM"]
    assert_one_line_error(run(cli, *args), str(path), "contradicts", "classifier head")
    headless = tmp_path / "headless.qpeft"
    assert run(cli, "pack", path, "-o", headless, "--drop-head").exit_code == 0
    assert_one_line_error(run(cli, "export", "peft", headless, "-o", tmp_path / "p"), "--task-type")
    args = ["export", "peft", gpt2_folder, "-o", tmp_path / "p", "--base", gpt2_dir, "--task-type", "SEQ_CLS"]
    assert_one_line_error(run(cli, *args), "contradicts", "no head")
    assert not (tmp_path / "p").exists()


def test_a_cached_hub_base_is_named_by_its_repo_id(tmp_path, monkeypatch):
    from test_models import HUB_REPO, hub_cache_copy

    from qpeft_deploy.io.peft_folder import base_model_name

    hub_cache_copy(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert base_model_name(HUB_REPO, None) == HUB_REPO
    assert base_model_name("minilm", None) == HUB_REPO and base_model_name(HUB_REPO, "mine") == "mine"


def test_a_causal_adapter_exports_as_causal_lm_and_reads_back_causal(gpt2_folder, gpt2_dir, tmp_path):
    from qpeft_deploy.core.attach import attach
    from qpeft_deploy.io.model_io import save_adapter

    assert read_adapter(gpt2_folder).config.is_causal_lm()  # a CAUSAL_LM folder reads as a causal adapter
    model = attach(AutoModelForCausalLM.from_pretrained(gpt2_dir), rank=4)
    path = save_adapter(model, tmp_path / "lm.qpeft", base=str(gpt2_dir))
    assert read_adapter(path).config.is_causal_lm()
    args = ["export", "peft", path, "-o", tmp_path / "p", "--base", gpt2_dir]
    assert_one_line_error(run(cli, *args, "--task-type", "FEATURE_EXTRACTION"), "contradicts", "causal-LM")
    assert run(cli, *args).exit_code == 0  # no --task-type needed
    assert json.loads((tmp_path / "p" / CONFIG_FILE).read_text())["task_type"] == "CAUSAL_LM"
    assert read_adapter(tmp_path / "p").config.is_causal_lm()
