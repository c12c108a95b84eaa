"""Tests of qpeft_deploy.export.lora.importer and .peft_folder: exact Taylor import of real PEFT LoRA, Pauli fits."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from qpeft_deploy.cli.lora import import_lora_command
from qpeft_deploy.cli.main import QpeftGroup
from qpeft_deploy.core.circuit import PauliCircuit
from qpeft_deploy.core.taylor import stiefel_exp, stiefel_log
from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.export.lora.calibrate import Calibration
from qpeft_deploy.export.lora.importer import (
    align,
    convert_lora,
    fit_pauli,
    import_lora,
    lora_svd,
    relative_errors,
)
from qpeft_deploy.export.lora.peft_folder import LoraLayer, read_lora
from qpeft_deploy.io.model_io import load_adapted_model
from qpeft_deploy.io.qpeft_file import read_adapter
from qpeft_deploy.models import load_task_model, load_tokenizer, tokenize
from tests.test_taylor import random_frame

LABELS = {0: "rotten", 1: "fresh"}
TEXTS = ["a gorgeous, moving film", "dull and far too long", "not bad at all"]
QUERY0 = "encoder.layer.0.attention.self.query"
WEIGHTS = "adapter_model.safetensors"


def make_lora(folder: Path, **options) -> torch.nn.Module:
    """A real PEFT LoRA on MiniLM (query, value, pooler; r=4, layer 0's query r=2), non-zero B, saved."""
    model = load_task_model("minilm", LABELS)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "pooler.dense"],
        rank_pattern={QUERY0: 2},
        alpha_pattern={QUERY0: 3},
        task_type="SEQ_CLS",
        **options,
    )
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(str(folder))
    return peft_model.eval()


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "peft"
    return make_lora(folder), folder


@pytest.fixture(scope="module")
def small(lora, tmp_path_factory):
    """The same LoRA cut down to two modules (layer 0's query at r=2 and the pooler) and the head."""

    def cut(state: dict) -> None:
        for key in [
            k for k in state if not any(m in k for m in (f".{QUERY0}.", ".pooler.dense.", ".classifier."))
        ]:
            del state[key]

    return corrupt(lora[1], tmp_path_factory.mktemp("small") / "peft", tensors=cut)


@pytest.fixture(scope="module")
def inputs():
    return tokenize(load_tokenizer("minilm"), TEXTS)


def test_taylor_round_trip_of_random_taylor_parameters():
    rng = np.random.default_rng(5)
    u, v = random_frame(40, 6, rng, 0.7), random_frame(30, 6, rng, 0.7)
    lam = rng.standard_normal(6)
    delta = (u * lam) @ v.T
    layer = LoraLayer(torch.from_numpy(v.T.copy()), torch.from_numpy(u * lam), 1.0)
    u2, lam2, v2 = align(*lora_svd(layer))
    frames = [stiefel_exp(*(torch.from_numpy(x) for x in stiefel_log(f))).numpy() for f in (u2, v2)]
    rebuilt = (frames[0] * lam2) @ frames[1].T
    assert np.linalg.norm(rebuilt - delta) / np.linalg.norm(delta) < 1e-10


def test_taylor_import_reproduces_peft_logits(tmp_path, lora, inputs):
    peft_model, folder = lora
    before = digest(folder)
    report = import_lora(folder, tmp_path / "a.qpeft", variant="taylor")
    assert report["targets"] == 13 and report["relative_error"]["max"] <= 1e-5
    adapter = read_adapter(tmp_path / "a.qpeft")
    assert adapter.config.targets[f"{QUERY0}.weight"] == 2 and adapter.config.variant == "taylor"
    model = load_adapted_model("minilm", tmp_path / "a.qpeft")
    with torch.no_grad():
        expected, got = peft_model(**inputs).logits, model(**inputs).logits
        plain = load_task_model("minilm", LABELS)(**inputs).logits
    assert (got - expected).abs().max() < 1e-4
    assert (plain - expected).abs().max() > 1e-2
    assert digest(folder) == before


def test_rslora_scale(tmp_path, small):
    folder = corrupt(small, tmp_path / "rs", {"use_rslora": True})
    plain, rs = read_lora(small), read_lora(folder)
    name = f"bert.{QUERY0}"
    assert plain.layers[name].scale == pytest.approx(3 / 2)
    assert rs.layers[name].scale == pytest.approx(3 / 2**0.5)
    assert rs.layers["bert.pooler.dense"].scale == pytest.approx(8 / 2)
    adapter, keys = convert_lora(rs, "taylor")
    assert max(relative_errors(rs, keys, adapter).values()) <= 1e-5


