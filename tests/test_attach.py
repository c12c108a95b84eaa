"""Tests of qpeft_deploy.core.attach on the real shipped all-MiniLM-L6-v2 task model."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from qpeft_deploy.core.attach import (
    CONFIG_ATTR,
    adapted_layers,
    adapter_config,
    adapter_state,
    attach,
    detach,
    find_target_modules,
    load_adapter_state,
    merge_adapter,
    trainable_parameters,
    unmerge_adapter,
)
from qpeft_deploy.core.circuit import parameter_count
from qpeft_deploy.core.layer import QuantumPeftLinear
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.models import load_task_model, load_tokenizer, tokenize

LABELS = {0: "neg", 1: "pos"}
SENTENCES = [
    "A gripping, beautifully shot film.",
    "Dull.",
    "The plot meanders for two hours and the jokes never land, but the lead actor is quietly wonderful.",
]


@pytest.fixture(scope="module")
def base_model():
    return load_task_model("minilm", LABELS, seed=0)


@pytest.fixture(scope="module")
def batch():
    tok = load_tokenizer("minilm")
    out = tokenize(tok, SENTENCES)
    lengths = out["attention_mask"].sum(dim=1).tolist()
    assert len(set(lengths)) == 3 and min(lengths) < out["input_ids"].shape[1]  # really padded
    return out


@pytest.fixture(scope="module")
def base_logits(base_model, batch):
    with torch.no_grad():
        return base_model(**batch).logits.clone()


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def randomise_lambdas(model, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.spectrum.lam.copy_(torch.randn(layer.rank, generator=g) * scale)


# ---------------------------------------------------------------------------------------------------------------
# Target selection
# ---------------------------------------------------------------------------------------------------------------


def test_all_linear_selection(model):
    names = find_target_modules(model, "all-linear")
    assert len(names) == 37
    assert "bert.pooler.dense" in names
    assert "classifier" not in names and not any(n.endswith("classifier") for n in names)
    assert len(set(names)) == 37
    attach(model, "all-linear", rank=8)
    layers = adapted_layers(model)
    assert len(layers) == 37
    assert "pooler.dense.weight" in layers and "encoder.layer.0.attention.self.query.weight" in layers
    assert isinstance(model.classifier, nn.Linear)
    assert set(adapter_config(model).targets) == set(layers)
    assert all(k == 8 for k in adapter_config(model).targets.values())


def test_targets_by_name_regex_and_key(model):
    by_name = find_target_modules(model, ["query", "value"])
    assert len(by_name) == 12
    assert all(n.endswith((".query", ".value")) for n in by_name)
    by_regex = find_target_modules(model, r".*\.attention\.self\.(query|key)")
    assert len(by_regex) == 12
    assert all(n.endswith((".query", ".key")) for n in by_regex)
    by_key = find_target_modules(model, ["encoder.layer.0.attention.self.query.weight"])
    assert by_key == ["bert.encoder.layer.0.attention.self.query"]
    by_key_no_suffix = find_target_modules(model, ["encoder.layer.0.attention.self.query"])
    assert by_key_no_suffix == by_key
    # "dense" matches attention.output.dense, intermediate.dense, output.dense and the pooler
    assert len(find_target_modules(model, ["dense"])) == 19


@pytest.mark.parametrize(
    "targets", [["nonexistent"], r"foo\..*", "query"]
)  # a bare string is a full-match regex
def test_no_match_raises(model, targets):
    with pytest.raises(ConfigError):
        attach(model, targets, rank=4)
    assert not hasattr(model, CONFIG_ATTR)


def test_a_regex_in_a_target_list_suggests_the_re_prefix(model):
    for targets in ([r".*\.attention\.self\.query"], ["value", r".*\.attention\.self\.query"]):
        with pytest.raises(ConfigError) as error:
            find_target_modules(model, targets)
        assert str(error.value) == (
            r"target '.*\\.attention\\.self\\.query' matches no module name (a list entry is a name, not a "
            r"regex); as a regex it selects 6 modules: write --targets 're:.*\.attention\.self\.query' (in "
            "Python, a str rather than a list)"
        )
    with pytest.raises(ConfigError) as error:  # the CLI's prefix passed to the Python API
        find_target_modules(model, "re:.*query")
    assert str(error.value) == (
        "no nn.Linear/Conv1D/Conv2d module of BertForSequenceClassification matches targets 're:.*query' "
        "(the re: prefix is the CLI's: in Python pass the regex alone)"
    )


@pytest.mark.parametrize("targets", [["classifier"], ["query", "classifier"], ".*(query|classifier)"])
def test_the_head_as_a_target_says_it_is_trained_whole_not_a_rank_error(model, targets):
    with pytest.raises(ConfigError) as error:
        attach(model, targets, rank=8)  # classifier is 2×384: rank 8 would be out of range
    assert str(error.value) == (
        "classifier: the classification head is trained whole and saved in the adapter (like PEFT's "
        "modules_to_save), so it cannot also be a target: leave it out of the targets"
    )
    assert not hasattr(model, CONFIG_ATTR)
    attach(copy.deepcopy(model), ["classifier"], rank=2, train_head=False)  # a frozen head may be adapted


class RobertaLikeHead(nn.Module):
    """A plain torch classifier whose head holds two linear layers (as RoBERTa's does)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.classifier = nn.Sequential(OrderedDict(dense=nn.Linear(8, 8), out_proj=nn.Linear(8, 3)))


def test_all_linear_on_a_plain_torch_model_leaves_out_the_output_layer():
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert find_target_modules(mlp, "all-linear") == ["0", "2"]
    assert find_target_modules(mlp, ["4"]) == ["4"]  # named, it is a target
    assert find_target_modules(RobertaLikeHead(), "all-linear") == ["body.0", "body.2"]
    with pytest.raises(ConfigError) as error:
        find_target_modules(nn.Sequential(nn.Linear(6, 3)), "all-linear")
    assert str(error.value) == (
        "no nn.Linear/Conv1D/Conv2d module of Sequential matches targets 'all-linear' (it leaves out the "
        "output layer ['0']: name it to adapt it)"
    )


def test_bad_rank_and_variant(model):
    with pytest.raises(ConfigError):
        attach(model, "all-linear", rank=500)
    with pytest.raises(ConfigError):
        attach(model, ["query"], rank=0)
    with pytest.raises(ConfigError):
        attach(model, ["query"], rank=4, variant="lora")
    assert not hasattr(model, CONFIG_ATTR)
    assert not any(isinstance(m, QuantumPeftLinear) for m in model.modules())


def test_full_rank(model):
    attach(model, "all-linear", rank="full")
    layers = adapted_layers(model)
    shapes = {(layer.out_features, layer.in_features) for layer in layers.values()}
    assert shapes == {(384, 384), (1536, 384), (384, 1536)}
    for layer in layers.values():
        assert layer.rank == min(layer.out_features, layer.in_features) == 384


# ---------------------------------------------------------------------------------------------------------------
# Attached model behaviour
# ---------------------------------------------------------------------------------------------------------------


def test_unchanged_at_init_and_trainable_set(model, batch, base_logits):
    attach(model, "all-linear", rank=8, seed=3)
    assert (logits(model, batch) - base_logits).abs().max() <= 1e-6
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trainable"
    for n in trainable:
        assert n.endswith((".u.theta", ".v.theta", ".spectrum.lam")) or n.startswith("classifier."), n
    assert {"classifier.weight", "classifier.bias"} <= trainable
    layers = adapted_layers(model)
    expected = sum(
        parameter_count(layer.out_features) + parameter_count(layer.in_features) + layer.rank
        for layer in layers.values()
    )
    assert expected == 6 * (4 * (42 + 42 + 8) + 2 * (54 + 42 + 8)) + (42 + 42 + 8) == 3548
    head = sum(p.numel() for p in model.classifier.parameters())
    assert head == 384 * 2 + 2
    assert trainable_parameters(model) == expected + head
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == expected + head


def test_no_head_training(model):
    attach(model, ["query"], rank=4, train_head=False)
    assert not any(p.requires_grad for p in model.classifier.parameters())
    assert trainable_parameters(model) == 6 * (42 + 42 + 4)
    assert adapter_config(model).head is None


def test_attach_twice_raises(model):
    attach(model, ["query"], rank=4)
    with pytest.raises(ConfigError):
        attach(model, ["value"], rank=4)
    assert len(adapted_layers(model)) == 6


def test_merge_unmerge_and_detach(model, batch, base_logits):
    attach(model, "all-linear", rank=8)
    randomise_lambdas(model)
    originals = {key: layer.base.weight.detach().clone() for key, layer in adapted_layers(model).items()}
    adapted = logits(model, batch)
    assert (adapted - base_logits).abs().max() > 1e-3  # λ changes the model
    merge_adapter(model)
    assert all(layer.merged for layer in adapted_layers(model).values())
    assert (logits(model, batch) - adapted).abs().max() <= 1e-5
    unmerge_adapter(model)
    for key, layer in adapted_layers(model).items():
        assert not layer.merged
        assert (layer.base.weight - originals[key]).abs().max() <= 1e-5
    assert (logits(model, batch) - adapted).abs().max() <= 1e-5
    merge_adapter(model)
    plain = detach(model)  # unmerges, then puts the base layers back
    assert plain is model and not hasattr(model, CONFIG_ATTR)
    assert not any(isinstance(m, QuantumPeftLinear) for m in model.modules())
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert type(model.bert.pooler.dense) is nn.Linear
    assert (logits(model, batch) - base_logits).abs().max() <= 1e-5
    # the restored model can be adapted again
    attach(model, ["query"], rank=2)
    assert len(adapted_layers(model)) == 6


def test_detach_exact_when_never_merged(model, batch, base_logits):
    attach(model, "all-linear", rank=8)
    randomise_lambdas(model)
    detach(model)
    assert not any(isinstance(m, QuantumPeftLinear) for m in model.modules())
    assert torch.equal(logits(model, batch), base_logits)


def test_detach_with_merge_keeps_the_update(model, batch):
    attach(model, ["query", "value", "intermediate.dense"], rank=8)
    randomise_lambdas(model, seed=2)
    adapted = logits(model, batch)
    detach(model, merge=True)
    assert not any(isinstance(m, QuantumPeftLinear) for m in model.modules())
    assert (logits(model, batch) - adapted).abs().max() <= 1e-5


def test_adapter_state_round_trip(base_model, batch):
    a = attach(copy.deepcopy(base_model), "all-linear", rank=8, seed=1)
    randomise_lambdas(a, seed=5)
    with torch.no_grad():
        a.classifier.weight.add_(0.1)
    a.bert.encoder.layer[0].attention.self.query.spectrum.prune_to(3)
    state = adapter_state(a)
    assert all(not k.startswith(("bert.", "base.")) and ".base." not in k for k in state)
    assert "encoder.layer.0.attention.self.query.u.theta" in state
    assert "encoder.layer.0.attention.self.query.spectrum.mask" in state
    assert "classifier.weight" in state
    expected = logits(a, batch)

    b = attach(copy.deepcopy(base_model), "all-linear", rank=8, seed=2)
    assert not torch.equal(
        b.bert.encoder.layer[0].attention.self.query.u.theta,
        state["encoder.layer.0.attention.self.query.u.theta"],
    )
    assert (logits(b, batch) - expected).abs().max() > 1e-3
    load_adapter_state(b, state)
    assert (logits(b, batch) - expected).abs().max() <= 1e-6
    assert b.bert.encoder.layer[0].attention.self.query.spectrum.active_rank() == 3
    # the state is a copy: changing it afterwards does not touch the model
    state["classifier.bias"].add_(1.0)
    assert (logits(b, batch) - expected).abs().max() <= 1e-6


def test_load_adapter_state_rejects_bad_tensors(base_model):
    model = attach(copy.deepcopy(base_model), ["query", "value"], rank=4)
    good = adapter_state(model)
    key = "encoder.layer.1.attention.self.value.u.theta"

    wrong_shape = dict(good)
    wrong_shape[key] = torch.zeros(good[key].numel() + 1)
    with pytest.raises(ConfigError):
        load_adapter_state(model, wrong_shape)

    nan = dict(good)
    nan[key] = good[key].clone()
    nan[key][0] = float("nan")
    with pytest.raises(ConfigError):
        load_adapter_state(model, nan)

    inf = dict(good)
    inf["classifier.weight"] = good["classifier.weight"].clone()
    inf["classifier.weight"][0, 0] = float("inf")
    with pytest.raises(ConfigError):
        load_adapter_state(model, inf)

    missing = dict(good)
    del missing[key]
    with pytest.raises(ConfigError):
        load_adapter_state(model, missing)

    extra = dict(good)
    extra["encoder.layer.0.attention.self.key.u.theta"] = good[key].clone()
    with pytest.raises(ConfigError):
        load_adapter_state(model, extra)

    # a model with other ranks does not accept it either
    other = attach(copy.deepcopy(base_model), ["query", "value"], rank=5)
    with pytest.raises(ConfigError):
        load_adapter_state(other, good)


def test_trainer_two_steps(model, batch, tmp_path):
    from transformers import Trainer, TrainingArguments

    attach(model, "all-linear", rank=4)
    tok = load_tokenizer("minilm")
    texts = SENTENCES + ["Terrible acting.", "I loved it.", "Not worth it.", "A masterpiece.", "Boring."]
    enc = tok(texts, padding="max_length", truncation=True, max_length=24)
    data = [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": i % 2}
        for i in range(len(texts))
    ]
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    theta_before = {k: layer.u.theta.detach().clone() for k, layer in adapted_layers(model).items()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 2
    layers = adapted_layers(model)
    for key, layer in layers.items():
        lam = layer.spectrum.lam.detach()
        assert torch.isfinite(lam).all()
        assert (lam != 0).any(), f"{key}: λ did not move"
    # λ ≠ 0 after step 1, so step 2 moves the angles too
    assert any(not torch.equal(layer.u.theta.detach(), theta_before[k]) for k, layer in layers.items())
    # the base stays frozen
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]), n
    model.eval()
    assert torch.isfinite(logits(model, batch)).all()


