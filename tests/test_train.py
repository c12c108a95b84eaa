"""Training on real MiniLM and real Rotten Tomatoes reviews (small subsets)."""

import os

import pytest
import torch

from qpeft_deploy.core.attach import adapted_layers, adapter_state
from qpeft_deploy.core.quantize import fake_quantize_scaled
from qpeft_deploy.core.threads import free_cores
from qpeft_deploy.data.text import load_task
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.io.model_io import load_adapted_model, save_adapter
from qpeft_deploy.io.qpeft_file import read_adapter
from qpeft_deploy.models import load_tokenizer
from qpeft_deploy.training.train import (
    TrainSpec,
    batches,
    build_model,
    evaluate,
    fit,
    head_aware,
    predict,
    quantization_aware,
    run_spec,
)

SPEC = TrainSpec(task="rt", rank=8, epochs=3, batch_size=16, max_examples=96, max_test=64, max_length=32)


@pytest.fixture(scope="module")
def data():
    return load_task("rt", max_train=SPEC.max_examples, max_test=SPEC.max_test)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def _train(data, tokenizer, adapter: bool):
    model = build_model(SPEC, data.id2label, adapter=adapter)
    result = fit(
        model,
        tokenizer,
        data.train,
        epochs=SPEC.epochs,
        lr=SPEC.lr,
        head_lr=SPEC.head_lr,
        batch_size=SPEC.batch_size,
        max_length=SPEC.max_length,
        quiet=True,
    )
    return model, result


@pytest.fixture(scope="module")
def trained(data, tokenizer):
    return {"adapter": _train(data, tokenizer, True), "head-only": _train(data, tokenizer, False)}


def test_training_moves_lambda_off_zero(trained):
    model, result = trained["adapter"]
    assert result.steps == 3 * 6
    lams = torch.cat([layer.spectrum.lam.detach() for layer in adapted_layers(model).values()])
    assert lams.abs().max() > 1e-3


def test_adapter_ends_with_lower_training_loss_than_head_only(trained, data, tokenizer):
    losses = {
        name: evaluate(model, tokenizer, data.train, max_length=SPEC.max_length)["loss"]
        for name, (model, _) in trained.items()
    }
    assert losses["adapter"] < losses["head-only"], losses


def test_head_only_trains_only_the_head(trained):
    model, _ = trained["head-only"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["classifier.weight", "classifier.bias"]


def test_evaluate_reports_accuracy_and_loss(trained, data, tokenizer):
    model, _ = trained["adapter"]
    metrics = evaluate(model, tokenizer, data.test, max_length=SPEC.max_length)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0 and metrics["examples"] == 64


def test_run_spec_report_counts_parameters():
    spec = TrainSpec(
        task="sms",
        rank=2,
        targets=["query"],
        epochs=1,
        max_examples=16,
        max_test=8,
        max_length=16,
        batch_size=8,
        threads=1,
    )
    before = torch.get_num_threads()
    _, report = run_spec(spec, quiet=True)
    assert report["torch_threads"] == 1 and torch.get_num_threads() == before  # set for the run, restored
    assert 1 <= free_cores() <= (os.cpu_count() or 1)
    # 6 query layers, 384x384: 2 circuits of 42 angles + K=2 lambdas each; head 2x384 + 2.
    assert report["trainable_parameters"] == 6 * (42 + 42 + 2) + 2 * 384 + 2
    assert report["lora_r8_parameters"] == 6 * 8 * (384 + 384)
    assert report["test_examples"] == 8


def test_batches_cover_every_example_once():
    examples = [(str(i), i % 2) for i in range(10)]
    import random

    chunks = batches(examples, 4, random.Random(0))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert sorted(x for c in chunks for x in c) == sorted(examples)


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"batch_size": 0}])
def test_bad_budget_is_refused(data, tokenizer, kwargs):
    model = build_model(SPEC, data.id2label)
    with pytest.raises(ConfigError):
        fit(model, tokenizer, data.train[:4], quiet=True, **kwargs)


def test_no_examples_is_refused(data, tokenizer):
    with pytest.raises(ConfigError, match="no training examples"):
        fit(build_model(SPEC, data.id2label), tokenizer, [], quiet=True)


def test_unknown_task_is_refused():
    with pytest.raises(ConfigError):
        run_spec(TrainSpec(task="imdb"), quiet=True)


