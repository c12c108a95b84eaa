"""Generation in plain onnxruntime from a decoder export with past key/values (any mode), for
:meth:`qpeft_deploy.runtime.ort_session.OrtAdapterSession.generate`.

The arguments and answers are :meth:`qpeft_deploy.runtime.bank.AdapterBank.generate`'s
(:mod:`qpeft_deploy.runtime.generation`); the tokenizer, generation config and context length come from the
exported folder. Rows are grouped by adapter; each group runs the decode loop of
:mod:`qpeft_deploy.io.onnx_decoder` with its own ``RunOptions`` (its adapter active): the prompts in one run,
then one run per new token, each row's KV cache carried from run to run. Groups run in order of first
appearance and share one seeded generator, and the answers come back in row order.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qpeft_deploy.errors import ConfigError
from qpeft_deploy.io.onnx_decoder import CacheLayout, decode, session_runner
from qpeft_deploy.io.ort import ort_errors, ort_message
from qpeft_deploy.models import load_tokenizer
from qpeft_deploy.runtime.generation import (
    Generation,
    answer,
    check_context,
    check_request,
    generator,
    next_tokens,
    prompt_ids,
    special_ids,
    until,
)

GENERATION_CONFIG = "generation_config.json"


@dataclass
class Decoder:
    """What generating from one exported decoder needs besides the session: its cache layout, tokenizer,
    special ids and context length."""

    folder: Path
    layout: CacheLayout
    tokenizer: object
    pad: int
    eos: set[int]
    context: int | None
    lock: threading.Lock = field(default_factory=threading.Lock)  # fast tokenizers are not thread-safe

    @classmethod
    def of(cls, session, model_path: Path) -> Decoder:
        """The decoder of the export at ``model_path`` (ConfigError when the graph has no past key/values)."""
        layout = CacheLayout.of_inputs({i.name: i.shape for i in session.get_inputs()})
        if layout is None:
            raise ConfigError(
                f"{model_path}: not a decoder with past key/values (export a causal LM with qpeft export onnx)"
            )
        folder = model_path.resolve().parent
        tokenizer = load_tokenizer(str(folder))
        pad, eos = special_ids(_generation_config(folder), tokenizer)
        return cls(folder, layout, tokenizer, pad, eos, _context(folder))


def _generation_config(folder: Path):
    """The folder's generation config (None when it has none)."""
    if not (folder / GENERATION_CONFIG).is_file():
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(folder), local_files_only=True)


def _context(folder: Path) -> int | None:
    """The model's context length from the folder's config.json (None when it names none)."""
    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get(
            "max_position_embeddings"
        )
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def check_prompts(
    decoder: Decoder, prompts: object, max_new_tokens: object, temperature: object, top_p: object
) -> list[list[int]]:
    """Each prompt's token ids, or ConfigError for any bad argument."""
    prompts = check_request(prompts, max_new_tokens, temperature, top_p)
    with decoder.lock:
        ids = [prompt_ids(decoder.tokenizer, p) for p in prompts]
    check_context(ids, max_new_tokens, decoder.context)
    return ids


def generate(
    session,
    decoder: Decoder,
    ids: list[list[int]],
    names: Sequence[str | None],
    options: dict[str | None, object],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
) -> list[Generation]:
    """Each row's answer: row i runs with ``options[names[i]]`` (its ``RunOptions``), rows grouped by name."""
    g = generator(seed)

    def choose(logits: np.ndarray) -> np.ndarray:
        return next_tokens(torch.from_numpy(logits).float(), temperature, top_p, g).numpy()

    new: list[list[int]] = [[] for _ in ids]
    for name in dict.fromkeys(names):
        index = [i for i, n in enumerate(names) if n == name]
        run = session_runner(session, decoder.layout, options[name])
        try:
            rows = decode(
                run,
                decoder.layout,
                [ids[i] for i in index],
                max_new_tokens,
                choose,
                pad=decoder.pad,
                eos=decoder.eos,
            )
        except ort_errors() as e:
            raise ConfigError(f"{decoder.folder}: cannot run the decoder ({ort_message(e)})") from None
        for i, row in zip(index, rows):
            new[i] = until(row, decoder.eos)
    with decoder.lock:
        texts = [decoder.tokenizer.decode(row, skip_special_tokens=True) for row in new]
    return [answer(name, row, text, decoder.eos) for name, row, text in zip(names, new, texts)]
