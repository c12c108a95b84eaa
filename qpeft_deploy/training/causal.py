"""Fine-tune and evaluate an adapter on a causal language model (SmolLM2) with instruction tasks.

An example ``(prompt, response)`` (:mod:`qpeft_deploy.data.instructions`) becomes one token sequence through
the base's chat template: the prompt part is the template of the user turn with ``add_generation_prompt`` (what
generation starts from), the answer part is what the full conversation adds after it (SmolLM2:
``positive<|im_end|>\\n``, so the model also learns to end its turn). A tokenizer without a chat template
gets ``prompt + "\\n"`` and ``response`` followed by its eos token. The loss is the cross-entropy of the answer
tokens only: prompt and padding positions are labelled ``IGNORE`` (-100).

Batches are padded on the left (position ids count real tokens only), for training as for generation, with
the tokenizer's pad token or, when it has none (SmolLM2 converted from GGUF), its eos token; padded positions
are masked, so the choice changes nothing. A sequence longer than ``max_length`` (or a ``max_length`` beyond
the model's context) is refused with a one-line error rather than truncated: cutting the prompt could cut its
question, cutting the answer its label. Every example is encoded and checked before training starts.

The training loop is :func:`qpeft_deploy.training.train.fit` with the answer-token loss; quantisation-aware
training (``bits``, ``lambda_bits``) and λ pruning work as for classification. Evaluation reports the
exact-match accuracy of greedy answers (compared after :func:`normalise`) and the held-out answer-token loss.
"""

from __future__ import annotations

import inspect
import string
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from qpeft_deploy.core.adapter import CAUSAL_LM
from qpeft_deploy.core.attach import lora_parameter_count
from qpeft_deploy.core.threads import free_cores, torch_threads
from qpeft_deploy.data.instructions import Pair, load_instructions
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.io.model_io import load_adapted_model
from qpeft_deploy.models import is_causal_base, load_causal_lm, load_tokenizer
from qpeft_deploy.training.train import (
    TrainSpec,
    attach_spec,
    fit,
    run_report,
    save_trained,
    train_on_grids,
)

IGNORE = -100  # the label of a position without loss (PyTorch's cross-entropy ignore_index)


def causal_tokenizer(base: str):
    """The tokenizer of a causal-LM base (refused for any other base: its tasks are classification tasks)."""
    if not is_causal_base(base):
        raise ConfigError(
            f"{base}: not a causal language model (its config.json architectures name no causal-LM class); "
            "train it on a classification task"
        )
    return load_tokenizer(base)


def pad_id(tokenizer) -> int:
    """The id padding uses: the pad token's, else the eos token's (masked either way)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ConfigError(
        f"{type(tokenizer).__name__}: the tokenizer has neither a pad nor an eos token to pad with"
    )


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(tokenizer, prompt: str, response: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one example as the module docstring says (answer ids empty without a
    response): the prompt ids are exactly what generation starts from."""
    if tokenizer.chat_template is None:
        prompt_ids = tokenizer(prompt + "\n")["input_ids"]
        if response is None:
            return prompt_ids, []
        return prompt_ids, _ids(tokenizer, response) + [eos_id(tokenizer)]
    user = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    if response is None:
        return _ids(tokenizer, prompt_text), []
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt_text):
        raise ConfigError(
            "the tokenizer's chat template does not continue the generation prompt with the answer"
        )
    return _ids(tokenizer, prompt_text), _ids(tokenizer, full[len(prompt_text) :])


def eos_id(tokenizer) -> int:
    """The eos token's id (the end of an answer without a chat template)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{type(tokenizer).__name__}: the tokenizer has no eos token to end answers with")
    return tokenizer.eos_token_id


def check_context(model: nn.Module, max_length: int) -> None:
    """Refuse a ``max_length`` below 2 or beyond the model's context (``max_position_embeddings``)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_length < 2 or (isinstance(context, int) and max_length > context):
        raise ConfigError(f"max_length must be between 2 and the model's context {context}, got {max_length}")


Encoded = tuple[list[int], list[int]]  # (prompt ids, answer ids) of one example


