"""Tests of qpeft_deploy/atomic.py: refusals, crash-safe replacing (real processes killed with SIGKILL in
each window), clean-up of what dead runs left, read-only and full destinations."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qpeft_deploy import atomic
from qpeft_deploy.atomic import atomic_file, atomic_folder, prepare_output, remove_stale, temp_name
from qpeft_deploy.errors import ConfigError


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(text)
    return path


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _killed(code: str) -> None:
    """Run ``code`` (atomic's names imported) in a real process that SIGKILLs itself at ``KILL``."""
    prelude = "import os, signal\nfrom pathlib import Path\nfrom qpeft_deploy.atomic import *\n"
    script = prelude + textwrap.dedent(code).replace("KILL", "os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == -signal.SIGKILL


def test_an_existing_output_is_refused_without_overwrite(tmp_path):
    _folder(tmp_path / "out", "old")
    (tmp_path / "f.qpeft").write_bytes(b"old")
    with (
        pytest.raises(ConfigError, match="out: already exists .--overwrite replaces it."),
        atomic_folder(tmp_path / "out"),
    ):
        pass
    with pytest.raises(ConfigError, match="f.qpeft: already exists"):
        atomic_file(tmp_path / "f.qpeft", b"new", overwrite=False)
    assert (tmp_path / "f.qpeft").read_bytes() == b"old" and (
        tmp_path / "out" / "weights"
    ).read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["f.qpeft", "out"]


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    with pytest.raises(ConfigError, match="late: already exists"), atomic_folder(tmp_path / "late") as tmp:
        (tmp / "weights").write_text("new")
        _folder(tmp_path / "late", "someone else's")
    assert (tmp_path / "late" / "weights").read_text() == "someone else's"
    with pytest.raises(ConfigError, match="late.bin: already exists"):
        atomic_file(
            tmp_path / "late.bin", lambda p: (tmp_path / "late.bin").write_bytes(b"x"), overwrite=False
        )
    assert sorted(os.listdir(tmp_path)) == ["late", "late.bin"]


def test_overwrite_replaces_and_the_kinds_must_match(tmp_path):
    _folder(tmp_path / "out", "old")
    with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (tmp_path / "out" / "weights").read_text() == "new" and os.listdir(tmp_path) == ["out"]
    (tmp_path / "file").write_text("")
    with (
        pytest.raises(ConfigError, match="file: exists and is not a folder"),
        atomic_folder(tmp_path / "file", overwrite=True),
    ):
        pass
    with pytest.raises(ConfigError, match="out: is a folder, not a file name"):
        atomic_file(tmp_path / "out", b"x", overwrite=True)


@pytest.mark.parametrize(
    "output, words",
    [
        ("base", "must lie outside the input folder .*, not be or contain it"),
        (".", "must lie outside the input folder .*, not be or contain it"),
        ("base/sub", "must lie outside the input folder"),
        ("link/sub", "must lie outside the input folder"),
        ("a.qpeft", "must not be or contain the input file"),
        ("alias.qpeft", "must not be or contain the input file"),
    ],
)
def test_the_output_is_never_an_input_or_around_or_inside_one(tmp_path, output, words):
    base = _folder(tmp_path / "base", "base")
    (tmp_path / "link").symlink_to(base)
    (tmp_path / "a.qpeft").write_bytes(b"adapter")
    (tmp_path / "alias.qpeft").symlink_to(tmp_path / "a.qpeft")
    before = sorted(os.listdir(tmp_path))
    protect = [base, tmp_path / "a.qpeft"]
    with (
        pytest.raises(ConfigError, match=words),
        atomic_folder(tmp_path / output, overwrite=True, protect=protect),
    ):
        pass
    if output.endswith(".qpeft"):
        with pytest.raises(ConfigError, match=words):
            atomic_file(tmp_path / output, b"new", overwrite=True, protect=protect)
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "a.qpeft").read_bytes() == b"adapter"
    assert os.listdir(base) == ["weights"]


def test_a_failed_or_interrupted_write_keeps_the_previous_output(tmp_path):
    _folder(tmp_path / "out", "old")
    for error in (RuntimeError("bug"), KeyboardInterrupt(), SystemExit(143)):
        with pytest.raises(type(error)), atomic_folder(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "weights").write_text("half")
            raise error
    assert (tmp_path / "out" / "weights").read_text() == "old" and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replacing_works_with_and_without_renameat2(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", None)  # a kernel or libc without renameat2
    elif atomic._renameat2 is None:
        pytest.skip("no renameat2 here")
    _folder(tmp_path / "out", "old")
    with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    atomic_file(tmp_path / "f", b"1", overwrite=False)
    atomic_file(tmp_path / "f", b"2", overwrite=True)
    assert (tmp_path / "out" / "weights").read_text() == "new" and (tmp_path / "f").read_bytes() == b"2"
    assert sorted(os.listdir(tmp_path)) == ["f", "out"]


@pytest.mark.parametrize(
    "window, code, survivor",
    [
        (
            "while filling",
            """
            with atomic_folder(Path(OUT), overwrite=True) as tmp:
                (tmp / "weights").write_text("new")
                KILL
            """,
            "old",
        ),
        (
            "between the two renames",  # what publish's fallback has done when it is killed there
            """
            out = Path(OUT)
            with atomic_folder(out, overwrite=True) as tmp:
                (tmp / "weights").write_text("new")
                os.rename(out, temp_name(out, "old"))
                KILL
            """,
            "old",
        ),
        (
            "after the swap",
            """
            out = Path(OUT)
            with atomic_folder(out, overwrite=True) as tmp:
                (tmp / "weights").write_text("new")
                assert rename2(tmp, out, RENAME_EXCHANGE)
                KILL
            """,
            "new",
        ),
        (
            "writing a file",
            """
            atomic_file(Path(OUT).parent / "f.qpeft", lambda p: (p.write_bytes(b"half"), KILL))
            """,
            "old",
        ),
    ],
)
def test_a_kill_in_any_window_keeps_one_whole_output_and_the_next_write_cleans_up(
    tmp_path, window, code, survivor
):
    if "swap" in window and atomic._renameat2 is None:
        pytest.skip("no renameat2 here")
    out = _folder(tmp_path / "out", "old")
    (tmp_path / "f.qpeft").write_bytes(b"old")
    _killed(code.replace("OUT", repr(str(out))))
    assert len(os.listdir(tmp_path)) == 3  # the outputs and one leftover of the dead run
    atomic_file(tmp_path / "other.qpeft", b"any write into the folder", overwrite=False)
    assert (out / "weights").read_text() == survivor and (tmp_path / "f.qpeft").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.qpeft", "other.qpeft", "out"]


def test_only_temporaries_of_dead_processes_of_this_host_are_touched(tmp_path):
    out, dead = tmp_path / "out", _dead_pid()
    mine = temp_name(out)
    live = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{os.getppid()}-"))
    gone = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead}-"))
    another = "000000" if atomic.HOST != "000000" else "111111"
    other_host = gone.with_name(gone.name.replace(f"-{atomic.HOST}-", f"-{another}-"))
    not_ours = tmp_path / f".out.tmp-{dead}"
    for path in (mine, live, gone, other_host, not_ours):
        path.mkdir()
    assert remove_stale(tmp_path) == [gone]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (mine, live, other_host, not_ours)
    )


def test_a_read_only_destination_fails_at_once_with_one_line():
    if not Path("/sys").is_dir():
        pytest.skip("no /sys")
    for output, folder in ((Path("/sys/qpeft-test.qpeft"), False), (Path("/sys/qpeft-test"), True)):
        with pytest.raises(ConfigError, match=r"^/sys/qpeft-test(\.qpeft)?: cannot write: \S.*$"):
            prepare_output(output, overwrite=False, folder=folder)
        with pytest.raises(ConfigError, match="cannot write"):
            atomic_file(output, b"x")


def test_a_full_destination_is_one_line_and_leaves_nothing(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(ConfigError, match=r"big.bin: cannot write: File too large$"):
            atomic_file(tmp_path / "big.bin", bytes(5000))
        with (
            pytest.raises(ConfigError, match=r"big: cannot write: File too large$"),
            atomic_folder(tmp_path / "big") as tmp,
        ):
            (tmp / "weights").write_bytes(bytes(5000))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert os.listdir(tmp_path) == []
