"""Causal LMs to ONNX with past key/values, and the check of a decoder export against torch.

:class:`DecoderGraph` is what the legacy exporter traces: the model with flat tensor inputs and outputs in the
layout of :mod:`qpeft_deploy.io.onnx_decoder` (optimum's and ONNX Runtime GenAI's). Inside, the flat past
becomes a transformers ``DynamicCache`` and the 2-D attention mask a 4-D additive one (causal and padding
together, built from tensor shapes), so the graph needs no transformers mask code and one graph prefills and
decodes at any batch, sequence and past length. Runtime and swappable modes come from the same graph surgery
as every other export (:mod:`qpeft_deploy.export.onnx.graph`).

The check (:func:`decoder_reference` before the adapter is detached, :func:`check_decoder` on the written
graph): the logits of a left-padded prompt batch and of a second shape (two rows, three new tokens on the
first rows' cache), and greedy generation of :data:`CHECK_TOKENS` tokens through the same decode loop, torch
and onnxruntime each running it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from qpeft_deploy.export.onnx.circuit import OPSET
from qpeft_deploy.export.onnx.compare import PROBE_TEXTS
from qpeft_deploy.export.onnx.graph import share_transposed
from qpeft_deploy.io.onnx_decoder import (
    INPUTS,
    CacheLayout,
    Runner,
    decode,
    dynamic_axes,
    left_pad,
    past_names,
    prefill_feeds,
    session_runner,
)

MASKED = -1e4  # added to the scores of masked positions (exp underflows to 0; finite in fp16 too)
CHECK_TOKENS = 16
PROBE_LENGTHS = (9, 5, 7)  # token rows of a tokenizer-less base (a padded batch)


def cache_layout(model: nn.Module) -> CacheLayout:
    """The KV cache layout of a transformers causal LM, from its config."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return CacheLayout(config.num_hidden_layers, getattr(config, "num_key_value_heads", heads), head_dim)


class DecoderGraph(nn.Module):
    """A causal LM with flat inputs (``INPUTS`` then the past keys and values) and flat outputs (logits, then
    the present keys and values)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.layers = model, cache_layout(model).layers

    def forward(
        self, input_ids, attention_mask, position_ids, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=_additive_mask(attention_mask, input_ids.shape[1]),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = out.past_key_values
        flat = [t for i in range(self.layers) for t in (present.layers[i].keys, present.layers[i].values)]
        return (out.logits, *flat)


def _additive_mask(mask: torch.Tensor, sequence: int) -> torch.Tensor:
    """batch × 1 × sequence × total: 0 where query q (the last ``sequence`` positions) may attend key k
    (k ≤ q and k not padding), else MASKED."""
    total = mask.shape[1]
    query = torch.arange(sequence, device=mask.device)[:, None] + (total - sequence)
    causal = torch.arange(total, device=mask.device)[None, :] <= query
    allowed = causal[None, None] & mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, MASKED)


def export_decoder(model: nn.Module, path: Path) -> None:
    """torch.onnx.export (legacy exporter, opset 18) of :class:`DecoderGraph` with symbolic batch, sequence,
    past and total axes, traced on a two-row, three-token step after a two-token past; a tied LM head reads
    the embedding through a Transpose instead of a second copy."""
    layout = cache_layout(model)
    ids = torch.ones((2, 3), dtype=torch.long)
    past = [torch.zeros((2, layout.kv_heads, 2, layout.head_dim)) for _ in past_names(layout.layers)]
    inputs = (ids, torch.ones((2, 5), dtype=torch.long), torch.arange(2, 5).expand(2, 3), *past)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            DecoderGraph(model),
            inputs,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[*INPUTS, *past_names(layout.layers)],
            output_names=layout.outputs(),
            dynamic_axes=dynamic_axes(layout.layers),
        )
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embedding.weight:
        graph = onnx.load(str(path))
        if share_transposed(graph, embedding.weight.detach().float().numpy()):
            onnx.save(graph, str(path))


# ------------------------------------------------------------------------------------------------ check


def _torch_runner(model: nn.Module) -> Runner:
    """A :data:`~qpeft_deploy.io.onnx_decoder.Runner` over the torch model (what the graph was exported from)."""
    graph = DecoderGraph(model)
    names = [*INPUTS, *past_names(graph.layers)]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in graph(*(torch.from_numpy(feeds[n]) for n in names))]

    return run


def probe_rows(model: nn.Module, tokenizer) -> list[list[int]]:
    """Prompt token rows of different lengths: the probe texts' tokens, or counting ids without a tokenizer."""
    if tokenizer is not None:
        return [list(tokenizer(text)["input_ids"]) for text in PROBE_TEXTS]
    vocab = model.config.vocab_size
    return [[(7 * r + 3 * i + 1) % vocab for i in range(n)] for r, n in enumerate(PROBE_LENGTHS)]


