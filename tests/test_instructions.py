"""qpeft_deploy.data.instructions: instruction versions of the shipped tasks and prompt,response files."""

import json

import pytest

from qpeft_deploy.data.instructions import (
    ANSWERS,
    MAX_WORDS,
    QUESTIONS,
    clip_words,
    instruction,
    is_instruction_task,
    load_instructions,
)
from qpeft_deploy.data.text import TASKS, load_task
from qpeft_deploy.errors import ConfigError


@pytest.mark.parametrize("task", TASKS)
def test_shipped_tasks_are_the_text_tasks_asked_as_questions(task):
    text = load_task(task, max_train=50, max_test=20)
    data = load_instructions(task, max_train=50, max_test=20)
    assert data.answers == ANSWERS[task] and len(ANSWERS[task]) == len(text.labels)
    for (prompt, response), (sentence, label) in zip(
        data.train + data.test, text.train + text.test, strict=True
    ):
        assert response == ANSWERS[task][label]
        assert prompt == QUESTIONS[task].format(text=clip_words(sentence))
        assert " ".join(sentence.split()[:MAX_WORDS]) in " ".join(prompt.split())


def test_answer_words_follow_the_label_ids():
    assert dict(zip(load_task("rt").labels, ANSWERS["rt"], strict=True)) == {
        "rotten": "negative",
        "fresh": "positive",
    }
    assert dict(zip(load_task("sms").labels, ANSWERS["sms"], strict=True)) == {"ham": "ham", "spam": "spam"}
    assert [w[:3] for w in ANSWERS["trec6"]] == [name.lower()[:3] for name in load_task("trec6").labels]
    responses = {r for _, r in load_instructions("trec6").train}
    assert responses == set(ANSWERS["trec6"])


def test_long_texts_are_clipped_at_a_word_budget():
    long = " ".join(f"w{i}" for i in range(100))
    assert clip_words(long) == " ".join(f"w{i}" for i in range(MAX_WORDS)) + " ..."
    assert clip_words("short text") == "short text"
    assert instruction("sms", long).endswith(f"w{MAX_WORDS - 1} ...")
    longest = max(len(p.split()) for p, _ in load_instructions("sms").train)
    assert longest <= MAX_WORDS + len(QUESTIONS["sms"].split()) + 1


def test_task_names():
    for task in (*TASKS, "jsonl:x.jsonl", "csv:x.csv"):
        assert is_instruction_task(task)
    for task in ("mnist", "fmnist-5to9", "json:x", "sst2"):
        assert not is_instruction_task(task)
    with pytest.raises(ConfigError, match="unknown instruction task 'mnist'"):
        load_instructions("mnist")


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n")
    return f"jsonl:{path}"


def test_jsonl_pairs_deduplicated_and_split_deterministically(tmp_path):
    rows = [{"prompt": f"say {i}", "response": f"{i} Arr!", "id": i} for i in range(20)]
    task = write_jsonl(tmp_path / "style.jsonl", [*rows, {"prompt": " say 3 ", "response": "other"}])
    data = load_instructions(task)
    assert len(data.train) == 16 and len(data.test) == 4 and data.answers is None
    pairs = dict(data.train + data.test)
    assert pairs["say 3"] == "3 Arr!" and len(pairs) == 20  # stripped, first response wins
    assert load_instructions(task) == data and load_instructions(task, seed=1) != data
    assert load_instructions(task, max_train=3, max_test=2).train == data.train[:3]


def test_csv_prompt_response(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('prompt,response\n"Capital of France?",Paris\n"2+2?",4\n"Colour of grass?",green\n')
    data = load_instructions(f"csv:{path}")
    assert sorted(data.train + data.test) == [
        ("2+2?", "4"),
        ("Capital of France?", "Paris"),
        ("Colour of grass?", "green"),
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"prompt": "a", "response": "b"', ""], r"line 1 is not valid JSON"),
        (['{"prompt": "a", "response": NaN}'], r"line 1 is not valid JSON"),
        (['["a", "b"]'], r"line 1 is not a JSON object"),
        ([{"prompt": "a", "response": "b"}, {"prompt": "a"}], r"line 2 has no response field"),
        ([{"question": "a"}], r"line 1 has no prompt or response field"),
        ([{"prompt": "a", "response": "  "}], r"line 1 has an empty response"),
        ([{"prompt": "", "response": "b"}], r"line 1 has an empty prompt"),
        ([{"prompt": "a", "response": 3}], r"line 1: response must be a string, got int"),
        ([""], r"jsonl has no prompt,response lines"),
    ],
)
def test_bad_jsonl_is_one_line_naming_file_and_line(tmp_path, rows, message):
    task = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError, match=r"bad\.jsonl: " + message) as error:
        load_instructions(task)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "text,label\nhello,1\n",
            r"csv is missing column\(s\) prompt,response \(need prompt,response; found text,label\)",
        ),
        ("prompt,response\nhello,\n", r"row 2 has an empty response"),
        ("prompt,response\n,world\n", r"row 2 has an empty prompt"),
        ("prompt,response\nhello\n", r"row 2 has too few fields"),
        ("prompt,response\n", r"csv has no data rows"),
    ],
)
def test_bad_csv_is_one_line_naming_file_and_row(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"bad\.csv: " + message):
        load_instructions(f"csv:{path}")


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.jsonl: jsonl file not found"):
        load_instructions(f"jsonl:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(ConfigError, match=r"jsonl path is not a file"):
        load_instructions(f"jsonl:{tmp_path}")
    with pytest.raises(ConfigError, match=r"jsonl: task needs a path"):
        load_instructions("jsonl:")
