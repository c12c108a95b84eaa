"""Tests of qpeft_deploy.runtime.bank: many real .qpeft adapters on one real MiniLM, per call and per row."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.io.model_io import load_adapted_model, save_adapter
from qpeft_deploy.io.qpeft_file import read_adapter, write_adapter
from qpeft_deploy.models import load_causal_lm, load_task_model, load_tokenizer, tokenize
from qpeft_deploy.runtime.bank import AdapterBank
from tests.helpers import make_adapter

TWO = {0: "neg", 1: "pos"}
SIX = {i: name for i, name in enumerate(["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])}
TEXTS = [
    "a gorgeous, moving film",
    "dull and far too long",
    "who wrote hamlet?",
    "not bad at all",
    "the worst plot of the year",
    "how far is the moon?",
    "call now to win a prize",
    "see you at 8",
]
# name -> (labels, attach options): two label counts, two ranks (mixed batches pad K), two target sets and
# both variants
SPECS = {
    "sent": (TWO, {"rank": 8, "seed": 1}),
    "topic": (SIX, {"rank": 4, "seed": 2}),
    "qv": (TWO, {"rank": 8, "seed": 3, "targets": ["query", "value"], "variant": "taylor"}),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(folder / f"{name}.qpeft", labels, **opts) for name, (labels, opts) in SPECS.items()
    }


@pytest.fixture(scope="module")
def inputs():
    return tokenize(load_tokenizer("minilm"), TEXTS)


@pytest.fixture(scope="module")
def reference(files, inputs):
    """Logits of each adapter loaded the ordinary way (its own model, QuantumPeftLinear layers)."""
    out = {}
    for name, path in files.items():
        with torch.no_grad():
            out[name] = load_adapted_model("minilm", path)(**inputs).logits
    return out


@pytest.fixture(scope="module")
def bank(files):
    bank = AdapterBank.from_pretrained("minilm")
    for name, path in files.items():
        bank.load(name, path)
    return bank


def assert_rows_match(out, names, reference, tol=1e-5):
    for i, name in enumerate(names):
        assert out.adapters[i] == name
        assert torch.allclose(out.row(i), reference[name][i], atol=tol, rtol=0), (i, name)


def test_single_adapter_calls_match_their_own_models(bank, inputs, reference):
    for name in SPECS:
        out = bank(inputs, adapter=name)
        assert out.logits.shape == reference[name].shape
        assert_rows_match(out, [name] * len(TEXTS), reference)


def test_mixed_batch_equals_per_adapter_outputs_row_by_row(bank, inputs, reference):
    names = ["sent", "topic", "qv", "topic", "sent", "qv", "qv", "topic"]
    out = bank(inputs, adapter=names)
    assert_rows_match(out, names, reference)
    assert out.logits.shape == (len(TEXTS), 6)
    assert torch.isneginf(out.logits[0, 2:]).all() and torch.isfinite(out.logits[1]).all()


def test_mixed_batch_is_one_forward(bank, inputs):
    calls = []
    handle = bank.model.get_submodule("bert.encoder").register_forward_hook(lambda *_: calls.append(1))
    try:
        bank(inputs, adapter=["sent", "topic", "qv", "sent"] * 2)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_100_alternating_requests_give_identical_results(bank, inputs):
    small = {k: v[:2] for k, v in inputs.items()}
    first = {name: bank(small, adapter=name).logits for name in SPECS}
    for i in range(100):
        name = list(SPECS)[i % 3]
        assert torch.equal(bank(small, adapter=name).logits, first[name])


def test_concurrent_calls_with_different_adapters_never_mix(bank, inputs, reference):
    mixed = ["sent", "topic", "qv", "qv", "topic", "sent", "sent", "qv"]
    plans = [[name] * len(TEXTS) for name in SPECS] + [mixed]
    errors = []

    def worker(names):
        try:
            for _ in range(6):
                assert_rows_match(bank(inputs, adapter=names), names, reference)
        except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)


def test_classify_gives_labels_and_scores_per_row(bank, reference):
    predictions = bank.classify(TEXTS[:3], adapter=["topic", "sent", "topic"])
    assert [p.adapter for p in predictions] == ["topic", "sent", "topic"]
    assert list(predictions[0].scores) == list(SIX.values())
    assert list(predictions[1].scores) == list(TWO.values())
    for i, p in enumerate(predictions):
        probs = torch.softmax(reference[p.adapter][i], -1)
        assert p.label == list(p.scores)[int(probs.argmax())]
        assert torch.allclose(torch.tensor(list(p.scores.values())), probs, atol=1e-5)


def test_rows_without_an_adapter_need_a_default(bank, inputs, reference):
    with pytest.raises(ConfigError, match="no default"):
        bank(inputs, adapter=["sent", None] * 4)
    bank.default = "topic"
    try:
        out = bank(inputs, adapter=["sent", None] * 4)
        assert_rows_match(out, ["sent", "topic"] * 4, reference)
        assert_rows_match(bank(inputs), ["topic"] * len(TEXTS), reference)
    finally:
        bank.default = None
    with pytest.raises(ConfigError, match="no adapter named"):
        bank.default = "missing"


def test_bad_calls_are_config_errors(bank, inputs):
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        bank(inputs, adapter="nope")
    with pytest.raises(ConfigError, match="3 adapter names for a batch of 8"):
        bank(inputs, adapter=["sent"] * 3)
    with pytest.raises(ConfigError, match="input_ids"):
        bank({"input_ids": torch.zeros(0, 4, dtype=torch.long)}, adapter="sent")
    with pytest.raises(ConfigError, match="non-empty list"):
        bank.classify([], adapter="sent")
    with pytest.raises(ConfigError, match="string"):
        bank.classify(["ok", 3], adapter="sent")
    with pytest.raises(ConfigError, match="through its AdapterBank"):
        bank.model(**inputs)


def test_digesting_the_base_up_front_keeps_the_base_check(files, tmp_path):
    bank = AdapterBank.from_pretrained("minilm")
    bank.digest_base()  # a server's warm-up: the base digests, before any adapter
    bank.load("sent", files["sent"])
    other_base = read_adapter(files["sent"])
    other_base.fingerprint = {k: b"\x00" * 8 for k in other_base.fingerprint}
    write_adapter(tmp_path / "other.qpeft", other_base)
    with pytest.raises(BaseMismatchError, match="other.qpeft: .* differs from the adapter's base model"):
        bank.load("other", tmp_path / "other.qpeft")
    assert bank.names() == ["sent"]


def test_load_refuses_bad_files_and_keeps_serving(bank, files, inputs, reference, tmp_path):
    corrupt = tmp_path / "corrupt.qpeft"
    corrupt.write_bytes(files["sent"].read_bytes()[:-7])
    with pytest.raises(FormatError, match="corrupt.qpeft"):
        bank.load("corrupt", corrupt)
    other_base = read_adapter(files["sent"])
    other_base.fingerprint = {k: b"\x00" * 8 for k in other_base.fingerprint}
    write_adapter(tmp_path / "other.qpeft", other_base)
    with pytest.raises(BaseMismatchError, match="other.qpeft: .* differs from the adapter's base model"):
        bank.load("other", tmp_path / "other.qpeft")
    headless = read_adapter(files["topic"])
    write_adapter(tmp_path / "headless.qpeft", headless, drop_head=True)
    with pytest.raises(ConfigError, match="no classification head"):
        bank.load("headless", tmp_path / "headless.qpeft")
    for bad in ("", "../sent", "a/b", "x" * 200, None):
        with pytest.raises(ConfigError, match="invalid adapter name"):
            bank.load(bad, files["sent"])
    assert bank.names() == list(SPECS)
    assert_rows_match(bank(inputs, adapter="sent"), ["sent"] * len(TEXTS), reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank.load("other", tmp_path / "other.qpeft", force=True)
    assert any("base mismatch" in str(w.message) for w in caught)
    bank.unload("other")


def test_unload_replace_and_labels(bank, files, inputs, reference):
    bank.load("extra", files["topic"])
    assert bank.labels("extra") == list(SIX.values())
    assert_rows_match(bank(inputs, adapter=["extra"] * 8), ["extra"] * 8, {"extra": reference["topic"]})
    bank.load("extra", files["sent"])  # replaces in place
    assert_rows_match(bank(inputs, adapter="extra"), ["extra"] * 8, {"extra": reference["sent"]})
    bank.unload("extra")
    assert "extra" not in bank.names()
    with pytest.raises(ConfigError, match="no adapter named 'extra'"):
        bank.unload("extra")


def frame_bytes(path) -> int:
    """Bytes of an adapter's materialised U and V in fp32: Σ (N + M)·K·4."""
    adapter = read_adapter(path)
    return sum((n + m) * adapter.config.targets[key] * 4 for key, (n, m) in adapter.shapes.items())


