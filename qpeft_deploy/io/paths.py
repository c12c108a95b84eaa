"""What a path given as an input may be: reading opens regular files only, so a FIFO, a device or a folder
named by mistake is refused at once instead of blocking or reading forever."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from qpeft_deploy.errors import FormatError

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def open_regular(path: str | Path) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (symlinks followed); FormatError("<path>: is a
    FIFO ...") otherwise. Opening never blocks: O_NONBLOCK until the type is known. OSError passes through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "of an unknown kind")
            raise FormatError(f"{path}: cannot read: is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | Path) -> Path:
    """``path`` if it names a regular file; FormatError otherwise (``cannot read`` for a missing one)."""
    try:
        open_regular(path).close()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    return Path(path)
