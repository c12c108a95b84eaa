"""What both runtimes' ``generate`` share: the request checks, prompt tokens, special ids, the next-token rule
and the answer of each row.

:class:`qpeft_deploy.runtime.bank.AdapterBank` (torch) and :mod:`qpeft_deploy.runtime.ort_generate`
(onnxruntime) take the same arguments and return the same :class:`Generation` rows: a prompt is one user turn
of the chat template (or the raw text's tokens without a template), greedy at temperature 0, else a sample at
``temperature`` from the nucleus ``top_p``, from a torch generator seeded by ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qpeft_deploy.errors import ConfigError


@dataclass
class Generation:
    """One row's generated answer: the adapter used (None: the base), the new tokens (up to and including the
    end-of-sequence token), their text, and why it stopped ("stop": end of sequence, "length": the limit)."""

    adapter: str | None
    text: str
    tokens: list[int]
    finish_reason: str


def check_request(prompts: object, max_new_tokens: object, temperature: object, top_p: object) -> list[str]:
    """The prompts as a list, or ConfigError for any bad argument of a ``generate`` call."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a string or a non-empty list of strings")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature >= 0:
        raise ConfigError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be a number in (0, 1], got {top_p!r}")
    return list(prompts)


def check_context(ids: Sequence[Sequence[int]], max_new_tokens: int, context: int | None) -> None:
    """Refuse an empty prompt, or one whose answer would pass the model's context of ``context`` tokens."""
    for i, row in enumerate(ids):
        if not row:
            raise ConfigError(f"prompt {i} is empty")
        if context is not None and len(row) + max_new_tokens > context:
            raise ConfigError(
                f"prompt {i} has {len(row)} tokens: with max_new_tokens={max_new_tokens} it passes the "
                f"model's context of {context} tokens"
            )


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids: one user turn of the chat template, ready for the answer (or the raw text's
    tokens for a tokenizer without a template)."""
    try:
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return list(
                tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            )
        return list(tokenizer(prompt)["input_ids"])
    except (TypeError, ValueError) as e:  # e.g. a lone surrogate
        raise ConfigError(f"cannot tokenize the prompt: {' '.join(str(e).split())[:200]}") from None


def special_ids(generation_config, tokenizer) -> tuple[int, set[int]]:
    """(padding id, end-of-sequence ids): the generation config's, else the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    pad = getattr(generation_config, "pad_token_id", None)
    pad = tokenizer.pad_token_id if pad is None else pad
    return (pad if pad is not None else min(eos, default=0)), eos


def generator(seed: int | None) -> torch.Generator:
    """A torch generator seeded by ``seed`` (None: a fresh random seed)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, g: torch.Generator) -> torch.Tensor:
    """Each row's next token: the argmax (temperature 0), else a sample from the softmax at ``temperature``
    restricted to the smallest set of tokens whose probability reaches ``top_p``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # tokens after the nucleus is full
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=g).squeeze(-1)


def until(row: list[int], eos: set[int]) -> list[int]:
    """A row's tokens up to and including its first end-of-sequence token."""
    end = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
    return row[: end + 1]


def answer(adapter: str | None, tokens: list[int], text: str, eos: set[int]) -> Generation:
    """The :class:`Generation` of one row (``tokens`` already cut at the end of sequence)."""
    return Generation(adapter, text, tokens, "stop" if tokens and tokens[-1] in eos else "length")