def encode_all(
    tokenizer, pairs: Sequence[Pair] | Sequence[str], max_length: int, quiet: bool = True
) -> list[Encoded]:
    """Every example encoded (``pairs``; prompts alone for generation), checked whole before any work starts:
    an example longer than ``max_length`` is a one-line ConfigError naming it."""
    encoded = []
    for i, example in enumerate(tqdm(pairs, desc="tokenize", disable=quiet, unit="example")):
        prompt, response = (example, None) if isinstance(example, str) else example
        prompt_ids, answer_ids = encode(tokenizer, prompt, response)
        if len(prompt_ids) + len(answer_ids) > max_length:
            what = "the prompt takes" if response is None else "the prompt and answer take"
            raise ConfigError(
                f"example {i} ({' '.join(prompt.split())[:40]!r}...): {what} "
                f"{len(prompt_ids) + len(answer_ids)} tokens, more than max_length {max_length} "
                "(raise --max-length or shorten the prompt; prompts are never truncated)"
            )
        encoded.append((prompt_ids, answer_ids))
    return encoded


def _left_padded(rows: Sequence[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` of token rows padded on the left (positions count
    real tokens only, as generation counts them)."""
    width = max(len(ids) for ids in rows)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows])
    return {
        "input_ids": torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows]),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }


def collate(encoded: Sequence[Encoded], pad: int) -> dict[str, torch.Tensor]:
    """The model inputs of a left-padded batch of encoded examples and its ``labels`` (the answer tokens,
    ``IGNORE`` elsewhere). Left padding ends every answer in the last column, so the answer positions of a
    batch are few and the loss computes logits there only."""
    batch = _left_padded([prompt + answer for prompt, answer in encoded], pad)
    width = batch["input_ids"].shape[1]
    batch["labels"] = torch.tensor([[IGNORE] * (width - len(answer)) + answer for _, answer in encoded])
    return batch


def answer_batch(tokenizer, pairs: Sequence[Pair], max_length: int) -> dict[str, torch.Tensor]:
    """:func:`collate` of :func:`encode_all`: one batch of ``(prompt, response)`` pairs."""
    return collate(encode_all(tokenizer, pairs, max_length), pad_id(tokenizer))


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (HF causal LMs: the lm_head then runs on those
    positions only, which saves most of its vocabulary-wide matmul)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def answer_token_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of the answer tokens of a :func:`collate` batch (position t predicts token t + 1)."""
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE).any(0).nonzero().flatten()  # positions that predict an answer token
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if _keeps_logits(model):
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, keep]
    return nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=IGNORE, reduction=reduction
    )


def _step_loss(pad: int, model: nn.Module, encoded: Sequence[Encoded]) -> torch.Tensor:
    return answer_token_loss(model, collate(encoded, pad))


def fit_causal(
    model: nn.Module,
    tokenizer,
    train: Sequence[Pair],
    *,
    epochs: int = 1,
    lr: float = 2e-2,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    prune_to: int | None = None,
    quiet: bool = False,
):
    """Train the adapter of a causal LM on ``(prompt, response)`` pairs (AdamW over the adapter's parameters,
    loss on the answer tokens): :func:`qpeft_deploy.training.train.fit` over the examples encoded once."""
    check_context(model, max_length)
    return fit(
        model,
        None,
        encode_all(tokenizer, train, max_length, quiet=quiet),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        prune_to=prune_to,
        quiet=quiet,
        batch_loss=partial(_step_loss, pad_id(tokenizer)),
    )


@torch.no_grad()
def heldout_loss(
    model: nn.Module, tokenizer, pairs: Sequence[Pair], *, batch_size: int = 8, max_length: int = 128
) -> float:
    """Mean cross-entropy over every answer token of ``pairs`` (each token weighs the same)."""
    model.eval()
    encoded, pad = encode_all(tokenizer, pairs, max_length), pad_id(tokenizer)
    total = sum(
        answer_token_loss(model, collate(encoded[i : i + batch_size], pad), reduction="sum").item()
        for i in range(0, len(encoded), batch_size)
    )
    return total / max(sum(len(answer) for _, answer in encoded), 1)


def _stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """Token ids that end an answer: the model's generation eos id(s) and the tokenizer's eos id."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if isinstance(i, int)})


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    max_length: int = 128,
    quiet: bool = True,
) -> list[str]:
    """The model's greedy answers to ``prompts`` (left-padded batches, at most ``max_new_tokens`` each, ended
    by an eos token), decoded without special tokens."""
    model.eval()
    encoded = encode_all(tokenizer, list(prompts), max_length)
    pad, stops, answers = pad_id(tokenizer), _stop_ids(model, tokenizer), []
    for start in tqdm(range(0, len(encoded), batch_size), desc="generate", disable=quiet, unit="batch"):
        inputs = _left_padded([ids for ids, _ in encoded[start : start + batch_size]], pad)
        del inputs["position_ids"]  # generate() derives them from the mask, step by step
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=stops
        )
        answers += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def normalise(answer: str) -> str:
    """An answer as exact-match compares it: lower case, whitespace collapsed, outer punctuation stripped."""
    return " ".join(answer.lower().split()).strip(string.punctuation + " ")


def evaluate_causal(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[Pair],
    *,
    batch_size: int = 8,
    max_length: int = 128,
    max_new_tokens: int | None = None,
    quiet: bool = True,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers and held-out answer-token loss on ``pairs``; ``max_new_tokens``
    defaults to the longest reference answer's token count plus 2 (room for an end token and a full stop)."""
    if not pairs:
        raise ConfigError("no evaluation examples")
    check_context(model, max_length)
    if max_new_tokens is None:
        max_new_tokens = max(len(_ids(tokenizer, response)) for _, response in pairs) + 2
    answers = generate_answers(
        model,
        tokenizer,
        [prompt for prompt, _ in pairs],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_length=max_length,
        quiet=quiet,
    )
    hits = sum(normalise(a) == normalise(r) for a, (_, r) in zip(answers, pairs, strict=True))
    return {
        "exact_match": hits / len(pairs),
        "loss": heldout_loss(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length),
        "examples": len(pairs),
    }


def build_causal_model(spec: TrainSpec) -> nn.Module:
    """The base's causal LM with an adapter attached as ``spec`` says (``all-linear``: every linear layer but
    ``lm_head``; its file records task_type CAUSAL_LM), on the quantisation grids ``spec`` asks for."""
    model = attach_spec(load_causal_lm(spec.base), spec)
    train_on_grids(model, spec)
    return model


def run_causal_spec(
    spec: TrainSpec, evaluate_test: bool = True, quiet: bool = False
) -> tuple[nn.Module, dict]:
    """Train a causal-LM adapter as ``spec`` says (its ``head_lr`` is unused); returns the model and a report."""
    tokenizer = causal_tokenizer(spec.base)
    data = load_instructions(spec.task, max_train=spec.max_examples, max_test=spec.max_test, seed=spec.seed)
    model = build_causal_model(spec)
    threads = spec.threads or free_cores()
    with torch_threads(threads):
        result = fit_causal(
            model,
            tokenizer,
            data.train,
            epochs=spec.epochs,
            lr=spec.lr,
            batch_size=spec.batch_size,
            max_length=spec.max_length,
            seed=spec.seed,
            prune_to=spec.prune_to,
            quiet=quiet,
        )
    report = {"method": "qpeft", "task_type": CAUSAL_LM} | run_report(
        spec, model, result, len(data.train), threads
    )
    report["lora_r8_parameters"] = lora_parameter_count(model, 8)
    if evaluate_test:
        with torch_threads(threads):
            metrics = evaluate_causal(model, tokenizer, data.test, max_length=spec.max_length, quiet=quiet)
        report.update(
            test_exact_match=metrics["exact_match"],
            test_loss=metrics["loss"],
            test_examples=metrics["examples"],
        )
    return model, report


def train_causal_adapter(
    spec: TrainSpec, output: str | Path, evaluate: bool = True, quiet: bool = False, overwrite: bool = False
) -> dict:
    """Train a causal-LM adapter as ``spec`` says and save it to ``output`` (task_type CAUSAL_LM, no head; an
    existing file is replaced only with ``overwrite``, checked before training); returns the report."""
    return save_trained(
        spec, output, lambda: run_causal_spec(spec, evaluate_test=evaluate, quiet=quiet), overwrite
    )


def evaluate_causal_adapter(
    base: str,
    adapter: str | Path,
    task: str,
    *,
    max_examples: int | None = None,
    max_length: int = 128,
    max_new_tokens: int | None = None,
    force: bool = False,
    quiet: bool = False,
) -> dict:
    """Exact-match accuracy of greedy answers and held-out answer loss of an adapter on a task's test split."""
    tokenizer = causal_tokenizer(base)
    data = load_instructions(task, max_test=max_examples)
    model = load_adapted_model(base, adapter, force=force)  # refuses a classification adapter
    metrics = evaluate_causal(
        model, tokenizer, data.test, max_length=max_length, max_new_tokens=max_new_tokens, quiet=quiet
    )
    return {
        "adapter": str(adapter),
        "task": task,
        "task_type": CAUSAL_LM,
        "test_exact_match": metrics["exact_match"],
        "test_loss": metrics["loss"],
        "test_examples": metrics["examples"],
    }
