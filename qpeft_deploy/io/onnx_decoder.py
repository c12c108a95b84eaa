"""What a decoder export and its runners share: the I/O of a causal LM graph with past key/values, and the
KV-cache decode loop.

The names and layout are optimum's and ONNX Runtime GenAI's, so one graph prefills (past length 0) and decodes:
inputs ``input_ids`` and ``position_ids`` (batch × sequence), ``attention_mask`` (batch × total sequence: past
and new tokens), ``past_key_values.{i}.key`` / ``.value`` (batch × kv_heads × past × head_dim); outputs
``logits`` (batch × sequence × vocab) and ``present.{i}.key`` / ``.value`` (batch × kv_heads × total ×
head_dim). :func:`decode` runs any such graph (an onnxruntime session, or the torch wrapper it was exported
from) on left-padded prompts: the prompts in one run, then one run per new token for the whole batch, each
row's cache carried from run to run.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"
BATCH, SEQUENCE, PAST, TOTAL = (
    "batch_size",
    "sequence_length",
    "past_sequence_length",
    "total_sequence_length",
)

Runner = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]  # feeds -> [logits, present...]
Chooser = Callable[[np.ndarray], np.ndarray]  # last-position logits (rows × vocab) -> next token per row


def past_names(layers: int) -> list[str]:
    """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for every layer, in order."""
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """``present.{i}.key``, ``present.{i}.value`` for every layer, in order."""
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def dynamic_axes(layers: int) -> dict[str, dict[int, str]]:
    """The symbolic axes of every input and output (what ``torch.onnx.export`` takes as ``dynamic_axes``)."""
    cache = {0: BATCH, 2: PAST}
    present = {0: BATCH, 2: TOTAL}
    return (
        {"input_ids": {0: BATCH, 1: SEQUENCE}, "attention_mask": {0: BATCH, 1: TOTAL}}
        | {"position_ids": {0: BATCH, 1: SEQUENCE}, LOGITS: {0: BATCH, 1: SEQUENCE}}
        | {name: cache for name in past_names(layers)}
        | {name: present for name in present_names(layers)}
    )


@dataclass(frozen=True)
class CacheLayout:
    """The shape of a decoder's KV cache: layers, key/value heads and head size."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of_inputs(cls, inputs: dict[str, Sequence]) -> CacheLayout | None:
        """The layout a graph's inputs (name -> shape) declare; None when they are not a decoder's."""
        keys = [name for name in inputs if name.startswith("past_key_values.") and name.endswith(".key")]
        if not keys or any(name not in inputs for name in (*INPUTS, *past_names(len(keys)))):
            return None
        shape = inputs[past_names(1)[0]]
        if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            return None
        return cls(len(keys), shape[1], shape[3])

    def empty(self, rows: int) -> dict[str, np.ndarray]:
        """An empty cache (past length 0) for ``rows`` sequences."""
        shape = (rows, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, np.float32) for name in past_names(self.layers)}

    def outputs(self) -> list[str]:
        """The graph outputs a run asks for, in order: logits, then every present key and value."""
        return [LOGITS, *present_names(self.layers)]


def session_runner(session, layout: CacheLayout, options=None) -> Runner:
    """A :data:`Runner` over an onnxruntime session (each run with ``options``, its ``RunOptions``)."""
    outputs = layout.outputs()
    return lambda feeds: session.run(outputs, feeds, options)


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, attention mask) of ``rows`` left-padded with ``pad`` to the longest row (int64)."""
    width = max(map(len, rows))
    ids = np.array([[pad] * (width - len(row)) + list(row) for row in rows], np.int64)
    mask = np.array([[0] * (width - len(row)) + [1] * len(row) for row in rows], np.int64)
    return ids, mask


def prefill_feeds(layout: CacheLayout, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The feeds of a first run: left-padded ``ids``, their mask, positions counted from each row's first
    token, and an empty cache."""
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions} | layout.empty(len(ids))


def next_feeds(
    layout: CacheLayout, feeds: dict[str, np.ndarray], outputs: Sequence[np.ndarray], tokens: np.ndarray
) -> dict[str, np.ndarray]:
    """The feeds of the run after ``feeds`` (which gave ``outputs``): one new token per row, the cache those
    runs returned, the mask one longer."""
    mask = feeds["attention_mask"]
    return {
        "input_ids": tokens[:, None].astype(np.int64),
        "attention_mask": np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1),
        "position_ids": feeds["position_ids"][:, -1:] + 1,
    } | dict(zip(past_names(layout.layers), outputs[1:]))


def decode(
    run: Runner,
    layout: CacheLayout,
    rows: Sequence[Sequence[int]],
    max_new_tokens: int,
    choose: Chooser,
    *,
    pad: int = 0,
    eos: Collection[int] = (),
) -> list[list[int]]:
    """Up to ``max_new_tokens`` new tokens per row (``choose`` picks each from the last position's logits):
    the left-padded prompts in one run, then one run per token for the whole batch; a row that produced an
    ``eos`` token gets ``pad`` until every row has finished (each row is returned whole)."""
    feeds = prefill_feeds(layout, *left_pad(rows, pad))
    done, stop, new = np.zeros(len(rows), bool), np.array(sorted(eos), np.int64), []
    for step in range(max_new_tokens):
        outputs = run(feeds)
        tokens = np.where(done, pad, np.asarray(choose(outputs[0][:, -1]), np.int64))
        new.append(tokens)
        done |= np.isin(tokens, stop)
        if done.all() or step == max_new_tokens - 1:
            break
        feeds = next_feeds(layout, feeds, outputs, tokens)
    return np.stack(new, axis=1).tolist()
