"""onnxruntime sessions: quiet CPU sessions and the exception types onnxruntime raises for bad inputs.

Shared by the exporter (it runs what it wrote to compare with torch), the adapter-file reader and the
runtime session. onnxruntime is imported when a function is called, so importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort


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
    """The exception types onnxruntime raises for bad files and models (they do not share a base class)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "InvalidProtobuf",
        "InvalidGraph",
        "RuntimeException",
        "NotImplemented",
    )
    return (RuntimeError, *(getattr(state, name) for name in names if hasattr(state, name)))
