"""Instruction tasks for causal language models: ``(prompt, response)`` pairs with fixed, seeded splits.

Tasks:

- ``rt``, ``trec6``, ``sms``: the instruction versions of the text tasks of :mod:`qpeft_deploy.data.text`, on
  the same examples and the same train/test split. The prompt asks the task's question (``QUESTIONS``) about
  the text, the response is the label as one lower-case word (``ANSWERS``): rt ``negative`` / ``positive``,
  trec6 ``abbreviation`` / ``description`` / ``entity`` / ``human`` / ``location`` / ``number``, sms ``ham`` /
  ``spam``. A text longer than ``MAX_WORDS`` words is cut there (with ``...``) so prompts fit short contexts.
- ``jsonl:<path>``: one JSON object per line with string fields ``prompt`` and ``response`` (other fields are
  ignored; blank lines are skipped).
- ``csv:<path>``: a UTF-8 CSV with a header row and columns ``prompt`` and ``response`` (a ``text,label`` CSV
  is a classification task, :mod:`qpeft_deploy.data.text`).

A user file is validated whole before use: a missing field, an empty prompt or response, a line that is not a
JSON object names the file and the line in a one-line ConfigError. Prompts are stripped and deduplicated (the
first response wins), then split exactly as the text tasks are (:func:`qpeft_deploy.data.text.split`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qpeft_deploy.data.text import TASKS, dedupe_sorted, load_task, read_csv, split, task_file
from qpeft_deploy.errors import ConfigError

INSTRUCTION_FILES = ("jsonl", "csv")
MAX_WORDS = 32
QUESTIONS = {
    "rt": "Is this movie review positive or negative? Answer with one word.\nReview: {text}",
    "trec6": (
        "Does this question ask for an abbreviation, a description, an entity, a human, a location or a "
        "number? Answer with one word.\nQuestion: {text}"
    ),
    "sms": "Is this text message spam or ham? Answer with one word.\nMessage: {text}",
}
ANSWERS = {  # in the label-id order of data/text.py
    "rt": ("negative", "positive"),  # rotten, fresh
    "trec6": ("abbreviation", "description", "entity", "human", "location", "number"),
    "sms": ("ham", "spam"),
}

Pair = tuple[str, str]  # (prompt, response)


@dataclass(frozen=True)
class InstructionData:
    """A causal-LM task: its ``(prompt, response)`` train/test pairs and, for a shipped task, the answer words."""

    name: str
    train: list[Pair]
    test: list[Pair]
    answers: tuple[str, ...] | None = None


def is_instruction_task(task: str) -> bool:
    """Whether ``task`` names an instruction task (a shipped task's name or ``jsonl:`` / ``csv:`` with a path)."""
    return task in TASKS or task.partition(":")[0] in INSTRUCTION_FILES


def clip_words(text: str, max_words: int = MAX_WORDS) -> str:
    """``text`` cut to its first ``max_words`` words (then ``...``); shorter texts unchanged."""
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


def instruction(task: str, text: str) -> str:
    """The prompt of a shipped task for one text: the task's question about the (clipped) text."""
    return QUESTIONS[task].format(text=clip_words(text))


def _jsonl_pairs(path: Path) -> list[Pair]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read jsonl: {e}") from None
    pairs = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"{path}: line {lineno} is not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}: line {lineno} is not a JSON object with prompt and response")
        missing = [name for name in ("prompt", "response") if name not in row]
        if missing:
            raise ConfigError(f"{path}: line {lineno} has no {' or '.join(missing)} field")
        pairs.append(_pair(path, f"line {lineno}", row["prompt"], row["response"]))
    if not pairs:
        raise ConfigError(f"{path}: jsonl has no prompt,response lines")
    return pairs


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _pair(path: Path, where: str, prompt: object, response: object) -> Pair:
    """A validated (prompt, response): two non-empty strings."""
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {where}: {name} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ConfigError(f"{path}: {where} has an empty {name}")
    return prompt, response.strip()


def _file_pairs(task: str) -> list[Pair]:
    kind, _, spec = task.partition(":")
    path = task_file(spec, kind)
    if kind == "jsonl":
        return _jsonl_pairs(path)
    rows = read_csv(path, ("prompt", "response"))
    return [_pair(path, f"row {lineno}", prompt, response) for lineno, (prompt, response) in rows]


def load_instructions(
    task: str, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> InstructionData:
    """An instruction task's fixed, seeded train/test split (see the module docstring), optionally truncated."""
    if task in TASKS:
        data = load_task(task, max_train=max_train, max_test=max_test, seed=seed)
        words = ANSWERS[task]

        def pairs(examples: list[tuple[str, int]]) -> list[Pair]:
            return [(instruction(task, text), words[label]) for text, label in examples]

        return InstructionData(task, pairs(data.train), pairs(data.test), words)
    if not is_instruction_task(task):
        raise ConfigError(
            f"unknown instruction task {task!r}: expected one of {', '.join(TASKS)}, jsonl:<path> or "
            "csv:<path> with prompt,response columns"
        )
    train, test = split(task, dedupe_sorted(_file_pairs(task)), max_train, max_test, seed)
    return InstructionData(task, train, test)