@dataclass
class DecoderReference:
    """The torch side of a decoder check: the probe feeds, torch's logits on them, its greedy tokens."""

    rows: list[list[int]]
    feeds: list[dict[str, np.ndarray]]
    logits: list[np.ndarray]
    tokens: list[list[int]]


def decoder_reference(model: nn.Module, tokenizer) -> DecoderReference:
    """Run the (adapted) torch model on the probes: a left-padded prompt batch, then two of its rows with
    three new tokens on their cache; and greedy generation of :data:`CHECK_TOKENS` tokens."""
    layout, run = cache_layout(model), _torch_runner(model)
    rows = probe_rows(model, tokenizer)
    first = prefill_feeds(layout, *left_pad(rows, 0))
    out = run(first)
    second = _continued(layout, first, out, np.array([[5, 6, 7], [8, 9, 10]]) % model.config.vocab_size)
    feeds = [first, second]
    logits = [out[0], run(second)[0]]
    greedy = decode(run, layout, rows, CHECK_TOKENS, _argmax)
    return DecoderReference(rows, feeds, logits, greedy)


def _continued(
    layout: CacheLayout, first: dict[str, np.ndarray], out: list[np.ndarray], tokens: np.ndarray
) -> dict[str, np.ndarray]:
    """The feeds of ``tokens`` (rows × new) continuing the first rows of the run ``first`` (which gave
    ``out``) on their cache."""
    rows, new = tokens.shape
    mask = first["attention_mask"][:rows]
    return {
        "input_ids": tokens.astype(np.int64),
        "attention_mask": np.concatenate([mask, np.ones((rows, new), np.int64)], axis=1),
        "position_ids": first["position_ids"][:rows, -1:] + 1 + np.arange(new),
    } | dict(zip(past_names(layout.layers), (o[:rows] for o in out[1:])))


def check_decoder(session, reference: DecoderReference) -> dict:
    """onnxruntime against torch: max |logits difference| over the probes, and whether greedy generation
    gives the same tokens."""
    layout = CacheLayout.of_inputs({i.name: i.shape for i in session.get_inputs()})
    if layout is None:
        raise RuntimeError("the exported decoder lacks the past key/value inputs")
    run = session_runner(session, layout)
    diff = max(_real_diff(f, run(f)[0], r) for f, r in zip(reference.feeds, reference.logits))
    tokens = decode(run, layout, reference.rows, CHECK_TOKENS, _argmax)
    return {"max_abs_diff_vs_torch": diff, "greedy_tokens_equal": tokens == reference.tokens}


def _real_diff(feeds: dict[str, np.ndarray], got: np.ndarray, want: np.ndarray) -> float:
    """max |got − want| over the positions of real tokens (a padding position attends to nothing, and
    exporters differ on what it then computes)."""
    real = feeds["attention_mask"][:, -got.shape[1] :].astype(bool)
    return float(np.abs(got - want)[real].max())


def _argmax(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(-1)
