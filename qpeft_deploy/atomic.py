"""Atomic outputs: every file and folder the tools write appears whole at its name, or not at all.

A file or folder is written under a temporary name beside its target, ``.<name>.qpeft-tmp-<host>-<pid>-<random>``,
and renamed into place at the end. An existing output is replaced only with ``overwrite``, and it survives until
the new one is complete: a folder is swapped in by one ``renameat2(RENAME_EXCHANGE)`` and the old one removed
after (where the system lacks it: renamed aside to ``...qpeft-old-...`` first), a file by ``os.replace``. Without
``overwrite`` the final rename never replaces anything (``RENAME_NOREPLACE``), so an output that appeared
meanwhile is refused too. An output may never be, contain or lie inside one of the command's inputs
(``protect``).

A failure or an interrupt (the CLI turns SIGTERM into an exception) removes the temporary file or folder. What
a killed run leaves (SIGKILL, power loss) is cleaned up by the next write into the same folder: temporaries of
this host's dead processes are removed, and a ``qpeft-old`` backup whose output is missing (a kill between the
two renames of the fallback) is renamed back, so a crash never loses both the previous and the new output.
Modes follow the umask (files 0666, folders 0777 before it), unlike ``tempfile``'s 0600/0700 and safetensors'
0600.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from qpeft_deploy.errors import ConfigError

Writer = Callable[[Path], None]  # writes the whole file at the path it is given

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # linux/fs.h
_AT_FDCWD = -100
HOST = hashlib.blake2s(socket.gethostname().encode(), digest_size=3).hexdigest()  # pids are per host
_TEMP = re.compile(
    r"\.(?P<name>.+)\.qpeft-(?P<kind>tmp|old|probe)-(?P<host>[0-9a-f]{6})-(?P<pid>[1-9][0-9]{0,9})-[0-9a-f]{8}"
)


def _load_renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc ≥ 2.28 / not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def rename2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2(source, target, flags)``; False (nothing done) where the kernel or file system lacks it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def temp_name(output: Path, kind: str = "tmp") -> Path:
    """A temporary name beside ``output`` that says whose it is (host, pid) and what it holds (tmp: the new
    output, old: the replaced one, probe: an empty file that tested the folder)."""
    return output.with_name(f".{output.name}.qpeft-{kind}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean_one(entry: Path) -> bool:
    """Restore or remove one temporary of a dead run of this host; False if it is not one."""
    match = _TEMP.fullmatch(entry.name)
    if match is None or match["host"] != HOST or _alive(int(match["pid"])):
        return False
    target = entry.with_name(match["name"])
    if match["kind"] == "old" and not os.path.lexists(target):
        os.rename(entry, target)  # killed between the fallback's two renames: the previous output comes back
    else:
        _remove(entry)
    return True


def remove_stale(folder: Path) -> list[Path]:
    """Clean up after killed runs in ``folder``: backups whose output is missing are restored, the temporary
    files and folders of dead processes of this host removed; returns what was handled (best effort)."""
    handled = []
    try:
        entries = sorted(folder.iterdir(), key=lambda p: "-old-" not in p.name)  # restore before removing
    except OSError:
        return handled
    for entry in entries:
        try:
            if _clean_one(entry):
                handled.append(entry)
        except OSError:  # another run got there first, or no permission: not ours to fix
            continue
    return handled


def _check_protected(output: Path, protect: Sequence[str | Path]) -> None:
    real = Path(os.path.realpath(output))
    for given in protect:
        inside = Path(os.path.realpath(given))
        if real == inside or real in inside.parents:
            if inside.is_dir():
                raise ConfigError(
                    f"{output}: the output must lie outside the input folder {given}, not be or contain it"
                )
            raise ConfigError(f"{output}: the output must not be or contain the input file {given}")
        if inside in real.parents:
            raise ConfigError(f"{output}: the output must lie outside the input folder {given}")


def _probe(output: Path) -> None:
    """Fail now, not after minutes of work, where the folder cannot take a new file (read-only, no access)."""
    probe = temp_name(output, "probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise _cannot_write(output, e) from None


def prepare_output(
    output: str | Path, *, overwrite: bool, protect: Sequence[str | Path] = (), folder: bool = False
) -> Path:
    """Clean up after killed runs beside ``output``, then refuse an output that may not be written: inside,
    containing or equal to an input (always), existing (unless ``overwrite``), of the wrong kind, or in a
    missing folder. Returns the absolute path. Commands call it before long work; the writers call it again."""
    output = Path(output).absolute()
    if not output.parent.is_dir():
        raise ConfigError(f"{output}: cannot write: folder {output.parent} does not exist")
    _check_protected(output, protect)
    remove_stale(output.parent)
    _probe(output)
    if not os.path.lexists(output):
        return output
    if folder and not output.is_dir():
        raise ConfigError(f"{output}: exists and is not a folder")
    if not folder and output.is_dir():
        raise ConfigError(f"{output}: is a folder, not a file name")
    if not overwrite:
        raise ConfigError(f"{output}: already exists (--overwrite replaces it)")
    return output


def _cannot_write(path: Path, error: BaseException) -> ConfigError:
    if isinstance(error, FileExistsError):
        return ConfigError(f"{path}: already exists (--overwrite replaces it)")
    if isinstance(error, OSError):
        return ConfigError(f"{path}: cannot write: {error.strerror or error}")
    try:  # a library's error (onnxruntime quotes its C++ source): say what the folder says instead
        free = os.statvfs(path.parent).f_bavail
    except OSError:
        free = 1
    reason = (
        "no space left on device" if free == 0 else "write failed (disk full, file size limit or I/O error)"
    )
    return ConfigError(f"{path}: cannot write: {reason}")


def publish(tmp: Path, output: Path, *, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``output``: never over an existing one without ``overwrite``; with it, a
    folder is swapped atomically (or renamed aside and restored on failure) and the old one removed."""
    if not overwrite or not os.path.lexists(output):
        if not rename2(tmp, output, RENAME_NOREPLACE):
            if os.path.lexists(output) and not overwrite:
                raise FileExistsError(errno.EEXIST, "File exists", str(output))
            os.rename(tmp, output)
        return
    if not tmp.is_dir():
        os.replace(tmp, output)
    elif rename2(tmp, output, RENAME_EXCHANGE):
        _remove(tmp)  # now the previous output
    else:
        old = temp_name(output, "old")
        os.rename(output, old)
        try:
            os.rename(tmp, output)
        except BaseException:
            os.rename(old, output)
            raise
        _remove(old)


