"""Any shipped task, text or image: its data (:func:`load_data`) and a batch's model inputs (:func:`model_inputs`).

Text tasks come from :mod:`qpeft_deploy.data.text` (examples ``(text, label)``, inputs from the base's
tokenizer), image tasks from :mod:`qpeft_deploy.data.images` (examples ``(28×28 uint8 image, label)``, inputs
``pixel_values``; ``tokenizer`` is None). Used by training, evaluation and the exporter's accuracy check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qpeft_deploy.data.images import image_inputs, is_image_task, load_image_task
from qpeft_deploy.data.text import TaskData, load_task
from qpeft_deploy.models import tokenize


def load_data(
    task: str, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> TaskData:
    """A task's data: :func:`qpeft_deploy.data.text.load_task`, or :func:`qpeft_deploy.data.images.load_image_task`."""
    if is_image_task(task):
        return load_image_task(task, max_train=max_train, max_test=max_test, seed=seed)
    return load_task(task, max_train=max_train, max_test=max_test, seed=seed)


def model_inputs(tokenizer, items: Sequence, max_length: int = 128) -> dict[str, torch.Tensor]:
    """The model's inputs: a token batch of texts, or ``pixel_values`` of images (``tokenizer`` None)."""
    if tokenizer is None:
        return image_inputs(items)
    return tokenize(tokenizer, list(items), max_length=max_length)