def test_bank_around_a_model_with_a_one_adapter_cache(files, inputs, reference):
    budget = max(frame_bytes(path) for path in files.values())
    bank = AdapterBank(load_task_model("minilm", TWO), cache_bytes=budget)  # no base: no fingerprint check
    for name, path in files.items():
        bank.load(name, path)
    for _ in range(2):
        for name in SPECS:
            assert_rows_match(bank(inputs, adapter=name), [name] * 8, reference)
            assert bank.memory()["cached_adapters"] < 3 and bank.memory()["cache_bytes"] <= budget
    names = [*SPECS, *SPECS, "qv", "sent"]
    assert_rows_match(bank(inputs, adapter=names), names, reference)
    with pytest.raises(ConfigError, match="no tokenizer"):
        bank.classify(["hi"], adapter="sent")


def test_resident_memory_per_adapter_is_kilobytes(bank, files):
    before = bank.memory()
    for i in range(20):
        bank.load(f"copy{i}", files["sent"])
    after = bank.memory()
    per_adapter = (after["adapter_bytes"] - before["adapter_bytes"]) / 20
    for i in range(20):
        bank.unload(f"copy{i}")
    assert per_adapter < 25_000  # angles, α·λ and head of 37 targets: 10,000 adapters in ~0.25 GB


