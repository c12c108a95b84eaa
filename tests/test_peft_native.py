"""qpeft_deploy.peft_native: Quantum-PEFT as a PEFT method, driven only through PEFT's own API."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from qpeft_deploy.core.attach import adapted_layers, attach
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.models import resolve_base
from qpeft_deploy.peft_native import QpeftConfig, QpeftLayer
from tests.helpers import tiny_gpt2_folder

MINILM = str(resolve_base("minilm"))
TOKENS = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 2088, 102, 0, 0]])
MASK = (TOKENS != 0).long()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return tiny_gpt2_folder(tmp_path_factory.mktemp("gpt2"))


def minilm(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2).eval()


def gpt2(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def inputs(kind: str) -> dict:
    if kind == "minilm":
        return {"input_ids": TOKENS, "attention_mask": MASK}
    return {"input_ids": torch.tensor([[5, 17, 42, 9, 3], [8, 1, 2, 0, 0]]), "attention_mask": MASK[:, :5]}


def train_steps(model, batch: dict, steps: int = 3) -> None:
    """A few AdamW steps on the model's own loss (labels: class 1, or the inputs for an LM)."""
    model.train()
    causal = model.peft_config[model.active_adapter].task_type == "CAUSAL_LM"
    labels = batch["input_ids"] if causal else torch.ones(len(batch["input_ids"]), dtype=torch.long)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


CASES = {
    "minilm": (
        "SEQ_CLS",
        lambda _: minilm(),
        f"AutoModelForSequenceClassification.from_pretrained({MINILM!r})",
    ),
    "gpt2": ("CAUSAL_LM", gpt2, "AutoModelForCausalLM.from_pretrained({folder!r})"),
}


@pytest.mark.parametrize("kind", CASES)
def test_round_trip_in_a_fresh_process(kind, gpt2_dir, tmp_path):
    task_type, build, loader = CASES[kind]
    model = build(gpt2_dir)
    batch = inputs(kind)
    base_logits = logits(model, batch)
    peft_model = get_peft_model(model, QpeftConfig(task_type=task_type, r=8, target_modules="all-linear"))
    with peft_model.disable_adapter():
        assert torch.equal(
            logits(peft_model, batch), base_logits
        )  # λ = 0 and the adapter off: exactly the base
    train_steps(peft_model, batch)
    trained = logits(peft_model, batch)
    assert (trained - base_logits).abs().max() > 1e-3
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, batch), base_logits)
    peft_model.save_pretrained(tmp_path / "adapter")
    torch.save({"batch": batch, "trained": trained}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import torch, qpeft_deploy, transformers
        from peft import PeftModel
        torch.manual_seed(0)
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        base = transformers.{loader.format(folder=str(gpt2_dir))}
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            print((model(**ref["batch"]).logits - ref["trained"]).abs().max().item())
            merged = model.merge_and_unload()
            print((merged(**ref["batch"]).logits - ref["trained"]).abs().max().item(), type(merged).__name__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert float(out[0]) <= 1e-6
    assert float(out[1]) <= 1e-5
    assert out[2] == type(model).__name__


def test_minilm_adapter_file_is_kilobytes_with_no_base_weights(tmp_path):
    peft_model = get_peft_model(minilm(), QpeftConfig(task_type="SEQ_CLS", r=8, target_modules="all-linear"))
    peft_model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    assert weights.stat().st_size <= 25_000
    with safe_open(weights, "pt") as f:
        keys = list(f.keys())
    assert len([k for k in keys if k.endswith(".qpeft_delta")]) == 37
    assert sorted(k for k in keys if not k.endswith(".qpeft_delta")) == [
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
    ]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "QPEFT" and config["base_model_name_or_path"] == MINILM
    assert config["target_shapes"]["bert.encoder.layer.0.intermediate.dense"] == [1536, 384, 8]
    assert config["base_model_prefix"] == "bert" and config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}


def test_same_layer_code_and_initialisation_as_attach():
    peft_model = get_peft_model(minilm(), QpeftConfig(task_type="SEQ_CLS", r=4, init_seed=3))
    attached = attach(minilm(), rank=4, seed=3)
    mine = [m.qpeft_delta["default"] for m in peft_model.modules() if isinstance(m, QpeftLayer)]
    theirs = list(adapted_layers(attached).values())
    assert len(mine) == len(theirs) == 37
    for a, b in zip(mine, theirs):
        assert type(a) in type(b).__mro__  # attach's layer is the same update plus its base
        assert torch.equal(a.u.theta, b.u.theta) and torch.equal(a.v.theta, b.v.theta)
    assert peft_model.get_nb_trainable_parameters()[0] == sum(
        p.numel() for p in attached.parameters() if p.requires_grad
    )


def test_named_adapters_set_delete_and_unload(tmp_path):
    batch = inputs("minilm")
    model = minilm()
    base_weight = model.bert.encoder.layer[0].attention.self.query.weight.clone()
    peft_model = get_peft_model(
        model, QpeftConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    )
    train_steps(peft_model, batch)
    first = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "a")
    peft_model.add_adapter("b", QpeftConfig(task_type="SEQ_CLS", r="full", target_modules=["query", "value"]))
    peft_model.set_adapter("b")
    train_steps(peft_model, batch, steps=2)
    second = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "b", selected_adapters=["b"])
    assert (first - second).abs().max() > 1e-3

    fresh = PeftModel.from_pretrained(minilm(), tmp_path / "a").eval()
    fresh.load_adapter(tmp_path / "b" / "b", adapter_name="b")
    assert torch.allclose(logits(fresh, batch), first, atol=1e-6)
    fresh.set_adapter("b")
    assert torch.allclose(logits(fresh, batch), second, atol=1e-6)
    fresh.delete_adapter("b")
    assert fresh.active_adapters == ["default"] or fresh.peft_config.keys() == {"default"}
    fresh.set_adapter("default")
    assert torch.allclose(logits(fresh, batch), first, atol=1e-6)
    plain = fresh.unload()
    assert not any(isinstance(m, QpeftLayer) for m in plain.modules())
    assert torch.equal(plain.bert.encoder.layer[0].attention.self.query.weight, base_weight)


