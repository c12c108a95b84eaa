"""Atomic outputs: every file and folder the tools write appears whole at its name, or not at all.

A file is written to a temporary name beside its target (``.<name>.<random>.tmp``), flushed to disk and renamed
over the target. A folder is filled under ``.<name>.qpeft-tmp-<pid>-<random>`` and renamed into place; an
existing output it replaces is first renamed to ``...qpeft-old-<pid>-...`` and removed after the swap. A
failure or an interrupt removes the temporary file or folder; temporary folders of killed processes (SIGKILL,
power loss) are removed by the next run that writes the same output. Modes follow the umask (files 0666,
folders 0777 before it), unlike ``tempfile``'s 0600/0700 and safetensors' 0600.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from qpeft_deploy.errors import ConfigError

Writer = Callable[[Path], None]  # writes the whole file at the path it is given


def _cannot_write(path: Path, error: BaseException) -> ConfigError:
    return ConfigError(f"{path}: cannot write: {getattr(error, 'strerror', None) or error}")


def _write_bytes(data: bytes) -> Writer:
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return write


def atomic_file(path: str | Path, content: bytes | Writer) -> Path:
    """Write ``content`` (bytes, or a function that writes the file at the path it gets) to ``path``
    atomically; returns the path. A writer's OSError or RuntimeError becomes a one-line ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a file name")
    write = _write_bytes(content) if isinstance(content, bytes | bytearray) else content
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask sets the mode
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise _cannot_write(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _temp_name(output: Path, kind: str) -> Path:
    return output.with_name(f".{output.name}.qpeft-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(output: Path) -> list[Path]:
    """Remove the temporary folders beside ``output`` of runs whose process died (SIGKILL, power loss)."""
    lead, removed = f".{output.name}.qpeft-", []
    for entry in output.parent.iterdir():
        parts = entry.name[len(lead) :].split("-") if entry.name.startswith(lead) else []
        if (
            len(parts) == 3
            and parts[0] in ("tmp", "old")
            and parts[1].isdigit()
            and int(parts[1]) > 0
            and not _alive(int(parts[1]))
        ):
            _remove(entry)
            removed.append(entry)
    return removed


def _check_output(output: Path, overwrite: bool, protect: Sequence[Path]) -> None:
    if not output.parent.is_dir():
        raise ConfigError(f"{output}: cannot write: folder {output.parent} does not exist")
    real = Path(os.path.realpath(output))
    for folder in protect:
        inside = Path(os.path.realpath(folder))
        if real == inside or real in inside.parents or inside in real.parents:
            raise ConfigError(f"{output}: the output must lie outside the input folder {folder}")
    if os.path.lexists(output) and not overwrite:
        raise ConfigError(f"{output}: already exists (--overwrite replaces it)")


@contextmanager
def atomic_folder(
    output: str | Path, *, overwrite: bool = False, protect: Sequence[Path] = ()
) -> Iterator[Path]:
    """A new folder beside ``output`` to fill: renamed to ``output`` when the block succeeds, else removed.

    An existing ``output`` is replaced only with ``overwrite``; ``protect`` names input folders the output
    may not lie in, contain or be."""
    output = Path(output).absolute()
    _check_output(output, overwrite, protect)
    remove_stale(output)
    tmp = _temp_name(output, "tmp")
    try:
        os.mkdir(tmp, 0o777)
    except OSError as e:
        raise _cannot_write(output, e) from None
    try:
        yield tmp
        if os.path.lexists(output):
            old = _temp_name(output, "old")
            os.rename(output, old)
            os.rename(tmp, output)
            _remove(old)
        else:
            os.rename(tmp, output)
    except OSError as e:
        _remove(tmp)
        raise _cannot_write(output, e) from None
    except BaseException:
        _remove(tmp)
        raise