# ------------------------------------------------------------------------------------------- causal LM

PROMPTS = ["Name a colour.", "Write a haiku about rain, please."]  # two lengths: the batch is left-padded
ROWS = [("lm1", 0), ("lm2", 1), ("lm3", 0), (None, 1)]  # (adapter, prompt): three adapters and a base row
# name -> (λ scale, attach options): two ranks (a mixed batch pads K) and a partial target set
CAUSAL = {
    "lm1": (0.5, {}),
    "lm2": (1.0, {"rank": 4}),
    "lm3": (1.0, {"targets": ["q_proj", "v_proj"]}),
}
TOKENS = 16


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """(files, each row of ROWS's tokens from transformers' generate() on its adapter's own attached model)."""
    from tests.helpers import causal_adapter_model, chat_ids, greedy

    folder, tokenizer = tmp_path_factory.mktemp("causal"), load_tokenizer("smollm2")
    ids = [chat_ids(tokenizer, p) for p in PROMPTS]
    files, models = {}, {None: load_causal_lm("smollm2")}
    for seed, (name, (scale, options)) in enumerate(CAUSAL.items(), start=1):
        models[name] = causal_adapter_model(seed, scale, **options)
        files[name] = save_adapter(models[name], folder / f"{name}.qpeft", base="smollm2")
    return files, [greedy(models[name], ids[p], TOKENS) for name, p in ROWS]


@pytest.fixture(scope="module")
def causal_bank(causal):
    bank = AdapterBank.from_pretrained("smollm2")
    for name, path in causal[0].items():
        bank.load(name, path)
    return bank


def test_mixed_batch_generation_equals_each_adapters_own_generation(causal_bank, causal):
    want = causal[1]
    assert want[0] != want[2] and want[1] != want[3]  # the adapters change the answers
    names, prompts = [n for n, _ in ROWS], [PROMPTS[p] for _, p in ROWS]
    shapes = []  # the (rows, tokens) of every forward of the model's decoder
    decoder = causal_bank.model.get_submodule("model")
    handle = decoder.register_forward_hook(
        lambda _, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        mixed = causal_bank.generate(prompts, adapter=names, max_new_tokens=TOKENS)
    finally:
        handle.remove()
    steps = max(len(row.tokens) for row in mixed)  # the prompt batch once, then one forward per token
    assert shapes[0][0] == 4 and shapes[1:] == [(4, 1)] * (steps - 1)
    for i, (name, row) in enumerate(zip(names, mixed)):
        assert row.adapter == name and row.tokens == want[i], (i, name)
        alone = causal_bank.generate(prompts[i], adapter=name, max_new_tokens=TOKENS)[0]
        assert alone.tokens == row.tokens and alone.text == row.text
        assert row.finish_reason == ("stop" if len(row.tokens) < TOKENS else "length")


def test_sampling_is_seeded(causal_bank):
    def sample(seed):
        rows = causal_bank.generate(
            ["Tell a story."] * 2, ["lm1", None], 6, temperature=1.0, top_p=0.9, seed=seed
        )
        return [r.tokens for r in rows]

    first = sample(3)
    assert sample(3) == first and sample(4) != first


def test_causal_bank_refuses_bad_input_with_one_line_errors(causal_bank, causal, bank, files):
    before = causal_bank.names()
    with pytest.raises(ConfigError, match=r"classification adapter .* expected a causal-LM adapter"):
        causal_bank.load("sent", files["sent"])
    with pytest.raises(ConfigError, match=r"causal-LM adapter .* expected a classification"):
        bank.load("lm1", causal[0]["lm1"])
    assert causal_bank.names() == before and "lm1" not in bank.names()
    with pytest.raises(
        ConfigError,
        match=r"prompt 1 has \d+ tokens: with max_new_tokens=4 it passes the model's context of 8192",
    ):
        causal_bank.generate(["hi", "word " * 9000], adapter="lm1", max_new_tokens=4)
    with pytest.raises(ConfigError, match="no adapter named 'nope' is loaded"):
        causal_bank.generate(["hi", "hello"], adapter=["lm1", "nope"], max_new_tokens=4)
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            causal_bank.generate(["hi"], adapter="lm1", **({"max_new_tokens": 4} | bad))
    with pytest.raises(ConfigError, match="prompts must be"):
        causal_bank.generate([], adapter="lm1")
    with pytest.raises(ConfigError, match="causal language model: this bank generates"):
        causal_bank.classify(["hi"], adapter="lm1")
    with pytest.raises(ConfigError, match="not a causal language model: this bank classifies"):
        bank.generate(["hi"], adapter="sent")
