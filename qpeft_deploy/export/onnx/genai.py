"""ONNX Runtime GenAI: the ``genai_config.json`` that makes an exported decoder folder an ``og.Model``.

onnxruntime-genai (``og``) runs a decoder graph whose I/O it is told in ``genai_config.json``: the graph file,
the names of the token, mask, position and past / present key-value tensors (``%d`` stands for the layer), the
attention shape (layers, heads, KV heads, head size: og allocates the KV cache as (batch, kv heads, length,
head size)), the special token ids and the search defaults. We write it from the graph's own inputs and
outputs and the folder's Hugging Face ``config.json`` / ``generation_config.json``, so ``og.Model(folder)`` and
``og.Generator`` generate with it (greedy tokens equal torch's: ``tests/test_genai.py``). The KV cache is not
shared between past and present (``past_present_share_buffer`` false): our graphs concatenate past and new keys,
as optimum's do, rather than writing into a preallocated buffer (GroupQueryAttention).

A byte-level BPE ``tokenizer.json`` whose decoder chain also lists SentencePiece steps gets its ByteLevel decoder
alone (:func:`byte_level_decoder`), so that ``og.Tokenizer`` encodes and decodes like transformers.

The schema is onnxruntime-genai's (``docs/genai/reference/config``; its model builder's ``make_genai_config``).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from qpeft_deploy.atomic import atomic_file
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.io.onnx_adapter import MODEL_FILE
from qpeft_deploy.io.onnx_decoder import INPUTS as DECODER_INPUTS
from qpeft_deploy.io.onnx_decoder import LOGITS, past_names, present_names

GENAI_CONFIG = "genai_config.json"
# Hugging Face model types onnxruntime-genai 0.18 knows by name; any other decoder runs as its generic "decoder"
OG_TYPES = ("gemma", "gpt2", "granite", "llama", "mistral", "olmo", "phi3", "qwen2", "smollm3")


def _templates(names_of) -> tuple[str, str]:
    """The key and value names of layer ``%d`` (og's name templates) from a function of the layer count."""
    key, value = names_of(1)
    return key.replace(".0.", ".%d."), value.replace(".0.", ".%d.")


# og's key -> our graph's name (io/onnx_decoder.py's names: optimum's and GenAI's model builder's)
INPUTS = {name: name for name in DECODER_INPUTS} | dict(
    zip(("past_key_names", "past_value_names"), _templates(past_names))
)
OUTPUTS = {"logits": LOGITS} | dict(
    zip(("present_key_names", "present_value_names"), _templates(present_names))
)
REQUIRED = ("input_ids", "past_key_names", "past_value_names")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None


def _graph_names(path: Path) -> tuple[set[str], set[str]]:
    """The input and output names of the graph at ``path`` (weights not loaded)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name for i in graph.input}, {o.name for o in graph.output}


def _present(names: dict[str, str], graph: set[str], layers: int) -> dict[str, str]:
    """The entries of ``names`` whose tensor (every layer's, for a ``%d`` template) the graph has."""
    return {
        key: name
        for key, name in names.items()
        if all((name % i if "%d" in name else name) in graph for i in range(layers))
    }


def _first(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) and value else value


def genai_config(folder: Path, filename: str = MODEL_FILE, threads: int | None = None) -> dict:
    """The genai_config.json of the decoder graph ``folder/filename`` (see the module docstring)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    generation = _read_json(folder / "generation_config.json")
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    graph_inputs, graph_outputs = _graph_names(folder / filename)
    inputs, outputs = _present(INPUTS, graph_inputs, layers), _present(OUTPUTS, graph_outputs, layers)
    missing = [INPUTS[k] for k in REQUIRED if k not in inputs] + [
        v for k, v in OUTPUTS.items() if k not in outputs
    ]
    if missing:
        raise ConfigError(
            f"{folder / filename}: not a decoder with past key/values (no {', '.join(missing)})"
        )
    eos = generation.get("eos_token_id", config.eos_token_id)
    pad = generation.get("pad_token_id", config.pad_token_id)
    context = getattr(config, "max_position_embeddings", None) or config.n_positions
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    if threads is not None:
        session["intra_op_num_threads"] = threads
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id", config.bos_token_id),
            "context_length": context,
            "decoder": {
                "session_options": session,
                "filename": filename,
                "head_size": head_size,
                "hidden_size": config.hidden_size,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else _first(eos),
            "type": config.model_type if config.model_type in OG_TYPES else "decoder",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(generation.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(generation.get("top_k", 50)),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }


def byte_level_decoder(spec: dict) -> dict | None:
    """The ByteLevel step of a byte-level BPE ``tokenizer.json`` whose decoder chain also lists SentencePiece
    steps (ByteFallback, Replace ▁, Fuse: the GGUF conversion of SmolLM2 writes them), when the vocabulary has
    no token those steps act on (no ``▁``, no ``<0x..>``); None otherwise. og's tokenizer (onnxruntime-extensions)
    reads such a chain as SentencePiece and encodes most words as -1; the ByteLevel step alone decodes the
    same text in transformers and in og."""
    decoder, vocab = spec.get("decoder") or {}, (spec.get("model") or {}).get("vocab") or {}
    steps = decoder.get("decoders") or [] if decoder.get("type") == "Sequence" else []
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel" or len(byte_level) != 1 or len(steps) < 2:
        return None
    if any(token.startswith("<0x") or "▁" in token for token in vocab):
        return None
    return byte_level[0]


def _og_tokenizer(folder: Path) -> None:
    """Rewrite ``folder/tokenizer.json``'s decoder as :func:`byte_level_decoder` says (when it says so)."""
    path = folder / "tokenizer.json"
    spec = _read_json(path)
    if (decoder := byte_level_decoder(spec)) is not None:
        spec["decoder"] = decoder
        atomic_file(path, json.dumps(spec, ensure_ascii=False, indent=2).encode(), overwrite=True)


def write_genai_config(folder: str | Path, filename: str = MODEL_FILE, threads: int | None = None) -> Path:
    """Write ``folder/genai_config.json`` for the decoder graph ``folder/filename`` (replacing one there), and
    make the folder's tokenizer readable by og's (:func:`byte_level_decoder`)."""
    folder = Path(folder)
    text = json.dumps(genai_config(folder, filename, threads), indent=2) + "\n"
    _og_tokenizer(folder)
    return atomic_file(folder / GENAI_CONFIG, text.encode(), overwrite=True)