def test_failed_attach_leaves_the_model_untouched(model):
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError):
        attach(model, ["query"], rank=4, mode="fast")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not adapted_layers(model)


def test_the_head_cannot_be_a_target(model):
    with pytest.raises(ConfigError, match="head"):
        attach(model, ["classifier"], rank=2)


def test_load_adapter_state_is_all_or_nothing(model):
    attach(model, ["query"], rank=4)
    randomise_lambdas(model)
    state = adapter_state(model)
    bad = {k: v.clone() for k, v in state.items()}
    last = [k for k in bad if k.endswith("spectrum.lam")][-1]
    bad[last][0] = float("nan")
    fresh = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in state.items()}
    load_adapter_state(model, fresh)
    with pytest.raises(ConfigError, match="NaN"):
        load_adapter_state(model, bad)
    assert all(torch.equal(v, fresh[k]) for k, v in adapter_state(model).items())


def test_module_apply_works_on_an_adapted_model(model, batch):
    """nn.Module.apply(fn) visits every module (init helpers and minLoRA-style code call it); circuits must not
    shadow it."""
    attach(model, rank=4)
    visited = []
    assert model.apply(lambda m: visited.append(type(m).__name__)) is model
    assert visited.count("QuantumPeftLinear") == 37 and visited.count("PauliCircuit") == 2 * 37
    before = logits(model, batch)
    model.apply(lambda m: None)
    assert torch.equal(logits(model, batch), before)


def test_gradient_checkpointing_reaches_every_adapter(model, batch):
    attach(model, rank=4)
    ours = set(model.get_input_embeddings()._forward_hooks)  # PEFT's input-require-grads hook
    assert ours
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    model(**batch, labels=torch.zeros(len(batch["input_ids"]), dtype=torch.long)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    detach(model)
    # detach removes the hook attach added; transformers 5's gradient_checkpointing_enable adds one of its own
    # (4.x does not), which is the checkpointing's and stays
    assert not ours & set(model.get_input_embeddings()._forward_hooks)
