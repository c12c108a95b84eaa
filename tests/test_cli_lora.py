"""Tests of ``qpeft export lora | import lora`` (cli/lora.py): what they refuse to write, through the CLI."""

from __future__ import annotations

import os

import pytest

from qpeft_deploy.cli.main import cli
from tests.helpers import assert_one_line_error, make_adapter, run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(adapter, its PEFT export) of a small MiniLM adapter."""
    folder = tmp_path_factory.mktemp("lora")
    adapter = make_adapter(
        folder / "a.qpeft", {0: "neg", 1: "pos"}, 4, targets=["query"], rank=2, variant="taylor"
    )
    result = run(cli, "export", "lora", adapter, "-o", folder / "peft", "--quiet")
    assert result.exit_code == 0, result.output
    return adapter, folder / "peft"


def test_export_lora_refuses_an_existing_output_and_its_input(files, tmp_path):
    adapter, peft = files
    before = {p.name: p.read_bytes() for p in peft.iterdir()}
    assert_one_line_error(run(cli, "export", "lora", adapter, "-o", peft), "already exists")
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "a.qpeft").write_bytes(adapter.read_bytes())
    result = run(cli, "export", "lora", holder / "a.qpeft", "-o", holder, "--overwrite")
    assert_one_line_error(result, "must not be or contain the input file")
    assert {p.name: p.read_bytes() for p in peft.iterdir()} == before and os.listdir(holder) == ["a.qpeft"]
    assert run(cli, "export", "lora", adapter, "-o", peft, "--overwrite", "--quiet").exit_code == 0


def test_import_lora_refuses_an_existing_output_and_writing_into_its_input(files, tmp_path):
    _, peft = files
    names = sorted(os.listdir(peft))
    (tmp_path / "b.qpeft").write_bytes(b"mine")
    for args, words in (
        (["-o", tmp_path / "b.qpeft"], "already exists"),
        (["-o", peft / "b.qpeft", "--overwrite"], "must lie outside the input folder"),
    ):
        assert_one_line_error(
            run(cli, "import", "lora", peft, *args, "--variant", "taylor", "--quiet"), *words.split(",")
        )
    assert sorted(os.listdir(peft)) == names and (tmp_path / "b.qpeft").read_bytes() == b"mine"
