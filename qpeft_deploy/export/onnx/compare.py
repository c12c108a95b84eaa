"""ONNX Runtime against torch: the probe batches an export is checked on and the comparison report.

Every export runs its model.onnx on a fixed probe batch (:data:`PROBE_TEXTS`, or seeded random pixels for an
image model) and, with a check task, on that task's test examples, and reports the largest difference from
the torch model it was exported from; for classifiers also argmax agreement and both accuracies.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qpeft_deploy.data.images import is_image_task
from qpeft_deploy.data.tasks import load_data, model_inputs
from qpeft_deploy.errors import ConfigError

PROBE_TEXTS = (
    "a gripping, beautifully acted film",
    "What is the capital of France?",
    "dull and far too long; I wanted my money back after the first half hour",
)
CHECK_BATCH = 32
Probe = tuple[dict[str, torch.Tensor], list]  # (model inputs, labels: empty for the probe batch)


def probe_inputs(
    model: nn.Module, tokenizer, texts: tuple[str, ...] = PROBE_TEXTS
) -> dict[str, torch.Tensor]:
    """A padded batch of the model's inputs (from ``tokenizer``, or token ids 1.. when there is none); seeded
    random ``pixel_values`` for an image model."""
    if getattr(model, "main_input_name", None) == "pixel_values":
        config = model.config
        shape = (len(texts), config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=torch.Generator().manual_seed(0))}
    if tokenizer is not None and tokenizer.pad_token is not None:
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        names = [n for n in tokenizer.model_input_names if n in batch]
        return {name: batch[name] for name in names}
    ids = torch.arange(1, 1 + 8 * len(texts)).reshape(len(texts), 8) % model.config.vocab_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def probes(model: nn.Module, tokenizer, check_task: str | None, check_examples: int) -> list[Probe]:
    """Input batches to compare ORT with torch on: the probe batch, then ``check_task``'s test examples."""
    batches: list[Probe] = [(probe_inputs(model, tokenizer), [])]
    if check_task is None:
        return batches
    if is_image_task(check_task) != (tokenizer is None):
        kind = "an image" if tokenizer is None else "a text"
        raise ConfigError(f"--check-task {check_task}: this base is {kind} model; pick one of its tasks")
    test = load_data(check_task, max_train=0, max_test=check_examples).test
    for start in range(0, len(test), CHECK_BATCH):
        chunk = test[start : start + CHECK_BATCH]
        items = tuple(x for x, _ in chunk)
        inputs = model_inputs(None, items) if tokenizer is None else probe_inputs(model, tokenizer, items)
        batches.append((inputs, [label for _, label in chunk]))
    return batches


def reference(model: nn.Module, inputs: dict[str, torch.Tensor], output: str) -> np.ndarray:
    """The torch model's output ``output`` for ``inputs``, as float32."""
    with torch.no_grad():
        return getattr(model(**inputs), output).float().numpy()


def _ort_output(session, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return session.run(None, feeds)[0]


def compare(session, batches: list[Probe], references: list[np.ndarray], classifier: bool) -> dict:
    """max |ORT − torch| over the probe batches; for a classifier also argmax agreement and task accuracy."""
    outputs = [_ort_output(session, inputs) for inputs, _ in batches]
    report = {"max_abs_diff_vs_torch": max(float(np.abs(o - r).max()) for o, r in zip(outputs, references))}
    if not classifier:
        return report
    same = np.concatenate([o.argmax(-1) == r.argmax(-1) for o, r in zip(outputs, references)])
    report["argmax_agreement"] = float(same.mean())
    if len(batches) > 1:  # the probe batch has no labels; the check-task batches follow it
        labels = np.array([label for _, batch in batches[1:] for label in batch])
        report["accuracy"] = {
            name: float((np.concatenate([x.argmax(-1) for x in values[1:]]) == labels).mean())
            for name, values in (("torch", references), ("onnx", outputs))
        }
    return report
