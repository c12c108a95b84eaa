"""Tests of qpeft_deploy.runtime.generation: the next-token rule, cutting at the end of sequence, special ids
and the request checks both runtimes' ``generate`` share (end to end in tests/test_bank.py and
tests/test_ort_generate.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from qpeft_deploy.errors import ConfigError
from qpeft_deploy.runtime.generation import (
    check_context,
    check_request,
    generator,
    next_tokens,
    special_ids,
    until,
)
from tests.helpers import char_tokenizer

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))


def test_greedy_is_the_argmax_and_sampling_is_seeded():
    assert next_tokens(LOGITS, 0.0, 1.0, generator(0)).tolist() == [0, 3]
    draws = [next_tokens(LOGITS, 1.0, 1.0, generator(seed)).tolist() for seed in (1, 1, 2)]
    assert draws[0] == draws[1]


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    g = generator(0)
    seen = {tuple(next_tokens(LOGITS, 1.0, 0.7, g).tolist()) for _ in range(400)}
    assert {row[0] for row in seen} == {0, 1} and {row[1] for row in seen} == {3, 2}  # 0.5 + 0.3 ≥ 0.7
    assert all(next_tokens(LOGITS, 1.0, 0.4, g).tolist() == [0, 3] for _ in range(50))  # one token suffices


def test_until_cuts_after_the_first_end_of_sequence():
    assert until([4, 5, 2, 7, 2], {2}) == [4, 5, 2]
    assert until([4, 5, 6], {2}) == [4, 5, 6] and until([4, 5], set()) == [4, 5]


def test_special_ids_prefer_the_generation_config():
    tokenizer = char_tokenizer()  # pad 0, no end of sequence
    assert special_ids(None, tokenizer) == (0, set())
    assert special_ids(GenerationConfig(eos_token_id=[7, 5]), tokenizer) == (0, {5, 7})
    tokenizer.pad_token = None
    assert special_ids(GenerationConfig(eos_token_id=[7, 5]), tokenizer) == (5, {5, 7})  # pad: lowest eos


def test_bad_requests_are_refused_with_one_line():
    assert check_request("hi", 4, 0, 1) == ["hi"]
    for args, words in [
        (([], 4, 0, 1), "non-empty list"),
        ((["a", 3], 4, 0, 1), "non-empty list"),
        (("a", True, 0, 1), "max_new_tokens"),
        (("a", 4, float("nan"), 1), "temperature"),
        (("a", 4, 0, 1.5), "top_p"),
    ]:
        with pytest.raises(ConfigError, match=words):
            check_request(*args)
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        check_context([[1], []], 4, None)
    with pytest.raises(ConfigError, match="prompt 0 has 6 tokens: with max_new_tokens=5 it passes"):
        check_context([[1] * 6], 5, 10)
