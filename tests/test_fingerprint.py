"""Tests of qpeft_deploy.io.fingerprint on the real MiniLM checkpoint and re-saved / sharded / altered copies."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.io import fingerprint
from qpeft_deploy.io.fingerprint import DIGEST_SIZE, base_fingerprint, check_fingerprint
from qpeft_deploy.io.safetensors import read_header
from qpeft_deploy.models import resolve_base

KEYS = [
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.3.output.dense.weight",
    "pooler.dense.weight",
]


@pytest.fixture(scope="module")
def minilm():
    return resolve_base("minilm")


@pytest.fixture(scope="module")
def weights(minilm):
    return load_file(str(minilm / "model.safetensors"))


@pytest.fixture(scope="module")
def expected(minilm):
    return base_fingerprint(minilm, KEYS)


def test_digests_are_short_deterministic_and_distinct(minilm, expected):
    assert list(expected) == KEYS
    assert all(isinstance(d, bytes) and len(d) == DIGEST_SIZE for d in expected.values())
    assert len(set(expected.values())) == len(KEYS)
    assert base_fingerprint(minilm, KEYS) == expected
    check_fingerprint(expected, minilm)


def test_streaming_in_tiny_chunks_gives_the_same_digest(minilm, expected, monkeypatch):
    monkeypatch.setattr(fingerprint, "CHUNK", 7)
    assert base_fingerprint(minilm, KEYS) == expected


def test_sharded_checkpoint_with_index_matches(tmp_path, weights, expected):
    names = sorted(weights)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    assert base_fingerprint(tmp_path, KEYS) == expected
    check_fingerprint(expected, tmp_path)


def test_prefixed_task_checkpoint_matches(tmp_path, weights, expected):
    save_file({f"bert.{k}": v for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    check_fingerprint(expected, tmp_path)


def test_changed_tensor_is_named_first(tmp_path, weights, expected):
    changed = dict(weights)
    changed[KEYS[1]] = changed[KEYS[1]].clone()
    changed[KEYS[1]][0, 0] += 1e-3
    changed[KEYS[2]] = changed[KEYS[2]] * 2
    save_file(changed, str(tmp_path / "model.safetensors"))
    with pytest.raises(BaseMismatchError, match=KEYS[1].replace(".", r"\.")):
        check_fingerprint(expected, tmp_path)


def test_dtype_and_shape_are_part_of_the_digest(tmp_path, weights, expected):
    save_file({k: v.half() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    assert base_fingerprint(tmp_path, KEYS[:1]) != {KEYS[0]: expected[KEYS[0]]}
    reshaped = dict(weights)
    reshaped[KEYS[0]] = weights[KEYS[0]].reshape(-1).contiguous()
    save_file(reshaped, str(tmp_path / "model.safetensors"))
    with pytest.raises(BaseMismatchError, match="query"):
        check_fingerprint(expected, tmp_path)


def test_missing_tensor_and_missing_weights(tmp_path, weights, expected):
    save_file({k: v for k, v in weights.items() if k != KEYS[2]}, str(tmp_path / "model.safetensors"))
    with pytest.raises(BaseMismatchError, match="pooler.dense.weight"):
        check_fingerprint(expected, tmp_path)
    with pytest.raises(ConfigError, match="pooler"):
        base_fingerprint(tmp_path, KEYS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="model.safetensors"):
        base_fingerprint(empty, KEYS)


def test_corrupt_shard_is_a_format_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 100 << 20) + b"{}")
    with pytest.raises(FormatError, match="past the end"):
        base_fingerprint(tmp_path, KEYS)


def test_read_header_checks_length_before_reading(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 50) + b"{}" + b" " * 48)
    with pytest.raises(FormatError, match="limit"):
        read_header(path, 10)
    header, start, size = read_header(path, 100)
    assert header == {} and start == 58 and size == 58
    path.write_bytes(b"\x01\x02")
    with pytest.raises(FormatError, match="too short"):
        read_header(path, 100)
    path.write_bytes(struct.pack("<Q", 4) + b'{"a"')
    with pytest.raises(FormatError, match="JSON"):
        read_header(path, 100)
    path.write_bytes(struct.pack("<Q", 14) + b'{"a":1, "a":2}')
    with pytest.raises(FormatError, match="duplicate"):
        read_header(path, 100)
    deep = b"[" * 100000 + b"]" * 100000
    path.write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(FormatError):
        read_header(path, 1 << 20)
    with pytest.raises(FormatError, match="cannot read"):
        read_header(tmp_path / "missing", 100)


def test_fingerprint_digest_matches_documented_recipe(minilm, weights, expected):
    """blake2b-8 over 'key NUL dtype NUL AxB NUL' followed by the raw little-endian bytes (docs/FORMAT.md)."""
    import hashlib

    tensor = weights[KEYS[0]]
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{KEYS[0]}\0F32\0{tensor.shape[0]}x{tensor.shape[1]}\0".encode())
    h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    assert h.digest() == expected[KEYS[0]]


def test_an_adapter_on_a_cached_hub_base_records_the_repo_id(tmp_path, monkeypatch):
    from test_models import HUB_REPO, hub_cache_copy

    from qpeft_deploy.core.adapter import AdapterConfig, AdapterFile

    snapshot = hub_cache_copy(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    key = "encoder.layer.0.attention.self.query.weight"
    adapter = AdapterFile(AdapterConfig({key: 2}), {}, {key: (384, 384)})
    recorded = fingerprint.with_base(adapter, HUB_REPO)
    assert recorded.config.extra["base"] == HUB_REPO  # not the snapshot's commit hash
    assert recorded.fingerprint == base_fingerprint(snapshot, [key])
