"""Run one base model with many task adapters, picked per request: torch (`AdapterBank`) and ONNX Runtime
(`OrtAdapterSession`), both with the runtime API of docs/CONVENTIONS.md (load / unload / names / adapter per call)."""

from qpeft_deploy.runtime.bank import AdapterBank

__all__ = ["AdapterBank", "OrtAdapterSession"]


def __getattr__(name: str):
    if name == "OrtAdapterSession":  # imported on first use: onnxruntime is heavy to load
        from qpeft_deploy.runtime.ort_session import OrtAdapterSession

        return OrtAdapterSession
    raise AttributeError(name)
