"""Tests of qpeft_deploy.export.lora.export: exported folders load in real PEFT on MiniLM and reproduce logits."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

from qpeft_deploy.cli.lora import export_lora_command
from qpeft_deploy.cli.main import QpeftGroup
from qpeft_deploy.core.attach import adapted_layers, attach, detach
from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.export.lora.export import export_lora, lora_pair
from qpeft_deploy.export.lora.importer import import_lora
from qpeft_deploy.export.lora.peft_folder import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.io.qpeft_file import read_adapter, write_adapter
from qpeft_deploy.models import load_task_model, load_tokenizer, tokenize

LABELS = {0: "neg", 1: "pos", 2: "meh"}
TEXTS = ["a gorgeous, moving film", "dull and far too long", "not bad at all"]
TARGETS = ["query", "value", "pooler.dense"]


def adapted(variant: str) -> torch.nn.Module:
    """MiniLM with a rank-4 adapter, random λ and head, one target pruned to rank 2 and one fully masked."""
    model = load_task_model("minilm", LABELS)
    attach(model, TARGETS, rank=4, variant=variant, alpha=1.5, seed=3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("spectrum.lam") or name.startswith("classifier."):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith((".u.b", ".v.b", ".u.a", ".v.a")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    layers = list(adapted_layers(model).values())
    layers[0].spectrum.prune_to(2)
    layers[1].spectrum.prune_to(0)
    return model


@pytest.fixture(scope="module")
def inputs():
    return tokenize(load_tokenizer("minilm"), TEXTS)


@pytest.fixture(scope="module")
def pauli(tmp_path_factory):
    """(model, adapter file with the base fingerprint, the same without head or fingerprint)."""
    model, folder = adapted("pauli"), tmp_path_factory.mktemp("pauli")
    return (
        model,
        save_adapter(model, folder / "a.qpeft", base="minilm"),
        save_adapter(model, folder / "h.qpeft", drop_head=True),
    )


@pytest.mark.parametrize("variant, balanced", [("pauli", False), ("taylor", True)])
def test_peft_loads_the_export_and_matches_logits(tmp_path, inputs, variant, balanced):
    model = adapted(variant)
    path = save_adapter(model, tmp_path / "a.qpeft", base="minilm")
    report = export_lora(path, tmp_path / "peft", balanced=balanced)
    with torch.no_grad():
        expected = model(**inputs).logits
        peft_model = PeftModel.from_pretrained(
            load_task_model("minilm", LABELS, seed=9), str(tmp_path / "peft")
        )
        got = peft_model(**inputs).logits
        plain = detach(model)(**inputs).logits  # same head, no ΔW: the adapter must matter
    assert (got - expected).abs().max() < 1e-5
    assert (plain - expected).abs().max() > 1e-2
    assert report["modules"] == 12 and report["skipped"] == 1


def test_config_ranks_scales_and_names(tmp_path, pauli):
    model, path, _ = pauli
    export_lora(path, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    layers = list(adapted_layers(model).items())
    pruned, masked = layers[0][0].removesuffix(".weight"), layers[1][0].removesuffix(".weight")
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["r"] == config["lora_alpha"] == 4
    assert config["rank_pattern"] == config["alpha_pattern"] == {pruned: 2}
    assert masked not in config["target_modules"] and len(config["target_modules"]) == 12
    assert config["modules_to_save"] == ["classifier"]
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    strings = [v for v in json.dumps(config).split('"') if v.startswith(("/", "~")) or ":\\" in v]
    assert not strings, strings
    with safe_open(str(tmp_path / "peft" / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice(f"{KEY_PREFIX}bert.{pruned}.lora_A.weight").get_shape() == [2, 384]
        assert f.get_slice(f"{KEY_PREFIX}bert.{pruned}.lora_B.weight").get_shape() == [384, 2]
    assert {f"{KEY_PREFIX}classifier.weight", f"{KEY_PREFIX}classifier.bias"} <= keys
    assert not any(masked in k for k in keys)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 9), m=st.integers(2, 9), data=st.data())
def test_lora_pair_reproduces_delta(n, m, data):
    k = data.draw(st.integers(1, min(n, m)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    u, v = np.linalg.qr(rng.standard_normal((n, k)))[0], np.linalg.qr(rng.standard_normal((m, k)))[0]
    values = rng.standard_normal(k) * data.draw(st.lists(st.booleans(), min_size=k, max_size=k))
    for balanced in (False, True):
        a, b = lora_pair(u, values, v, balanced)
        assert a.shape == (np.count_nonzero(values), m) and b.shape == (n, np.count_nonzero(values))
        np.testing.assert_allclose(b @ a, (u * values) @ v.T, atol=1e-12)


def test_fp16_headless_export_and_permissions(tmp_path, pauli):
    path = pauli[2]
    old = os.umask(0o022)
    try:
        export_lora(path, tmp_path / "peft", dtype="fp16", base_name="my-org/minilm")
    finally:
        os.umask(old)
    config = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert config["task_type"] == "FEATURE_EXTRACTION" and config["modules_to_save"] is None
    assert config["base_model_name_or_path"] == "my-org/minilm"
    tensors = load_file(str(tmp_path / "peft" / WEIGHTS_FILE))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert all(k.startswith((f"{KEY_PREFIX}encoder.", f"{KEY_PREFIX}pooler.")) for k in tensors)
    for name in (CONFIG_FILE, WEIGHTS_FILE, ""):
        assert (tmp_path / "peft" / name).stat().st_mode & 0o777 == (0o755 if name == "" else 0o644)


def test_causal_lm_export_names_modules_and_imports_back(tmp_path, pauli):
    adapter = read_adapter(pauli[2])  # head-less; BertLMHeadModel has no pooler, so drop that target
    adapter.config.targets = {k: r for k, r in adapter.config.targets.items() if not k.startswith("pooler.")}
    adapter.state = {k: t for k, t in adapter.state.items() if not k.startswith("pooler.")}
    write_adapter(tmp_path / "lm.qpeft", adapter)
    with pytest.raises(BaseMismatchError, match="pooler.dense.weight"):
        export_lora(pauli[2], tmp_path / "bad", task_type="CAUSAL_LM")
    export_lora(tmp_path / "lm.qpeft", tmp_path / "peft", task_type="CAUSAL_LM")
    assert json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())["task_type"] == "CAUSAL_LM"
    assert all(
        k.startswith(f"{KEY_PREFIX}bert.encoder.layer.")
        for k in load_file(str(tmp_path / "peft" / WEIGHTS_FILE))
    )
    report = import_lora(tmp_path / "peft", tmp_path / "back.qpeft", variant="taylor")
    assert report["relative_error"]["max"] <= 1e-5
    back = read_adapter(tmp_path / "back.qpeft").config.targets
    ranks = {
        k: int(adapter.state[k.removesuffix("weight") + "spectrum.mask"].sum())
        for k in adapter.config.targets
    }
    assert back == {k: r for k, r in ranks.items() if r}
    with pytest.raises(ConfigError, match="drop-head"):
        export_lora(pauli[1], tmp_path / "x", task_type="CAUSAL_LM")


def test_bad_input_leaves_nothing(tmp_path, pauli):
    path = Path(shutil.copy(pauli[1], tmp_path / "a.qpeft"))
    before = path.read_bytes()
    (tmp_path / "junk.qpeft").write_bytes(b"not safetensors at all")
    with pytest.raises(FormatError, match="junk.qpeft"):
        export_lora(tmp_path / "junk.qpeft", tmp_path / "out1")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="busy"):
        export_lora(path, tmp_path / "busy")
    with pytest.raises(ConfigError, match="busy.*not an exported PEFT folder"):
        export_lora(path, tmp_path / "busy", overwrite=True)
    with pytest.raises(ConfigError, match="local path"):
        export_lora(path, tmp_path / "out2", base_name="/home/me/minilm")
    adapter = read_adapter(path)
    adapter.fingerprint = {k: b"\0" * 8 for k in adapter.fingerprint}
    write_adapter(tmp_path / "other.qpeft", adapter)
    with pytest.raises(BaseMismatchError, match="other.qpeft"):
        export_lora(tmp_path / "other.qpeft", tmp_path / "out3")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.qpeft", "busy", "junk.qpeft", "other.qpeft"]
    with pytest.warns(UserWarning, match="force"):
        export_lora(tmp_path / "other.qpeft", tmp_path / "out3", force=True)
    with pytest.raises(ConfigError, match="already exists"):
        export_lora(path, tmp_path / "out3")
    export_lora(path, tmp_path / "out3", overwrite=True)  # a previous export is replaced
    assert sorted(p.name for p in (tmp_path / "out3").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_cli(tmp_path, pauli):
    group, export = QpeftGroup("qpeft"), click.Group("export")
    export.add_command(export_lora_command)
    group.add_command(export)
    path = pauli[1]
    runner = CliRunner()
    ok = runner.invoke(group, ["export", "lora", str(path), "-o", str(tmp_path / "peft"), "--balanced"])
    assert ok.exit_code == 0, ok.output
    assert "12 modules" in ok.output and Path(tmp_path / "peft" / WEIGHTS_FILE).is_file()
    bad = runner.invoke(group, ["export", "lora", str(tmp_path / "missing.qpeft"), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "missing.qpeft" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_causal_adapter_exports_as_a_causal_lm_lora_that_peft_applies(tmp_path):
    from transformers import AutoModelForCausalLM

    from qpeft_deploy.models import resolve_base
    from tests.helpers import causal_adapter_model, chat_ids, greedy

    model = causal_adapter_model(seed=7)
    path = save_adapter(model, tmp_path / "lm.qpeft", base="smollm2")
    with pytest.raises(
        ConfigError, match=r"lm.qpeft: a causal-LM adapter exported as FEATURE_EXTRACTION .*CAUSAL_LM"
    ):
        export_lora(path, tmp_path / "wrong", base="smollm2", task_type="FEATURE_EXTRACTION")
    with pytest.raises(ConfigError, match=r"causal-LM adapter .* not a causal language model"):
        export_lora(path, tmp_path / "wrong", base="minilm")
    assert not (tmp_path / "wrong").exists()
    report = export_lora(path, tmp_path / "peft", base="smollm2")  # the task type comes from the adapter
    assert report["modules"] == 210 and report["head"] is None
    assert json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())["task_type"] == "CAUSAL_LM"
    keys = load_file(str(tmp_path / "peft" / WEIGHTS_FILE))
    assert all(k.startswith(f"{KEY_PREFIX}model.layers.") for k in keys)
    base = AutoModelForCausalLM.from_pretrained(str(resolve_base("smollm2")), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    loaded = {k for k in peft.state_dict() if "lora_" in k}
    assert len(loaded) == len(keys) == 420  # every key of the folder is applied
    ids = chat_ids(load_tokenizer("smollm2"), "Name a colour.")
    with torch.no_grad():
        assert (peft(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-4
    assert greedy(peft, ids) == greedy(model, ids)


# vLLM's LoRA loader, re-stated (vLLM needs CUDA torch and is not installed here). Sources, vllm-project/vllm:
#   vllm/lora/peft_helper.py @ e745bafffc44744aa601169f8c6f325e47ca7cd5: PEFTHelper.from_dict (r, lora_alpha,
#     target_modules required), validate_legal (no modules_to_save, no DoRA, bias "none" unless bias_enabled,
#     r <= max_lora_rank), __post_init__ (one scale lora_alpha / r for every module; rank_pattern is not read).
#   vllm/config/lora.py @ a78dc92f43ae2471dd40675a47079aa1a9a157c1: MaxLoRARanks, the --max-lora-rank choices.
#   vllm/lora/lora_model.py @ 0306474e9d1f26d8717aad457b9511f0c9e57d60: from_local_checkpoint reads
#     adapter_model.safetensors; check_unexpected_modules refuses a module whose last name part is not expected.
#   vllm/lora/utils.py @ 0fd157078c53638b7ffc9ce7f2c8b8d7ef7a7d28: parse_fine_tuned_lora_name (the
#     base_model.model. prefix, then <module>.lora_A.weight / .lora_B.weight), is_base_embedding_weights.
#   vllm/model_executor/models/llama.py @ e06c9ba2a6ea923a84add30f5dafaea126429b81: LlamaForCausalLM's
#     packed_modules_mapping (qkv_proj <- q/k/v_proj, gate_up_proj <- gate/up_proj) and embedding_modules.
# Not checked (needs vLLM on a GPU): the Punica kernels' numerics, and that LoRA of different ranks per packed
# slice (q/k/v) runs; every module's rank <= r is checked, which is what vLLM's padded slots need.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_LLAMA_LORA_MODULES = {  # linear suffixes, packed mapping expanded, plus embedding_modules
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
    "lm_head",
}


def vllm_module(key: str) -> tuple[str, str]:
    """(module, 'lora_A'|'lora_B') of a tensor key as vLLM's parse_fine_tuned_lora_name reads it."""
    assert key.startswith(KEY_PREFIX), key
    parts = key.split(".")
    assert parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"), f"{key} is unsupported LoRA weight"
    return ".".join(parts[2:-2]), parts[-2]


