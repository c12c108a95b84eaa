"""Tests of qpeft_deploy/cli/signals.py: SIGTERM, SIGHUP and SIGINT during a write leave no temporary file."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

# The writer first takes back Python's KeyboardInterrupt handler: a shell starts background jobs with SIGINT
# ignored and Python keeps an inherited ignored SIGINT ignored, which would hide the SIGINT case under such a shell.
WRITER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from qpeft_deploy.cli.signals import signals_unwind
from qpeft_deploy.atomic import atomic_file, atomic_folder

def slow(path):
    path.write_bytes(b"half")
    time.sleep(600)

with signals_unwind():
    if sys.argv[2] == "file":
        atomic_file(sys.argv[1] + "/out.qpeft", slow, overwrite=False)
    else:
        with atomic_folder(sys.argv[1] + "/out") as tmp:
            slow(tmp / "weights")
"""


@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_a_write_leaves_no_temporary(tmp_path, signum, kind):
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), kind])
    deadline = time.monotonic() + 60
    while not any(p.is_file() and p.stat().st_size for p in tmp_path.rglob("*")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signum)
    code = process.wait(timeout=60)
    assert code == (-signal.SIGINT if signum == signal.SIGINT else 128 + signum)
    assert list(tmp_path.iterdir()) == []
