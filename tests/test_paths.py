"""Tests of qpeft_deploy/io/paths.py: inputs that are not regular files are refused at once, never read."""

from __future__ import annotations

import os
import threading
import time

import pytest

from qpeft_deploy.errors import FormatError
from qpeft_deploy.io.paths import check_regular, open_regular
from qpeft_deploy.io.safetensors import MAX_HEADER, read_header


def test_a_fifo_a_device_and_a_folder_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.qpeft")
    threads = threading.active_count()  # other tests of the session may have left theirs
    cases = {tmp_path / "pipe.qpeft": "FIFO", "/dev/zero": "character device", tmp_path: "folder"}
    for path, kind in cases.items():
        start = time.monotonic()
        with pytest.raises(FormatError, match=f"^{path}: cannot read: is a .*{kind}.*, not a regular file$"):
            read_header(path, MAX_HEADER)  # the one reader of safetensors headers (.qpeft, checkpoints)
        with pytest.raises(FormatError, match=kind):
            check_regular(path)
        assert time.monotonic() - start < 5
    assert threading.active_count() == threads


def test_regular_files_and_links_to_them_open(tmp_path):
    (tmp_path / "a").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    with open_regular(tmp_path / "link") as f:
        assert f.read() == b"data"
    assert check_regular(tmp_path / "a") == tmp_path / "a"
    with pytest.raises(FormatError, match="missing: cannot read: No such file"):
        check_regular(tmp_path / "missing")
