"""Vision: the committed ViT base (samples/vit-fmnist5) adapted with Quantum-PEFT, merged, saved, exported.

Tests that need Fashion-MNIST or MNIST skip (naming scripts/fetch_fmnist.sh) when neither was fetched; the
parity tests use random pixels and always run. The patch-embedding section adapts the nn.Conv2d (ΔW on the flattened
kernel) with the linear layers and runs it through merge, the .qpeft file, ONNX and the LoRA export.
"""

import copy
import gzip
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from qpeft_deploy.cli.main import cli
from qpeft_deploy.core.attach import (
    adapted_layers,
    attach,
    detach,
    find_target_modules,
    merge_adapter,
    trainable_parameters,
    unmerge_adapter,
)
from qpeft_deploy.data import images as vision
from qpeft_deploy.data.tasks import load_data
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.export.onnx.export import export_onnx, export_onnx_adapter
from qpeft_deploy.io.model_io import load_adapted_model, save_adapter
from qpeft_deploy.merge.checkpoint import merge_checkpoint, unmerge_checkpoint
from qpeft_deploy.models import is_image_base, load_task_model
from qpeft_deploy.training.train import TrainSpec, build_model, evaluate, fit, run_spec

BASE = str(Path(__file__).resolve().parents[1] / "samples" / "vit-fmnist5")
LABELS5 = dict(enumerate(vision.FMNIST_LABELS[5:]))
TOL = 1e-4


def _data_or_skip(task: str, **kwargs):
    try:
        return load_data(task, **kwargs)
    except ConfigError as e:
        pytest.skip(f"{task} data not available ({e}); run scripts/fetch_fmnist.sh")