def test_smollm2_lora_export_meets_vllm_loader_expectations(tmp_path):
    from tests.helpers import causal_adapter_model

    model = causal_adapter_model(seed=5)
    next(iter(adapted_layers(model).values())).spectrum.prune_to(3)  # one module below r: rank_pattern
    path = save_adapter(model, tmp_path / "lm.qpeft", base="smollm2")
    group, export = QpeftGroup("qpeft"), click.Group("export")
    export.add_command(export_lora_command)
    group.add_command(export)
    out = tmp_path / "smollm2-lora"
    args = ["export", "lora", str(path), "-o", str(out), "--base", "smollm2", "--dtype", "bf16"]
    done = CliRunner().invoke(group, args)
    assert done.exit_code == 0, done.output

    config = json.loads((out / CONFIG_FILE).read_text())
    assert {"r", "lora_alpha", "target_modules"} <= config.keys()  # PEFTHelper.from_dict
    assert not config.get("modules_to_save") and not config.get("use_dora")  # validate_legal
    assert config.get("bias", "none") == "none" and not config.get("use_rslora")
    assert config["r"] in VLLM_MAX_LORA_RANKS  # --max-lora-rank r is a valid choice
    assert config["lora_alpha"] / config["r"] == 1  # vLLM's one scale is PEFT's for every module
    assert config["task_type"] == "CAUSAL_LM"
    last = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}  # PEFT suffix names; vLLM only
    assert last <= VLLM_LLAMA_LORA_MODULES - {"embed_tokens", "lm_head"}  # requires the key, keys decide

    assert (out / WEIGHTS_FILE).name == "adapter_model.safetensors" and (out / WEIGHTS_FILE).is_file()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            module, side = vllm_module(key)
            assert module.rsplit(".", 1)[-1] in VLLM_LLAMA_LORA_MODULES  # check_unexpected_modules
            assert not key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight"))
            pairs.setdefault(module, {})[side] = f.get_tensor(key)
    ranks = set()
    for module, pair in pairs.items():
        assert module.startswith("model.layers.") and pair.keys() == {"lora_A", "lora_B"}, module
        a, b = pair["lora_A"], pair["lora_B"]
        assert a.dtype == b.dtype == torch.bfloat16
        layer = model.get_submodule(module)
        out_features, in_features = getattr(layer, "base", layer).weight.shape
        assert a.shape[1] == in_features and b.shape[0] == out_features and a.shape[0] == b.shape[1]
        assert 1 <= a.shape[0] <= config["r"]  # every module fits vLLM's max_lora_rank slots
        ranks.add(a.shape[0])
    assert len(pairs) == 210 and ranks == {3, config["r"]}  # 30 layers x 7 modules; the pruned one has 3
