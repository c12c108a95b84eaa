"""qpeft_deploy.training.causal: causal-LM fine-tuning and evaluation on the real SmolLM2-135M-Instruct.

Kept cheap on one thread: short toy prompts (about 40 tokens with the chat template), batches of 2-4, a few
steps; the training tests adapt the top layers only, so the backward pass stops there.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from qpeft_deploy.core.adapter import CAUSAL_LM
from qpeft_deploy.core.attach import (
    adapted_layers,
    attach,
    detach,
    lora_parameter_count,
    trainable_parameters,
)
from qpeft_deploy.data.instructions import load_instructions
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.io.model_io import adapter_from_model, load_adapted_model
from qpeft_deploy.io.qpeft_file import read_adapter, write_adapter
from qpeft_deploy.models import load_causal_lm
from qpeft_deploy.peft_native import QpeftConfig
from qpeft_deploy.training.causal import (
    IGNORE,
    answer_batch,
    answer_token_loss,
    causal_tokenizer,
    check_context,
    encode,
    evaluate_causal,
    fit_causal,
    generate_answers,
    heldout_loss,
    normalise,
    pad_id,
    run_causal_spec,
)
from qpeft_deploy.training.train import TrainSpec, run_spec
from tests.helpers import make_adapter

TOP = r"model\.layers\.2[4-9]\..*"  # the top six decoder layers: training stops its backward pass there
WORDS = ("apple", "river", "candle", "violin", "pepper", "marble", "tiger", "lantern", "copper", "meadow", "rocket",
         "basil", "harbor", "pillow", "cactus")  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return causal_tokenizer("smollm2")


@pytest.fixture(scope="module")
def lm():
    return load_causal_lm("smollm2")


@pytest.fixture
def style(tmp_path) -> str:
    """A toy style task: say the word, pirate-style (12 train, 3 test pairs)."""
    path = tmp_path / "style.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Say {w}.", "response": f"{w.title()}, arr!"}) + "\n" for w in WORDS)
    )
    return f"jsonl:{path}"


def test_all_linear_adapts_210_layers_but_not_the_tied_lm_head(lm):
    attach(lm, "all-linear", rank=8)
    try:
        layers = adapted_layers(lm)
        assert len(layers) == 210 and not any("lm_head" in key or "embed" in key for key in layers)
        assert lm.lm_head.weight is lm.model.embed_tokens.weight  # still tied, still frozen
        assert trainable_parameters(lm) == 20_040 and lora_parameter_count(lm, 8) == 2_442_240
        adapter_ids = {id(p) for layer in layers.values() for p in layer.parameters()}
        assert all(id(p) in adapter_ids for p in lm.parameters() if p.requires_grad)
    finally:
        detach(lm)


def test_loss_covers_the_answer_tokens_only(tokenizer):
    pairs = [
        ("Is this review positive or negative?\nReview: Great fun.", "positive"),
        ("Say hi.", "Hi, arr!"),
    ]
    batch = answer_batch(tokenizer, pairs, max_length=64)
    user = [{"role": "user", "content": pairs[1][0]}]
    prompt_ids = tokenizer.apply_chat_template(user, add_generation_prompt=True, return_dict=False)
    assert encode(tokenizer, pairs[1][0]) == (prompt_ids, [])
    assert (
        tokenizer.pad_token is None and pad_id(tokenizer) == tokenizer.eos_token_id
    )  # SmolLM2 pads with eos
    for row, (prompt, response) in enumerate(pairs):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        answer = labels[labels != IGNORE]
        assert tokenizer.decode(answer) == f"{response}<|im_end|>\n"  # the answer and the end of the turn
        assert torch.equal(ids[-len(answer) :], answer)  # left padded: answers end in the last column
        n = sum(len(ids) for ids in encode(tokenizer, prompt, response))
        assert int(batch["attention_mask"][row].sum()) == n
        padding = batch["attention_mask"][row] == 0
        assert (ids[padding] == pad_id(tokenizer)).all() and (labels[padding] == IGNORE).all()
        assert batch["position_ids"][row][~padding].tolist() == list(range(n))


def test_a_prompt_longer_than_the_context_is_refused_in_one_line(tokenizer, lm):
    pairs = [("Say hi.", "Hi."), ("Say " + "hi " * 40, "Hi.")]
    with pytest.raises(
        ConfigError,
        match=r"^example 1 \('Say hi hi hi.*\.\.\.\): the prompt and answer take \d+ tokens, more than max_length 48",
    ):
        answer_batch(tokenizer, pairs, max_length=48)
    with pytest.raises(
        ConfigError, match=r"^example 1 .*: the prompt takes \d+ tokens, more than max_length 48"
    ):
        generate_answers(lm, tokenizer, [p for p, _ in pairs], max_length=48)
    with pytest.raises(ConfigError, match="model's context 8192"):
        check_context(lm, 10_000)


def test_eight_steps_lower_the_heldout_answer_loss(lm, tokenizer, style):
    data = load_instructions(style)
    attach(lm, TOP, rank=8, seed=0)
    try:
        base = lm.model.layers[29].mlp.down_proj.base.weight.clone()
        before = heldout_loss(lm, tokenizer, data.test, max_length=64)
        result = fit_causal(
            lm, tokenizer, data.train, epochs=2, lr=0.1, batch_size=3, max_length=64, quiet=True
        )
        after = heldout_loss(lm, tokenizer, data.test, max_length=64)
        assert result.steps == 8 and after < 0.7 * before, (before, after, result.losses)
        assert torch.equal(lm.model.layers[29].mlp.down_proj.base.weight, base)  # the base stays frozen
    finally:
        detach(lm)


def test_batched_greedy_answers_equal_one_by_one_and_exact_match_normalises(lm, tokenizer):
    prompts = ["What is the capital of France?", "Reply with one word: is fire hot or cold?"]
    batched = generate_answers(lm, tokenizer, prompts, max_new_tokens=8)
    assert batched == [generate_answers(lm, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert "Paris" in batched[0]
    assert normalise("  The capital\n is PARIS. ") == "the capital is paris"
    pairs = [(prompts[0], f" {batched[0].upper()}!"), (prompts[1], "lukewarm")]
    metrics = evaluate_causal(lm, tokenizer, pairs, max_new_tokens=8)
    assert metrics["exact_match"] == 0.5 and metrics["examples"] == 2 and metrics["loss"] > 0


def test_a_quantisation_aware_adapter_file_reproduces_the_trained_model(tokenizer, style, tmp_path):
    spec = TrainSpec(
        base="smollm2", task=style, targets=TOP, rank=4, bits=4, lambda_bits=4, lr=5e-2, epochs=1,
        batch_size=4, max_examples=8, max_length=64, threads=1,
    )  # fmt: skip
    model, report = run_causal_spec(spec, evaluate_test=False, quiet=True)
    assert report["task_type"] == CAUSAL_LM and report["trainable_parameters"] == trainable_parameters(model)
    assert adapted_layers(model)[next(iter(adapted_layers(model)))].u.angle_bits == 4  # trained on the grid
    path = write_adapter(tmp_path / "a.qpeft", adapter_from_model(model, "smollm2"), bits=4, lambda_bits=4)
    stored = read_adapter(path)
    assert stored.config.is_causal_lm() and stored.config.head is None and stored.stored.bits == 4
    reloaded = load_adapted_model("smollm2", path)
    batch = answer_batch(tokenizer, load_instructions(style).test, max_length=64)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, model.eval()(**inputs).logits, atol=1e-4)


def test_classification_setups_on_a_causal_base_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="smollm2: a causal language model"):
        run_spec(TrainSpec(base="smollm2", task="rt"))
    with pytest.raises(ConfigError, match="minilm: not a causal language model"):
        causal_tokenizer("minilm")
    classifier = make_adapter(tmp_path / "cls.qpeft", {0: "a", 1: "b"}, seed=0)
    with pytest.raises(ConfigError, match=r"cls\.qpeft: a classification adapter"):
        load_adapted_model("smollm2", classifier)


def test_the_peft_native_method_trains_and_round_trips_on_smollm2(lm, tokenizer, style, tmp_path):
    config = QpeftConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear")
    model = get_peft_model(lm, config)
    try:
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("qpeft" in name for name in trainable)
        assert not any("lm_head" in name for name in trainable)
        batch = answer_batch(tokenizer, load_instructions(style).train[:2], max_length=64)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        losses = []
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        for step in range(3):
            loss = answer_token_loss(model, batch)
            if (
                step == 0
            ):  # the labels follow HF's convention, so a transformers Trainer computes the same loss
                assert abs(model(**inputs, labels=batch["labels"]).loss.item() - loss.item()) < 1e-5
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], losses
        model.save_pretrained(tmp_path / "peft")
        with torch.no_grad():
            trained = model.eval()(**inputs).logits
    finally:
        base = model.unload()
    reloaded = PeftModel.from_pretrained(base, tmp_path / "peft")
    try:
        with torch.no_grad():
            assert (reloaded(**inputs).logits - trained).abs().max() < 1e-5
    finally:
        reloaded.unload()