@pytest.fixture(scope="module")
def adapt_data():
    """960 training and 400 held-out images of an unseen task: Fashion-MNIST 5–9, else MNIST."""
    torch.set_num_threads(2)
    for task in ("fmnist-5to9", "mnist"):
        try:
            return load_data(task, max_train=960, max_test=400)
        except ConfigError:
            continue
    pytest.skip("neither Fashion-MNIST nor the MNIST subset is available; run scripts/fetch_fmnist.sh")


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def _randomise(model, std: float = 0.05) -> None:
    """Move every λ off zero (and perturb the head), as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.spectrum.lam.copy_(torch.randn(layer.spectrum.lam.shape, generator=generator) * std)


@pytest.fixture()
def adapted():
    model = attach(load_task_model(BASE, LABELS5), "all-linear", rank=8)
    _randomise(model)
    return model


# ------------------------------------------------------------------------------------------------ base folder


def test_base_folder_is_small_and_non_power_of_two():
    folder = Path(BASE)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == ["ViTForImageClassification"]
    assert (config["hidden_size"], config["intermediate_size"], config["patch_size"]) == (192, 384, 7)
    assert len(config["id2label"]) == 5
    assert (folder / "model.safetensors").stat().st_size < 6_000_000
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["task"] == "fmnist-0to4" and record["seed"] == 0
    assert json.loads((folder / "preprocessor_config.json").read_text()) == json.loads(
        json.dumps(vision.preprocessor_config())
    )
    assert is_image_base(BASE) and not is_image_base("minilm")


def test_task_model_gets_a_new_seeded_head():
    with safe_open(str(Path(BASE) / "model.safetensors"), "pt") as f:
        base_head = f.get_tensor("classifier.weight")
    five = load_task_model(BASE, LABELS5, seed=3)
    assert five.config.id2label[0] == "Sandal"
    assert not torch.equal(five.classifier.weight, base_head)  # same shape, still replaced
    assert torch.equal(five.classifier.weight, load_task_model(BASE, LABELS5, seed=3).classifier.weight)
    ten = load_task_model(BASE, {i: str(i) for i in range(10)})
    assert ten.classifier.out_features == 10
    body = [(n, p) for n, p in ten.named_parameters() if not n.startswith("classifier.")]
    assert body and all(torch.equal(p, five.get_parameter(n)) for n, p in body)  # only the head differs


# ---------------------------------------------------------------------------------------------- attach, merge


def test_attach_all_linear_leaves_outputs_unchanged_at_init(pixels):
    model = load_task_model(BASE, LABELS5)
    before = _logits(model, pixels)
    attach(model, "all-linear", rank=8)
    layers = adapted_layers(model)
    assert len(layers) == 4 * 6 and "classifier.weight" not in layers
    shapes = {(lay.out_features, lay.in_features) for lay in layers.values()}
    assert shapes == {(192, 192), (384, 192), (192, 384)}
    with safe_open(str(Path(BASE) / "model.safetensors"), "pt") as f:  # targets are base keys (vit. prefixed)
        stored = set(f.keys())
    assert all(f"vit.{key}" in stored for key in layers)
    assert torch.equal(_logits(model, pixels), before)


@pytest.mark.parametrize("rank", [8, "full"])
def test_merge_matches_the_adapted_model(pixels, rank):
    model = attach(load_task_model(BASE, LABELS5), "all-linear", rank=rank)
    _randomise(model)
    adapted = _logits(model, pixels)
    assert (
        adapted - _logits(detach(attach(load_task_model(BASE, LABELS5), "all-linear"), merge=True), pixels)
    ).abs().max() > 1e-3  # the update is not a no-op
    merge_adapter(model)
    assert (_logits(model, pixels) - adapted).abs().max() <= TOL
    plain = detach(model, merge=True)
    assert (_logits(plain, pixels) - adapted).abs().max() <= TOL


@pytest.mark.parametrize("bits", [None, 8])
def test_adapter_file_round_trip(tmp_path, adapted, pixels, bits):
    path = save_adapter(adapted, tmp_path / "v.qpeft", bits=bits, base=BASE)
    assert path.stat().st_size < 20_000
    loaded = load_adapted_model(BASE, path)
    diff = (_logits(loaded, pixels) - _logits(adapted, pixels)).abs().max()
    assert diff <= (1e-6 if bits is None else 5e-2)
    assert loaded.config.id2label == adapted.config.id2label


def test_merge_checkpoint_file_matches(tmp_path, adapted, pixels):
    from transformers import ViTForImageClassification

    path = save_adapter(adapted, tmp_path / "v.qpeft", base=BASE)
    out = merge_checkpoint(BASE, [path], tmp_path / "merged", quiet=True)
    merged = ViTForImageClassification.from_pretrained(str(out), local_files_only=True).eval()
    assert (_logits(merged, pixels) - _logits(adapted, pixels)).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------ data, train


def test_read_idx_and_pixel_values(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    (tmp_path / "x.gz").write_bytes(gzip.compress(header + images.tobytes()))
    assert np.array_equal(vision.read_idx(tmp_path / "x.gz"), images)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(header + images.tobytes()[:-1]))
    with pytest.raises(ConfigError, match="bad.gz"):
        vision.read_idx(tmp_path / "bad.gz")
    x = vision.pixel_values(list(images))
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0, 0, 1], torch.tensor((1 / 255 - vision.MEAN) / vision.STD))


def test_missing_data_names_the_fetch_script(tmp_path, monkeypatch):
    monkeypatch.setenv("QPEFT_DATA", str(tmp_path))
    monkeypatch.setattr(vision, "SYSTEM_FMNIST", tmp_path / "none")
    vision.fashion_mnist.cache_clear()
    try:
        with pytest.raises(ConfigError, match="fetch_fmnist.sh"):
            vision.load_image_task("fmnist-5to9")
    finally:
        vision.fashion_mnist.cache_clear()
    with pytest.raises(ConfigError, match="unknown image task"):
        vision.load_image_task("cifar10")


def test_image_task_splits_are_fixed_and_relabelled():
    data = _data_or_skip("fmnist-5to9", max_train=50, max_test=20)
    assert data.labels == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert {label for _, label in data.train} <= set(range(5))
    again = load_data("fmnist-5to9", max_train=100, max_test=20)
    assert all(np.array_equal(a, b) and la == lb for (a, la), (b, lb) in zip(data.train, again.train[:50]))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(data.test, again.test))


def test_text_task_on_image_base_is_refused():
    with pytest.raises(ConfigError, match="text base"):
        run_spec(TrainSpec(base=BASE, task="sms", max_examples=4, max_test=4), quiet=True)


def test_short_adaptation_beats_head_only(adapt_data):
    # the rates benchmarks/vision.py picked on validation: head 5e-3 (head-only's best), circuits 2e-2
    spec = TrainSpec(base=BASE, task=adapt_data.name, rank=8, epochs=2, batch_size=16, lr=2e-2, head_lr=5e-3)
    accuracy, counts = {}, {}
    for method, adapter in (("qpeft", True), ("head-only", False)):
        model = build_model(spec, adapt_data.id2label, adapter=adapter)
        fit(
            model,
            None,
            adapt_data.train,
            epochs=spec.epochs,
            lr=spec.lr,
            head_lr=spec.head_lr,
            batch_size=spec.batch_size,
            seed=spec.seed,
            quiet=True,
        )
        accuracy[method] = evaluate(model, None, adapt_data.test)["accuracy"]
        counts[method] = trainable_parameters(model)
    assert counts["qpeft"] < 4 * counts["head-only"]  # a few thousand parameters more than the head
    margin = 0.05 if adapt_data.name == "fmnist-5to9" else 0.02  # measured .700 vs .575 (MNIST .343 vs .282)
    assert accuracy["qpeft"] > accuracy["head-only"] + margin, accuracy


def test_cli_train_and_eval_on_the_vit(tmp_path):
    _data_or_skip("fmnist-5to9", max_train=1, max_test=1)
    out = tmp_path / "fm.qpeft"
    args = ["--base", BASE, "--task", "fmnist-5to9", "--quiet"]
    result = CliRunner().invoke(
        cli,
        [
            "train",
            *args,
            "--epochs",
            "1",
            "--max-examples",
            "64",
            "--max-test",
            "64",
            "--bits",
            "8",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["test_examples"] == 64 and report["file_bytes"] == out.stat().st_size < 10_000
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            "--base",
            BASE,
            "--adapter",
            str(out),
            "--task",
            "fmnist-5to9",
            "--max-examples",
            "64",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["test_accuracy"] == pytest.approx(report["test_accuracy"], abs=1e-6)


# ------------------------------------------------------------------------------------------------------- ONNX


def _ort_logits(folder: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": x.numpy()})[0]


@pytest.mark.parametrize("mode", ["merged", "runtime"])
def test_onnx_parity(tmp_path, adapted, pixels, mode):
    path = save_adapter(adapted, tmp_path / "v.qpeft", base=BASE)
    report = export_onnx(BASE, path, tmp_path / mode, mode=mode, quiet=True)
    assert report["max_abs_diff_vs_torch"] <= TOL
    for x in (pixels[:1], torch.cat([pixels] * 8)):  # batch 1 and 32
        assert np.abs(_ort_logits(tmp_path / mode, x) - _logits(adapted, x).numpy()).max() <= TOL


def test_cli_pack_and_export_the_vit_adapter(tmp_path, adapted, pixels):
    path = save_adapter(adapted, tmp_path / "v.qpeft", base=BASE)
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "pack",
            str(path),
            "--bits",
            "8",
            "--lambda-dtype",
            "fp16",
            "--base",
            BASE,
            "-o",
            str(tmp_path / "p.qpeft"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.qpeft").stat().st_size < path.stat().st_size
    result = runner.invoke(
        cli,
        [
            "export",
            "onnx",
            "--base",
            BASE,
            "--adapter",
            str(tmp_path / "p.qpeft"),
            "--mode",
            "merged",
            "-o",
            str(tmp_path / "onnx"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["task"] == "image-classification" and report["max_abs_diff_vs_torch"] <= TOL
    packed = load_adapted_model(BASE, tmp_path / "p.qpeft")
    assert np.abs(_ort_logits(tmp_path / "onnx", pixels) - _logits(packed, pixels).numpy()).max() <= TOL


def test_export_checks_accuracy_on_an_image_task_and_refuses_a_text_one(tmp_path, adapted):
    _data_or_skip("fmnist-5to9", max_train=1, max_test=1)
    path = save_adapter(adapted, tmp_path / "v.qpeft", base=BASE)
    report = export_onnx(
        BASE, path, tmp_path / "onnx", mode="runtime", check_task="fmnist-5to9", check_examples=40, quiet=True
    )
    assert report["max_abs_diff_vs_torch"] <= TOL and report["argmax_agreement"] == 1.0
    assert report["accuracy"]["onnx"] == report["accuracy"]["torch"]
    with pytest.raises(ConfigError, match="--check-task rt: this base is an image model"):
        export_onnx(BASE, path, tmp_path / "text", mode="merged", check_task="rt", quiet=True)
    assert not (tmp_path / "text").exists()


def test_ort_swaps_two_vision_adapters(tmp_path, pixels):
    from qpeft_deploy.runtime.ort_session import OrtAdapterSession

    models, paths = {}, {}
    for name, labels in (("fm", LABELS5), ("digits", {i: str(i) for i in range(10)})):
        model = load_task_model(BASE, labels, seed=len(labels))
        models[name] = attach(model, "all-linear", rank=8, seed=len(labels))
        _randomise(models[name], std=0.05 * len(labels))
        paths[name] = save_adapter(models[name], tmp_path / f"{name}.qpeft", base=BASE)
    export_onnx(BASE, paths["fm"], tmp_path / "swap", mode="swappable", quiet=True)
    session = OrtAdapterSession(tmp_path / "swap" / "model.onnx")
    for name, path in paths.items():
        export_onnx_adapter(path, tmp_path / f"{name}.onnx_adapter")
        session.load(name, tmp_path / f"{name}.onnx_adapter")
    outputs = {name: session({"pixel_values": pixels}, adapter=name) for name in paths}
    for name, out in outputs.items():
        assert np.abs(out - _logits(models[name], pixels).numpy()).max() <= TOL
    mixed = session({"pixel_values": pixels}, adapter=["fm", "digits", "fm", None])
    assert np.abs(mixed[1] - outputs["digits"][1]).max() <= TOL and len(mixed[0]) == 5


# ------------------------------------------------------------------------- patch embedding (nn.Conv2d) target

CONV = "embeddings.patch_embeddings.projection"  # Conv2d(1, 192, 7, stride 7): ΔW is 192 × 49
CONV_KEY = f"{CONV}.weight"
CONV_TARGETS = r".*(query|key|value|dense|projection)$"  # the 24 linear layers and the patch embedding


def _train_steps(model, x: torch.Tensor, steps: int = 3) -> None:
    """A few AdamW steps on fixed labels, so every angle (the conv's too) and λ move off their start."""
    labels = torch.arange(len(x)) % model.config.num_labels
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(pixel_values=x, labels=labels).loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def conv_adapted(pixels):
    model = attach(load_task_model(BASE, LABELS5), CONV_TARGETS, rank=8)
    _randomise(model)
    theta = adapted_layers(model)[CONV_KEY].u.theta.detach().clone()
    _train_steps(model, pixels)
    assert not torch.equal(adapted_layers(model)[CONV_KEY].u.theta, theta)
    return model


@pytest.fixture(scope="module")
def conv_file(conv_adapted, tmp_path_factory):
    return save_adapter(conv_adapted, tmp_path_factory.mktemp("conv") / "c.qpeft", base=BASE)


def test_conv_target_merges_on_the_flattened_kernel(conv_adapted, pixels):
    model = copy.deepcopy(conv_adapted)
    layers = adapted_layers(model)
    conv = layers[CONV_KEY]
    assert len(layers) == 25 and (conv.out_features, conv.in_features, conv.mode) == (192, 49, "dense")
    w0 = conv.base.weight.detach().clone()
    delta = conv.delta_weight().detach()
    assert delta.abs().max() > 1e-3
    adapted = _logits(model, pixels)
    merge_adapter(model)
    assert (_logits(model, pixels) - adapted).abs().max() <= TOL
    flat = conv.base.weight.reshape(192, -1) - w0.reshape(192, -1)  # rows in PyTorch's flattening order
    assert (flat - delta).abs().max() <= 1e-6
    unmerge_adapter(model)
    assert (conv.base.weight - w0).abs().max() <= 1e-6


def test_conv_target_file_round_trip(conv_adapted, conv_file, pixels):
    from qpeft_deploy.io.qpeft_file import read_adapter

    assert tuple(read_adapter(conv_file).shapes[CONV_KEY]) == (192, 49)
    loaded = load_adapted_model(BASE, conv_file)
    assert (_logits(loaded, pixels) - _logits(conv_adapted, pixels)).abs().max() <= 1e-5


def test_conv_target_merge_and_unmerge_checkpoint(tmp_path, conv_adapted, conv_file, pixels):
    from safetensors.torch import load_file
    from transformers import ViTForImageClassification

    out = merge_checkpoint(BASE, [conv_file], tmp_path / "merged", quiet=True)
    merged = ViTForImageClassification.from_pretrained(str(out), local_files_only=True).eval()
    assert (_logits(merged, pixels) - _logits(conv_adapted, pixels)).abs().max() <= TOL
    back = unmerge_checkpoint(out, [conv_file], tmp_path / "unmerged", quiet=True)
    key = f"vit.{CONV_KEY}"
    restored = load_file(back / "model.safetensors")[key]
    base = load_file(Path(BASE) / "model.safetensors")[key]
    assert restored.shape == (192, 1, 7, 7) and (restored - base).abs().max() <= 1e-6


@pytest.mark.parametrize(
    "mode, swap",
    [("merged", "factors"), ("runtime", "factors"), ("swappable", "factors"), ("swappable", "angles")],
)
def test_conv_target_onnx_parity(tmp_path, conv_adapted, conv_file, pixels, mode, swap):
    import onnx

    report = export_onnx(BASE, conv_file, tmp_path / "onnx", mode=mode, swap=swap, quiet=True)
    assert report["max_abs_diff_vs_torch"] <= TOL
    for x in (pixels[:1], pixels):
        assert np.abs(_ort_logits(tmp_path / "onnx", x) - _logits(conv_adapted, x).numpy()).max() <= TOL
    names = {node.name for node in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node}
    assert (f"qpeft/{CONV_KEY}/conv" in names) == (mode != "merged")


def test_conv_target_exports_as_peft_conv_lora(tmp_path, conv_adapted, pixels):
    from peft import PeftModel
    from transformers import ViTModel

    from qpeft_deploy.export.lora.export import export_lora

    path = save_adapter(conv_adapted, tmp_path / "h.qpeft", drop_head=True)
    export_lora(path, tmp_path / "peft", base=BASE)
    plain = ViTModel.from_pretrained(BASE, local_files_only=True).eval()
    peft_model = PeftModel.from_pretrained(plain, str(tmp_path / "peft")).eval()
    assert type(peft_model.base_model.model.get_submodule(CONV).lora_A["default"]).__name__ == "Conv2d"
    with torch.no_grad():
        got = peft_model(pixel_values=pixels).last_hidden_state
        want = load_adapted_model(BASE, path)(pixel_values=pixels).last_hidden_state
    assert (got - want).abs().max() <= TOL


def test_all_linear_skips_the_conv_and_bad_conv_targets_are_refused():
    model = load_task_model(BASE, LABELS5)
    assert f"vit.{CONV}" not in find_target_modules(model, "all-linear")
    assert find_target_modules(model, [CONV]) == [f"vit.{CONV}"]
    with pytest.raises(ConfigError, match=rf"^{CONV_KEY}: circuit mode is for linear layers"):
        attach(model, CONV_TARGETS, rank=4, mode="circuit")
    grouped = torch.nn.Sequential(OrderedDict(patches=torch.nn.Conv2d(4, 8, 3, groups=2)))
    with pytest.raises(ConfigError, match=r"^patches: can only adapt an nn.Conv2d with groups=1"):
        attach(grouped, ["patches"], rank=2)