def _write_bytes(data: bytes) -> Writer:
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return write


def atomic_file(
    path: str | Path, content: bytes | Writer, *, overwrite: bool = True, protect: Sequence[str | Path] = ()
) -> Path:
    """Write ``content`` (bytes, or a function that writes the file at the path it gets) to ``path``
    atomically; returns the path. ``overwrite`` and ``protect`` as in :func:`prepare_output` (the default
    replaces: ``write_adapter`` is "save to a path"; commands pass ``overwrite`` explicitly). A writer's
    OSError or RuntimeError becomes a one-line ConfigError."""
    path = Path(path)
    prepare_output(path, overwrite=overwrite, protect=protect)
    write = _write_bytes(content) if isinstance(content, bytes | bytearray) else content
    tmp = temp_name(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask sets the mode
        write(tmp)
        publish(tmp, path, overwrite=overwrite)
    except (OSError, RuntimeError) as e:
        raise _cannot_write(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_folder(
    output: str | Path, *, overwrite: bool = False, protect: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """A new folder beside ``output`` to fill: published as ``output`` when the block succeeds, else removed.

    An existing ``output`` is replaced only with ``overwrite``; ``protect`` names the inputs (folders, files)
    the output may not be, contain or lie inside."""
    output = prepare_output(output, overwrite=overwrite, protect=protect, folder=True)
    tmp = temp_name(output)
    try:
        os.mkdir(tmp, 0o777)
    except OSError as e:
        raise _cannot_write(output, e) from None
    try:
        yield tmp
        publish(tmp, output, overwrite=overwrite)
    except OSError as e:
        _remove(tmp)
        raise _cannot_write(output, e) from None
    except BaseException:
        _remove(tmp)
        raise
