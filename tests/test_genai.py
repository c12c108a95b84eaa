"""ONNX Runtime GenAI on exported decoders (qpeft_deploy/export/onnx/genai.py): og.Model + og.Generator generate
torch's greedy tokens from the folder the exporter writes."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from transformers import AutoTokenizer

from qpeft_deploy.core.attach import adapted_layers, attach
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.export.onnx.export import export_onnx, export_onnx_adapter
from qpeft_deploy.export.onnx.genai import GENAI_CONFIG, genai_config
from qpeft_deploy.io.model_io import load_adapted_model, save_adapter
from qpeft_deploy.io.onnx_adapter import MODEL_FILE, read_onnx_adapter
from qpeft_deploy.io.onnx_decoder import CacheLayout, decode, session_runner
from qpeft_deploy.io.ort import cpu_session
from qpeft_deploy.models import SMOLLM2, load_causal_lm, load_tokenizer
from tests.helpers import chat_ids, greedy, make_causal_adapter

og = pytest.importorskip("onnxruntime_genai")
pytest.importorskip("optimum.exporters.onnx")


def tiny_llama_folder(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (4 heads, 2 KV heads, head size 16) saved as an HF folder, without a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        initializer_range=0.2,  # varied logits: the default 0.02 makes every greedy token the same
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def tiny_adapter(base: Path, path: Path, seed: int) -> Path:
    """A K=4 all-linear adapter of the tiny Llama with random λ (large enough to change its tokens)."""
    model = attach(load_causal_lm(str(base)), rank=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.spectrum.lam.copy_(torch.randn(layer.rank, generator=g) * 2)
    return save_adapter(model, path, base=str(base))


def og_greedy(model, ids: list[int], tokens: int, adapters=None, name: str | None = None) -> list[int]:
    """og's greedy tokens after ``ids`` from an og.Model or an exported folder (with adapter ``name`` of
    ``adapters`` active when given)."""
    model = og.Model(str(model)) if isinstance(model, Path) else model
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
    generator = og.Generator(model, params)
    if name is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done() and len(out) < tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tiny Llama folder, its adapter, the merged optimum export of both)."""
    root = tmp_path_factory.mktemp("genai")
    base = tiny_llama_folder(root / "base")
    adapter = tiny_adapter(base, root / "a.qpeft", seed=1)
    export_onnx(str(base), adapter, root / "merged", mode="merged", quiet=True)
    return base, adapter, root / "merged"


def test_config_describes_the_graph(tiny):
    folder = tiny[2]
    written = json.loads((folder / GENAI_CONFIG).read_text())
    assert written == genai_config(folder)
    decoder = written["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"]) == (2, 4)
    assert (decoder["num_key_value_heads"], decoder["head_size"], decoder["hidden_size"]) == (2, 16, 64)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert written["model"]["type"] == "llama" and written["model"]["eos_token_id"] == 2
    assert written["search"]["past_present_share_buffer"] is False


def test_og_generates_torch_tokens_on_a_tiny_llama(tiny):
    base, adapter, folder = tiny
    ids = [1, 17, 42, 99, 5, 63, 8]
    torch_tokens = greedy(load_adapted_model(str(base), adapter).eval(), torch.tensor([ids]), 16)
    untuned = greedy(load_causal_lm(str(base)), torch.tensor([ids]), 16)
    assert len(torch_tokens) == 16 and len(set(torch_tokens)) > 2
    assert torch_tokens != untuned  # the adapter changes the tokens, so the check is not vacuous
    assert og_greedy(folder, ids, 16) == torch_tokens


def test_og_runs_the_runtime_mode_circuit_apply_functions(tiny, tmp_path):
    base, adapter, _ = tiny
    export_onnx(str(base), adapter, tmp_path / "runtime", mode="runtime", apply="circuit", quiet=True)
    ids = [1, 17, 42, 99, 5, 63, 8]
    torch_tokens = greedy(load_adapted_model(str(base), adapter).eval(), torch.tensor([ids]), 16)
    assert og_greedy(tmp_path / "runtime", ids, 16) == torch_tokens


def test_og_swaps_our_adapter_files_per_generator(tiny, tmp_path):
    base, adapter, _ = tiny
    other = tiny_adapter(base, tmp_path / "b.qpeft", seed=2)
    export_onnx(str(base), adapter, tmp_path / "swappable", mode="swappable", quiet=True)
    files = {name: tmp_path / f"{name}.onnx_adapter" for name in ("a", "b")}
    for (name, path), source in zip(files.items(), (adapter, other)):
        export_onnx_adapter(source, path)
        assert read_onnx_adapter(path).signed  # our integrity trailer follows the flatbuffer
    model = og.Model(str(tmp_path / "swappable"))
    adapters = og.Adapters(model)
    for name, path in files.items():
        adapters.load(str(path), name)
    ids = [1, 17, 42, 99, 5, 63, 8]
    expected = {
        name: greedy(load_adapted_model(str(base), source).eval(), torch.tensor([ids]), 16)
        for name, source in zip(files, (adapter, other))
    }
    assert expected["a"] != expected["b"]
    for name in ("a", "b", "a"):
        assert og_greedy(model, ids, 16, adapters, name) == expected[name]


@pytest.mark.parametrize("options", [{"dtype": "fp16"}, {"quantize": "int8"}, {"quantize": "int4"}])
def test_og_runs_reduced_precision_exports(tiny, tmp_path, options):
    """og's tokens equal onnxruntime's own greedy decoding of the same (fp16 / int8 / 4-bit) graph."""
    base, adapter, _ = tiny
    export_onnx(str(base), adapter, tmp_path / "out", mode="runtime", quiet=True, **options)
    session = cpu_session(tmp_path / "out" / MODEL_FILE)
    layout = CacheLayout.of_inputs({i.name: i.shape for i in session.get_inputs()})
    ids = [1, 17, 42, 99, 5, 63, 8]
    run = session_runner(session, layout)
    (want,) = decode(run, layout, [ids], 16, lambda logits: logits.argmax(-1), pad=2, eos=[2])
    assert og_greedy(tmp_path / "out", ids, 16) == want


def test_a_graph_without_past_key_values_is_refused(tiny, tmp_path):
    base, _, _ = tiny
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((base / name).read_bytes())
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    with pytest.raises(ConfigError, match=r"model\.onnx: not a decoder with past key/values"):
        genai_config(tmp_path)


@pytest.mark.slow
def test_og_generates_torch_tokens_on_smollm2(tmp_path):
    adapter = make_causal_adapter(tmp_path / "a.qpeft", seed=3)
    export_onnx(SMOLLM2, adapter, tmp_path / "merged", mode="merged", quiet=True)
    tokenizer = load_tokenizer(SMOLLM2)
    ids = chat_ids(tokenizer, "Write a story about a lighthouse.")
    torch_tokens = greedy(load_adapted_model(SMOLLM2, adapter).eval(), ids)
    model = og.Model(str(tmp_path / "merged"))
    assert og_greedy(model, ids[0].tolist(), 32) == torch_tokens
    # og's tokenizer reads the folder's tokenizer.json as transformers does (its decoder made ByteLevel alone)
    text = "Is this text message spam or ham? Free entry in 2 a wkly comp to win FA Cup final tkts!"
    own = og.Tokenizer(model)
    assert [int(i) for i in own.encode(text)] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert own.decode(torch_tokens) == tokenizer.decode(torch_tokens)
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert exported.decode(torch_tokens + ids[0].tolist()) == tokenizer.decode(torch_tokens + ids[0].tolist())