def test_pauli_fit_beats_its_start_and_max_error(tmp_path, small):
    layer = read_lora(small).layers[f"bert.{QUERY0}"]
    delta = layer.delta().numpy()

    def error(steps: int) -> float:
        theta_u, theta_v, lam = fit_pauli(layer, 2, 1, torch.Generator().manual_seed(0), steps=steps)
        cu, cv = PauliCircuit(384, 1), PauliCircuit(384, 1)
        with torch.no_grad():
            cu.theta.copy_(theta_u)
            cv.theta.copy_(theta_v)
            approx = (cu.columns(2).double() * lam.double()) @ cv.columns(2).double().T
        return float(np.linalg.norm(approx.numpy() - delta) / np.linalg.norm(delta))

    assert 0 < error(50) < error(0) < 1
    with pytest.raises(ConfigError, match="max-error"):
        import_lora(small, tmp_path / "p.qpeft", variant="pauli", max_error=0.5, fit_steps=5)
    with pytest.raises(ConfigError, match="max-error"):
        import_lora(small, tmp_path / "t.qpeft", variant="taylor", max_error=1e-12)
    assert not list(tmp_path.iterdir())


def test_pauli_import_with_calibration(tmp_path, small):
    calibration = Calibration("rt", max_examples=16, max_test=16, batch_size=16, max_length=32)
    report = import_lora(small, tmp_path / "p.qpeft", variant="pauli", calibration=calibration, fit_steps=20)
    assert set(report["accuracy"]) >= {"lora", "before", "after"}
    assert all(0 <= report["accuracy"][k] <= 1 for k in ("lora", "before", "after"))
    assert 0 < report["relative_error"]["max"] <= 1 and report["compression_ratio"] > 1
    assert report["calibrated_relative_error"]["max"] > 0
    adapter = read_adapter(tmp_path / "p.qpeft")
    assert adapter.config.variant == "pauli" and adapter.config.id2label == LABELS


def corrupt(folder: Path, target: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of the PEFT folder with its config updated and/or its tensors edited."""
    shutil.copytree(folder, target)
    if config is not None:
        data = json.loads((target / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps(data | config))
    if tensors is not None:
        state = load_file(str(target / WEIGHTS))
        tensors(state)
        save_file(state, str(target / WEIGHTS))
    return target


def _nan(state: dict) -> None:
    next(v for k, v in state.items() if "lora_B" in k)[0, 0] = float("nan")


def _magnitude(state: dict) -> None:
    state[f"base_model.model.bert.{QUERY0}.lora_magnitude_vector"] = torch.ones(384)


def _wrong_width(state: dict) -> None:
    key = f"base_model.model.bert.{QUERY0}.lora_B.weight"
    state[key] = torch.ones(100, 2)


@pytest.mark.parametrize(
    "config, tensors, error, message",
    [
        ({"peft_type": "IA3"}, None, FormatError, "IA3"),
        ({"use_dora": True}, None, FormatError, "DoRA"),
        ({"init_lora_weights": "pissa"}, None, FormatError, "pissa"),
        ({"bias": "all"}, None, FormatError, "bias"),
        ({"modules_to_save": ["classifier", "embeddings"]}, None, FormatError, "embeddings"),
        ({"rank_pattern": {QUERY0: 3}}, None, FormatError, "rank 3"),
        (None, _nan, FormatError, "NaN"),
        (None, _magnitude, FormatError, "magnitude"),
        (None, _wrong_width, BaseMismatchError, "100x384"),
    ],
)
def test_refuses_what_it_cannot_import(tmp_path, small, config, tensors, error, message):
    folder = corrupt(small, tmp_path / "bad", config, tensors)
    with pytest.raises(error, match=message) as raised:
        import_lora(folder, tmp_path / "out.qpeft", variant="taylor")
    assert str(folder) in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "out.qpeft").exists()


def test_pickle_weights_are_never_read(tmp_path, small):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(small / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(FormatError, match="pickle"):
        read_lora(folder)


def test_cli(tmp_path, small):
    group, importer = QpeftGroup("qpeft"), click.Group("import")
    importer.add_command(import_lora_command)
    group.add_command(importer)
    runner = CliRunner()
    ok = runner.invoke(
        group,
        [
            "import",
            "lora",
            str(small),
            "-o",
            str(tmp_path / "a.qpeft"),
            "--variant",
            "taylor",
            "--quiet",
            "--json",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["relative_error"]["max"] <= 1e-5
    bad = runner.invoke(
        group, ["import", "lora", str(tmp_path), "-o", str(tmp_path / "b.qpeft"), "--variant", "taylor"]
    )
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and str(tmp_path) in bad.stderr
    misuse = runner.invoke(
        group,
        [
            "import",
            "lora",
            str(small),
            "-o",
            str(tmp_path / "c.qpeft"),
            "--variant",
            "taylor",
            "--layers",
            "2",
        ],
    )
    assert misuse.exit_code == 2 and "pauli" in misuse.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.qpeft"]