@pytest.mark.parametrize(
    "qat,save_bits,lambda_bits,head_bits",
    [
        (True, 4, None, None),
        (True, None, None, None),
        (False, 4, None, None),
        (True, 4, 3, 4),
        (False, 32, 3, 4),
    ],
)
def test_quantisation_aware_training_makes_the_file_reproduce_the_model(
    data, tokenizer, tmp_path, qat, save_bits, lambda_bits, head_bits
):
    """A QAT model saved with 4-bit codes or with fp32 angles (the snapped ones it computes with), and with
    3-bit λ codes and 4-bit head codes when trained on them, reloads to the same logits; without QAT the coded
    file differs."""
    spec = TrainSpec(
        task="rt",
        rank=8,
        epochs=1,
        batch_size=16,
        max_examples=48,
        max_test=32,
        max_length=32,
        bits=4,
        lambda_bits=lambda_bits,
        head_bits=head_bits,
        qat=qat,
    )
    model, _ = run_spec(spec, quiet=True)
    circuits = [c for layer in adapted_layers(model).values() for c in (layer.u, layer.v)]
    assert all(c.angle_bits == (4 if qat else None) for c in circuits)
    texts = [text for text, _ in data.test]
    trained = predict(model, tokenizer, texts, max_length=32)
    path = save_adapter(
        model,
        tmp_path / "a.qpeft",
        bits=save_bits,
        lambda_bits=lambda_bits,
        head_bits=head_bits,
        base="minilm",
    )
    assert read_adapter(path).stored.head_bits == head_bits
    packed = predict(load_adapted_model("minilm", path), tokenizer, texts, max_length=32)
    gap = (trained - packed).abs().max().item()
    assert gap < 1e-4 if qat else gap > 1e-3, gap


def test_head_aware_training_runs_the_head_on_its_row_codes_and_trains_the_latent_weight(data, tokenizer):
    model = build_model(SPEC, data.id2label)
    plain = adapter_state(model)
    head_aware(model, 4)
    coded = adapter_state(model)
    assert coded.keys() == plain.keys()  # the parametrisation keeps the state's names
    weight = coded["classifier.weight"]
    assert torch.equal(weight, fake_quantize_scaled(plain["classifier.weight"], 4))
    assert all(len(row.unique()) <= 15 for row in weight)  # 2·7 + 1 levels per row
    fit(model, tokenizer, data.train[:32], batch_size=16, max_length=32, quiet=True)
    latent = model.classifier.parametrizations.weight.original
    assert not torch.equal(latent, plain["classifier.weight"])  # straight-through gradients reach it
    head_aware(model, None)
    assert torch.equal(model.classifier.weight, latent)  # back to the full-precision weight
    with pytest.raises(ConfigError, match="head bits must be one of"):
        head_aware(model, 9)


def test_quantisation_aware_training_still_trains_the_angles(data, tokenizer):
    model = build_model(SPEC, data.id2label)
    quantization_aware(model, 4)
    before = torch.cat([layer.u.theta.detach().clone() for layer in adapted_layers(model).values()])
    fit(model, tokenizer, data.train[:32], lr=0.05, batch_size=16, max_length=32, quiet=True)
    after = torch.cat([layer.u.theta.detach() for layer in adapted_layers(model).values()])
    assert (after != before).float().mean() > 0.5  # straight-through gradients reach the latent angles


def test_quantisation_aware_training_refuses_taylor_and_bad_bits(data):
    taylor = build_model(TrainSpec(task="rt", rank=2, variant="taylor"), data.id2label)
    with pytest.raises(ConfigError, match="Taylor"):
        quantization_aware(taylor, 4)
    with pytest.raises(ConfigError, match="angle bits"):
        quantization_aware(build_model(SPEC, data.id2label), 9)


def test_fit_gives_the_head_and_other_trainables_their_own_rates(data, tokenizer):
    peft = pytest.importorskip("peft")
    from qpeft_deploy.models import load_task_model

    model = peft.get_peft_model(
        load_task_model("minilm", data.id2label),
        peft.LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"),
    )
    named = dict(model.named_parameters())
    head = next(n for n in named if n.endswith("modules_to_save.default.weight"))
    lora = next(n for n in named if "lora_A" in n)
    before = {n: named[n].detach().clone() for n in (head, lora)}
    fit(
        model, tokenizer, data.train[:16], head_lr=1e-2, body_lr=0.0, batch_size=16, max_length=16, quiet=True
    )
    assert not torch.equal(named[head], before[head])  # the (modules_to_save) head trains at head_lr
    assert torch.equal(named[lora], before[lora])  # LoRA's A, B at body_lr = 0


def test_switching_quantisation_aware_training_rebuilds_cached_factors(data):
    model = build_model(SPEC, data.id2label)
    layer = next(layer for layer in adapted_layers(model).values() if layer.mode == "dense")
    with torch.no_grad():
        layer.spectrum.lam.normal_(generator=torch.Generator().manual_seed(0))
        full = layer.delta_weight()  # fills the dense U, V cache
        quantization_aware(model, 2)
        snapped = layer.delta_weight()
        quantization_aware(model, None)
        assert not torch.allclose(full, snapped) and torch.equal(layer.delta_weight(), full)
