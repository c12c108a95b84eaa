"""onnxruntime sessions: quiet CPU sessions, the exception types onnxruntime raises and their one-line messages.

Shared by the exporter (it runs what it wrote to compare with torch), the adapter-file reader and the
runtime session. onnxruntime is imported when a function is called, so importing this module is cheap.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort

MAX_MESSAGE = 200
_SOURCE = re.compile(r"^\S+\.(?:cc|cpp|cxx|c|h|hpp|cu):\d+\s+")  # onnxruntime's C++ source location
_STATUS = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")  # "[ONNXRuntimeError] : 2 : CODE : "


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime SessionOptions with warnings off (and ``threads`` intra-op threads when given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def cpu_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session over the model file at ``path`` (see :func:`session_options`)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def ort_errors() -> tuple[type[Exception], ...]:
    """The exception types onnxruntime raises (RuntimeError and its own classes, which share no base)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = (v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return (RuntimeError, *own)


def _skip_signature(text: str) -> str:
    """``text`` after a leading C++ function signature (up to the space after its top-level argument list)."""
    depth, seen_call = 0, False
    for i, char in enumerate(text):
        if char in "(<":
            seen_call |= char == "(" and depth == 0
            depth += 1
        elif char in ")>":
            depth = max(depth - 1, 0)
        elif char == " " and depth == 0 and seen_call:
            return text[i + 1 :]
    return ""


def ort_message(error: BaseException) -> str:
    """One line of what onnxruntime said, without its C++ source path, function signature or status code."""
    text = " ".join(str(error).split())
    if _SOURCE.match(text):
        text = _skip_signature(_SOURCE.sub("", text, count=1))
    text = _STATUS.sub("", text).strip()
    text = re.sub(r"\S*onnxruntime_src\S*\s*", "", text)  # never quote the build's source tree
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    return text or f"onnxruntime {type(error).__name__}"
