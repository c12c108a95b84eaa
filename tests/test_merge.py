"""Tests of qpeft_deploy.merge.checkpoint: real adapters merged into and out of real checkpoints (MiniLM, sharded MiniLM,
GPT-2's Conv1D layout, a generated Llama-shaped bf16 checkpoint): exactness, atomicity, memory, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, BertModel, GPT2Config, GPT2Model

from benchmarks.merge import largest_tensor, run_child, synthetic_adapter, synthetic_llama
from qpeft_deploy.atomic import HOST
from qpeft_deploy.core.attach import adapted_layers, attach
from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.io.file_tools import verify_adapter
from qpeft_deploy.io.fingerprint import UNMERGED_FILE
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.io.safetensors import INDEX_FILE, SINGLE_FILE, read_checkpoint
from qpeft_deploy.merge.checkpoint import (
    HEAD_SIDECAR,
    RECORD_KEY,
    merge_checkpoint,
    parse_size,
    read_record,
    unmerge_checkpoint,
)
from qpeft_deploy.models import load_task_model, load_tokenizer, resolve_base, tokenize
from tests.helpers import randomize

LABELS = {0: "neg", 1: "pos"}
TEXTS = ["a gorgeous, moving film", "dull and far too long", "not bad at all"]
MINILM = resolve_base("minilm")
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base key -> ΔW (out × in) as the live layers compute it."""
    with torch.no_grad():
        return {key: layer.delta_weight() for key, layer in adapted_layers(model).items()}


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with safetensors' own reader (so each file must be valid)."""
    index = folder / INDEX_FILE
    names = [SINGLE_FILE]
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors = {}
    for name in names:
        with safe_open(folder / name, "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118 (not a dict)
    return tensors


def digest_files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary entries a run left beside its output."""
    return sorted(p.name for p in parent.iterdir() if ".qpeft-" in p.name)


def within(restored: torch.Tensor, original: torch.Tensor, relative: float = 1e-6) -> bool:
    """‖restored − original‖ ≤ relative·‖original‖ (Frobenius)."""
    return float((restored.double() - original.double()).norm()) <= relative * float(original.double().norm())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def head_model() -> nn.Module:
    return randomize(attach(load_task_model("minilm", LABELS), "all-linear", rank=8), seed=1).eval()


@pytest.fixture(scope="module")
def head_adapter(work, head_model) -> Path:
    return save_adapter(head_model, work / "head.qpeft", base="minilm")


@pytest.fixture(scope="module")
def plain_model() -> nn.Module:
    model = attach(load_task_model("minilm", LABELS), ["query", "value"], rank=4, seed=1, train_head=False)
    return randomize(model, seed=2, scale=2.0)


@pytest.fixture(scope="module")
def plain_adapter(work, plain_model) -> Path:
    return save_adapter(plain_model, work / "plain.qpeft", base="minilm")


@pytest.fixture(scope="module")
def three_label_model() -> nn.Module:
    model = attach(load_task_model("minilm", {0: "a", 1: "b", 2: "c"}), ["value"], rank=2, seed=3)
    return randomize(model, seed=4)


@pytest.fixture(scope="module")
def three_label_adapter(work, three_label_model) -> Path:
    return save_adapter(three_label_model, work / "three.qpeft", base="minilm")


@pytest.fixture(scope="module")
def sharded_base(work) -> Path:
    folder = work / "sharded-minilm"
    BertModel.from_pretrained(str(MINILM)).save_pretrained(str(folder), max_shard_size="20MB")
    assert (folder / INDEX_FILE).exists() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return tokenize(load_tokenizer("minilm"), TEXTS)


@pytest.fixture(scope="module")
def llama(work) -> tuple[Path, Path]:
    """The CI-sized synthetic Llama (bf16, sharded) and a K=8 adapter on its 14 projections."""
    base = synthetic_llama(work / "llama-ci", "llama-ci", max_shard_bytes=40 * 10**6)
    return base, synthetic_adapter(base, work / "llama.qpeft")


def test_head_adapter_makes_a_task_checkpoint_that_plain_transformers_loads(
    tmp_path, head_adapter, head_model, inputs
):
    out = merge_checkpoint("minilm", [head_adapter], tmp_path / "merged", quiet=True)
    model, info = AutoModelForSequenceClassification.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.id2label == LABELS
    with torch.no_grad():
        gap = (model.eval()(**inputs).logits - head_model(**inputs).logits).abs().max()
    assert gap < 1e-5
    for name in ("tokenizer.json", "vocab.txt", "1_Pooling/config.json", "modules.json"):
        assert (out / name).read_bytes() == (MINILM / name).read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {0o666 & ~umask}
    assert {p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")] if p.is_dir()} == {0o777 & ~umask}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_sharded_base_gives_shards_with_a_correct_index(tmp_path, sharded_base, plain_adapter, plain_model):
    out = merge_checkpoint(
        sharded_base, [plain_adapter], tmp_path / "merged", max_shard_size="15MB", quiet=True
    )
    index = json.loads((out / INDEX_FILE).read_text())
    names = sorted(set(index["weight_map"].values()))
    assert names == sorted(p.name for p in out.glob("*.safetensors")) and len(names) > 3
    total = 0
    for name in names:
        with safe_open(out / name, "pt") as f:
            sizes = {key: f.get_tensor(key).nbytes for key in f.keys()}  # noqa: SIM118 (not a dict)
        assert all(index["weight_map"][key] == name for key in sizes)
        sizes = list(sizes.values())
        assert sum(sizes) <= 15 * 10**6 or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    merged, base, delta = load_folder(out), load_folder(sharded_base), deltas(plain_model)
    assert merged.keys() == base.keys() and len(delta) == 12
    for key, tensor in base.items():
        if key in delta:
            assert torch.allclose(merged[key], tensor + delta[key], rtol=0, atol=1e-6)
            assert (merged[key] - tensor).abs().max() > 1e-3
        else:
            assert torch.equal(merged[key], tensor), key
    assert (out / "config.json").read_bytes() == (sharded_base / "config.json").read_bytes()


def test_unmerge_restores_the_fp32_base_within_1e_6(tmp_path, head_adapter):
    merged = merge_checkpoint("minilm", [head_adapter], tmp_path / "merged", quiet=True)
    record = read_record(read_checkpoint(merged))
    digest = hashlib.sha256(head_adapter.read_bytes()).hexdigest()
    assert record["adapters"] == [(digest, 1.0, "head.qpeft")] and record["tool"].startswith("qpeft-deploy")
    back = unmerge_checkpoint(merged, [head_adapter], tmp_path / "back", quiet=True)
    base, restored = load_file(MINILM / SINGLE_FILE), load_file(back / SINGLE_FILE)
    assert restored.keys() == base.keys()
    for key, tensor in base.items():
        assert restored[key].dtype == tensor.dtype
        if tensor.is_floating_point():
            assert within(restored[key], tensor), key
        else:
            assert torch.equal(restored[key], tensor)
    assert (back / "config.json").read_bytes() == (MINILM / "config.json").read_bytes()
    with safe_open(back / SINGLE_FILE, "pt") as f:
        assert RECORD_KEY not in f.metadata()


@pytest.mark.parametrize(
    "stored, dtype", [(torch.bfloat16, "keep"), (torch.float16, "keep"), (torch.float32, "bf16")]
)
def test_low_precision_round_trip_stays_within_the_documented_bound(
    tmp_path, plain_adapter, plain_model, stored, dtype
):
    base = tmp_path / "base"
    BertModel.from_pretrained(str(MINILM), torch_dtype=stored).save_pretrained(str(base))
    merged = merge_checkpoint(base, [plain_adapter], tmp_path / "merged", dtype=dtype, force=True, quiet=True)
    back = unmerge_checkpoint(merged, [plain_adapter], tmp_path / "back", quiet=True)
    written = torch.bfloat16 if dtype == "bf16" else stored
    u = UNIT_ROUNDOFF[written]
    original, after_merge, restored = load_folder(base), load_folder(merged), load_folder(back)
    assert {t.dtype for t in after_merge.values()} == {written}
    assert {k: t.dtype for k, t in restored.items()} == {k: t.dtype for k, t in original.items()}
    for key, delta in deltas(plain_model).items():
        w = original[key].double()
        expected = w + delta.double()
        assert ((after_merge[key].double() - expected).abs() <= u * expected.abs() + 2.0**-24).all()
        bound = u * (2 * w.abs() + delta.double().abs()) * (1 + u) + 2.0**-24
        assert ((restored[key].double() - w).abs() <= bound).all(), key


def test_weighted_adapters_sum_and_unmerge_needs_all_of_them(
    tmp_path, plain_adapter, plain_model, head_adapter, head_model
):
    out = merge_checkpoint(
        "minilm", [plain_adapter, head_adapter], tmp_path / "merged", weights=[0.5, -2.0], quiet=True
    )
    merged, base = load_folder(out), load_file(MINILM / SINGLE_FILE)
    plain, head = deltas(plain_model), deltas(head_model)
    for key, tensor in base.items():
        if key in head:
            expected = tensor + 0.5 * plain.get(key, torch.zeros_like(tensor)) - 2.0 * head[key]
            assert torch.allclose(merged[f"bert.{key}"], expected, rtol=0, atol=1e-5), key
    with pytest.raises(ConfigError, match="plain.qpeft, head.qpeft"):
        unmerge_checkpoint(out, [plain_adapter], tmp_path / "back")
    back = unmerge_checkpoint(out, [head_adapter, plain_adapter], tmp_path / "back", quiet=True)
    restored = load_file(back / SINGLE_FILE)
    assert all(within(restored[k], t) for k, t in base.items() if t.is_floating_point())


def test_two_heads_need_head_from(
    tmp_path, head_adapter, three_label_adapter, three_label_model, plain_adapter
):
    adapters = [head_adapter, three_label_adapter]
    with pytest.raises(ConfigError, match="head.qpeft.*three.qpeft.*--head-from"):
        merge_checkpoint("minilm", adapters, tmp_path / "merged")
    for name, match in (("nothing.qpeft", "names 0 of the adapters"), ("plain", "has no classification")):
        with pytest.raises(ConfigError, match=match):
            merge_checkpoint("minilm", [*adapters, plain_adapter], tmp_path / "merged", head_from=name)
    assert leftovers(tmp_path) == [] and not (tmp_path / "merged").exists()
    out = merge_checkpoint("minilm", adapters, tmp_path / "merged", head_from="three.qpeft", quiet=True)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"} and config["architectures"] == [
        "BertForSequenceClassification"
    ]
    assert torch.equal(load_file(out / SINGLE_FILE)["classifier.weight"], three_label_model.classifier.weight)


def test_replacing_a_head_and_unmerging_twice_gives_back_each_checkpoint(
    tmp_path, head_adapter, three_label_adapter, three_label_model
):
    task = merge_checkpoint("minilm", [three_label_adapter], tmp_path / "task", quiet=True)
    twice = merge_checkpoint(task, [head_adapter], tmp_path / "twice", force=True, quiet=True)
    assert (twice / HEAD_SIDECAR).exists()
    model = AutoModelForSequenceClassification.from_pretrained(str(twice))
    assert model.config.id2label == LABELS and model.classifier.weight.shape == (2, 384)
    once = unmerge_checkpoint(twice, [head_adapter], tmp_path / "once", quiet=True)
    assert (once / "config.json").read_bytes() == (task / "config.json").read_bytes()
    restored, expected = load_file(once / SINGLE_FILE), load_file(task / SINGLE_FILE)
    assert restored.keys() == expected.keys()
    assert torch.equal(restored["classifier.weight"], three_label_model.classifier.weight)
    assert all(within(restored[k], t) for k, t in expected.items() if t.is_floating_point())
    with safe_open(once / SINGLE_FILE, "pt") as f, safe_open(task / SINGLE_FILE, "pt") as g:
        assert f.metadata()[RECORD_KEY] == g.metadata()[RECORD_KEY]
    back = unmerge_checkpoint(once, [three_label_adapter], tmp_path / "back", quiet=True)
    assert sorted(load_file(back / SINGLE_FILE)) == sorted(load_file(MINILM / SINGLE_FILE))


@pytest.fixture(scope="module")
def gpt2(work) -> tuple[Path, nn.Module, Path]:
    """A tiny random GPT-2 checkpoint (Conv1D layers: weights stored in×out) and an all-linear adapter."""
    folder = work / "gpt2"
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
    GPT2Model(config).save_pretrained(folder)
    model = randomize(attach(GPT2Model.from_pretrained(str(folder)).eval(), "all-linear", rank=4), seed=5)
    return folder, model, save_adapter(model, work / "gpt2.qpeft", base=str(folder))


def test_conv1d_weights_get_the_transposed_update(tmp_path, gpt2):
    folder, model, adapter = gpt2
    out = merge_checkpoint(folder, [adapter], tmp_path / "merged", quiet=True)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        merged_states = GPT2Model.from_pretrained(str(out))(ids).last_hidden_state
        assert (merged_states - model(ids).last_hidden_state).abs().max() < 1e-5
    merged, base = load_folder(out), load_folder(folder)
    square = "h.0.attn.c_proj.weight"
    assert torch.allclose(merged[square], base[square] + deltas(model)[square].T, rtol=0, atol=1e-6)
    back = unmerge_checkpoint(out, [adapter], tmp_path / "back", quiet=True)
    restored = load_folder(back)
    assert all(within(restored[k], t) for k, t in base.items() if t.is_floating_point())


def test_a_fingerprint_mismatch_found_while_streaming_leaves_nothing(tmp_path, plain_adapter):
    base = tmp_path / "edited"
    base.mkdir()
    shutil.copyfile(MINILM / "config.json", base / "config.json")
    tensors = load_file(MINILM / SINGLE_FILE)
    tensors["encoder.layer.3.attention.self.value.weight"] *= 1.001
    save_file(tensors, base / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(BaseMismatchError, match=r"plain\.qpeft: .*encoder\.layer\.3\.attention\.self\.value"):
        merge_checkpoint(base, [plain_adapter], tmp_path / "merged", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]
    assert merge_checkpoint(base, [plain_adapter], tmp_path / "merged", force=True, quiet=True).exists()


def _bad_folder(tmp_path: Path, sharded_base: Path, case: str) -> Path:
    folder = tmp_path / case
    folder.mkdir()
    shutil.copyfile(MINILM / "config.json", folder / "config.json")
    if case == "missing-shard":
        first_shard = min(sharded_base.glob("model-*.safetensors"))
        for file in sharded_base.iterdir():
            if file != first_shard:
                shutil.copyfile(file, folder / file.name)
    return folder


@pytest.mark.parametrize(
    "case, error, words",
    [
        ("no-weights", ConfigError, ["no-weights", "no model.safetensors"]),
        ("missing-shard", ConfigError, [INDEX_FILE, "names shard", "does not exist"]),
        ("other-base", BaseMismatchError, ["gpt2.qpeft", "h.0.", "another base"]),
        ("dtype", ConfigError, ["--dtype", "int8"]),
        ("unwritable", ConfigError, ["a-file", "cannot write"]),
        ("exists", ConfigError, ["already exists", "--overwrite"]),
        ("into-base", ConfigError, ["outside the input folder"]),
        ("no-adapter", FormatError, ["missing.qpeft", "cannot read"]),
        ("weights", ConfigError, ["2 --adapter but 1 --weight"]),
        ("shard-size", ConfigError, ["--max-shard-size", "lots"]),
    ],
)
def test_bad_input_is_one_clear_error_and_leaves_nothing(
    tmp_path, sharded_base, plain_adapter, gpt2, case, error, words
):
    base, adapters, output, options = "minilm", [plain_adapter], tmp_path / "out" / "merged", {}
    (tmp_path / "out").mkdir()
    if case in ("no-weights", "missing-shard"):
        base = _bad_folder(tmp_path, sharded_base, case)
    elif case == "other-base":
        adapters = [gpt2[2]]
    elif case == "dtype":
        options["dtype"] = "int8"
    elif case == "unwritable":
        (tmp_path / "out" / "a-file").write_text("")
        output = tmp_path / "out" / "a-file" / "merged"
    elif case == "exists":
        output.mkdir()
    elif case == "into-base":
        base = tmp_path / "out" / "merged"
        shutil.copytree(sharded_base, base)
        options["overwrite"] = True
    elif case == "no-adapter":
        adapters = [tmp_path / "missing.qpeft"]
    elif case == "weights":
        adapters, options["weights"] = [plain_adapter, plain_adapter], [1.0]
    else:
        options["max_shard_size"] = "lots"
    before = sorted(os.listdir(tmp_path / "out"))
    base_files = (
        {} if case == "no-weights" else {p: p.stat().st_mtime_ns for p in resolve_base(str(base)).iterdir()}
    )
    with pytest.raises(error) as raised:
        merge_checkpoint(base, adapters, output, quiet=True, **options)
    message = str(raised.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert sorted(os.listdir(tmp_path / "out")) == before
    assert {p: p.stat().st_mtime_ns for p in base_files} == base_files


def test_unmerge_refuses_a_checkpoint_without_a_merge_record(tmp_path, plain_adapter):
    with pytest.raises(ConfigError, match="has no qpeft merge record"):
        unmerge_checkpoint("minilm", [plain_adapter], tmp_path / "back")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_replaced_with_overwrite(tmp_path, plain_adapter):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    merge_checkpoint("minilm", [plain_adapter], output, overwrite=True, quiet=True)
    assert not (output / "stale.txt").exists() and (output / SINGLE_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_full_disk_leaves_nothing(tmp_path, head_adapter):
    output = tmp_path / "merged"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, hard))
    try:
        with pytest.raises(ConfigError, match="cannot write: File too large") as raised:
            merge_checkpoint("minilm", [head_adapter], output, quiet=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert str(raised.value).startswith(f"{output}: ")
    assert list(tmp_path.iterdir()) == []


def test_sigkill_half_way_leaves_the_base_intact_and_the_next_run_cleans_up(tmp_path, llama):
    base, adapter = llama
    before = digest_files(base)
    output = tmp_path / "merged"
    code = (
        "from qpeft_deploy.merge.checkpoint import merge_checkpoint; "
        f"merge_checkpoint({str(base)!r}, [{str(adapter)!r}], {str(output)!r}, max_shard_size='3MB', "
        "quiet=True)"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    deadline, temp = time.monotonic() + 120, None
    while temp is None or len(list(temp.glob("model-*.safetensors"))) < 4:
        assert process.poll() is None, "the merge finished before it could be killed"
        assert time.monotonic() < deadline
        temp = next((p for p in tmp_path.iterdir() if p.name.startswith(".merged.qpeft-tmp-")), None)
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not output.exists() and temp.exists()  # SIGKILL cannot be caught: the temporary folder stays...
    assert digest_files(base) == before
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".merged.qpeft-tmp-{HOST}-{dead.pid}-0badf00d"
    alive = tmp_path / f".merged.qpeft-tmp-{HOST}-{os.getpid()}-0c0ffee0"
    stale.mkdir()
    alive.mkdir()
    merge_checkpoint(base, [adapter], output, max_shard_size="3MB", quiet=True)  # ...until the next run
    assert leftovers(tmp_path) == [alive.name]  # a live process's folder is never touched
    assert (output / INDEX_FILE).exists() and digest_files(base) == before


def test_streaming_keeps_extra_memory_under_twice_the_largest_tensor(tmp_path, llama):
    base, adapter = llama
    result = run_child("qpeft", base, adapter, tmp_path / "merged")
    largest = largest_tensor(base)
    assert result["extra_rss_bytes"] <= 2 * largest, (result, largest)
    assert read_record(read_checkpoint(tmp_path / "merged"))["adapters"][0][2] == "llama.qpeft"


def test_parse_size_reads_transformers_units():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30
    assert parse_size(" 1.5 mb ") == 1_500_000 and parse_size(4096) == 4096
    for bad in ("0MB", "-1GB", "2 apples", 0, True):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_an_unmerged_base_still_verifies_and_a_later_change_does_not(tmp_path, head_adapter):
    """Unmerge rounds (within the bound above), so its output is not byte-identical to the base; it attests the
    base digests of the tensors it wrote, and the fingerprint accepts exactly those bytes, nothing else."""
    merged = merge_checkpoint("minilm", [head_adapter], tmp_path / "merged", quiet=True)
    back = unmerge_checkpoint(merged, [head_adapter], tmp_path / "back", quiet=True)
    base, restored = load_file(MINILM / SINGLE_FILE), load_file(back / SINGLE_FILE)
    assert any(not torch.equal(restored[key], tensor) for key, tensor in base.items())  # rounding is real
    assert verify_adapter(head_adapter, base=str(back))["fingerprint"] == f"matches {back}"
    assert not (merged / UNMERGED_FILE).exists()
    key = "encoder.layer.0.attention.self.query.weight"
    restored[key] = restored[key].clone()
    restored[key][0, 0] += 1e-3
    save_file(restored, str(back / SINGLE_FILE))
    with pytest.raises(BaseMismatchError, match=key.replace(".", r"\.")):
        verify_adapter(head_adapter, base=str(back))


def test_causal_adapter_merges_into_smollm2_as_a_tied_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.helpers import causal_adapter_model, chat_ids, greedy

    # λ at a trained adapter's scale (0.1): it changes the greedy answer, and the fp32 rounding of W + ΔW stays
    # under 1e-4 (SmolLM2's own fp32-vs-fp64 logits differ by 9e-5 on this prompt: 1e-4 is the fp32 floor)
    model = causal_adapter_model(seed=8, scale=0.1)
    path = save_adapter(model, tmp_path / "lm.qpeft", base="smollm2")
    merge_checkpoint("smollm2", [path], tmp_path / "merged", quiet=True)
    merged, info = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "merged"), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied
    ids = chat_ids(load_tokenizer("smollm2"), "Name a colour.")
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-4
    assert greedy(merged.eval(), ids) == greedy(model, ids)