def test_conv1d_merge_and_unmerge(gpt2_dir):
    batch = inputs("gpt2")
    peft_model = get_peft_model(gpt2(gpt2_dir), QpeftConfig(task_type="CAUSAL_LM", r="full", alpha=2.0))
    train_steps(peft_model, batch, steps=2)
    want = logits(peft_model, batch)
    peft_model.merge_adapter()
    assert (logits(peft_model, batch) - want).abs().max() <= 1e-5
    peft_model.unmerge_adapter()
    assert (logits(peft_model, batch) - want).abs().max() <= 1e-5


def test_angle_bits_train_on_the_grid():
    peft_model = get_peft_model(minilm(), QpeftConfig(task_type="SEQ_CLS", r=4, angle_bits=4))
    delta = next(m.qpeft_delta["default"] for m in peft_model.modules() if isinstance(m, QpeftLayer))
    assert delta.u.angle_bits == delta.v.angle_bits == 4


def test_loading_onto_another_base_is_refused(gpt2_dir, tmp_path):
    get_peft_model(gpt2(gpt2_dir), QpeftConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="base_model_prefix 'transformer'"):
        PeftModel.from_pretrained(minilm(), tmp_path)


def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    get_peft_model(minilm(), QpeftConfig(task_type="SEQ_CLS", r=4)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    dropped = next(k for k in tensors if k.endswith("qpeft_delta"))
    del tensors[dropped]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match="has no tensor") as info:
        PeftModel.from_pretrained(minilm(), tmp_path)
    assert "\n" not in str(info.value)


def test_a_truncated_target_vector_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    get_peft_model(minilm(), QpeftConfig(task_type="SEQ_CLS", r=4)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("qpeft_delta"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match="1-D float vector"):
        PeftModel.from_pretrained(minilm(), tmp_path)


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"r": 0}, "r must be"),
        ({"variant": "x"}, "variant"),
        ({"angle_bits": 9}, "angle_bits"),
        ({"mode": "y"}, "mode"),
    ],
)
def test_config_validation(bad, message):
    with pytest.raises(ConfigError, match=message):
        QpeftConfig(**bad)


def test_targeting_the_head_says_it_is_trained_whole():
    with pytest.raises(ConfigError, match="trained whole"):
        get_peft_model(minilm(), QpeftConfig(task_type="SEQ_CLS", target_modules=["query", "classifier"]))


def test_importing_the_package_stays_light_and_registers_on_peft_import():
    script = (
        "import sys, qpeft_deploy\n"
        "assert 'torch' not in sys.modules and 'peft' not in sys.modules\n"
        "import peft\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "print(PEFT_TYPE_TO_CONFIG_MAPPING['QPEFT'].__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "QpeftConfig"


def test_low_cpu_mem_usage_load_and_a_bf16_base_keep_the_update_in_fp32(tmp_path):
    batch = inputs("minilm")
    peft_model = get_peft_model(minilm(), QpeftConfig(task_type="SEQ_CLS", r=4))
    train_steps(peft_model, batch)
    want = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    meta_built = PeftModel.from_pretrained(minilm(), tmp_path, low_cpu_mem_usage=True).eval()
    assert (logits(meta_built, batch) - want).abs().max() <= 1e-6
    half = PeftModel.from_pretrained(minilm().to(torch.bfloat16), tmp_path).eval()
    delta = next(m.qpeft_delta["default"] for m in half.modules() if isinstance(m, QpeftLayer))
    assert delta.u.theta.dtype == delta.spectrum.lam.dtype == torch.float32
    assert (logits(half, batch).float() - want).abs().max() < 0.05


def test_layers_under_a_nested_wrapper_save_and_load_their_adapter(tmp_path):
    """Activation checkpointing (and FSDP auto-wrapping) put a wrapper module inside the model, so module names
    gain ``_checkpoint_wrapped_module.`` (``_fsdp_wrapped_module.``) mid-way; state-dict keys do not."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.bert.modeling_bert import BertLayer

    def wrapped(model):
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, BertLayer))
        return model

    batch = inputs("minilm")
    peft_model = wrapped(get_peft_model(minilm(), QpeftConfig(task_type="SEQ_CLS", r=4)))
    assert any("._checkpoint_wrapped_module." in name for name, _ in peft_model.named_modules())
    train_steps(peft_model, batch)
    trained = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert len(keys) == 37 + 2 and not any("wrapped" in k for k in keys)
    for base in (minilm(), wrapped(minilm())):  # a plain base, and a wrapped one (resuming a wrapped run)
        loaded = PeftModel.from_pretrained(base, tmp_path).eval()
        assert (logits(loaded, batch) - trained).abs().max() <= 1e-6


def test_lambda_bits_train_on_the_lambda_grid(tmp_path):
    batch = inputs("minilm")
    peft_model = get_peft_model(minilm(), QpeftConfig(task_type="SEQ_CLS", r=4, lambda_bits=3))
    train_steps(peft_model, batch)
    delta = next(m.qpeft_delta["default"] for m in peft_model.modules() if isinstance(m, QpeftLayer))
    assert delta.spectrum.lambda_bits == 3
    assert len(delta.spectrum.values().detach().unique()) <= 7  # 2·(2² − 1) + 1 levels
    want = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    assert (logits(PeftModel.from_pretrained(minilm(), tmp_path), batch) - want).abs().max() <= 1e-6
