"""OrtAdapterSession: the runtime API of CONVENTIONS.md over onnxruntime, for swappable ONNX exports.

``load(name, path)`` takes an onnxruntime adapter file (``qpeft export onnx-adapter``) or a .qpeft file
(converted in memory) and checks it against the model before any run: the parameter names and shapes (the
head's ``num_labels`` axis may differ, so adapters with 2, 6, ... labels share one session), finite values,
the structure id and the base id (and, for onnxruntime adapter files, their integrity digest). onnxruntime
then loads a private copy of exactly the checked parameters, so a file changed after the check cannot reach a
run. A call names its adapter per request (``adapter="a"``) or per row
(``adapter=["a", None, "b"]``): a mixed batch is split per adapter, each part runs with its own
``RunOptions.add_active_adapter`` and the rows are merged back in order. ``None`` runs the exported default.
There is no hidden active adapter, so one session may serve many threads. On a decoder export (a causal LM
with past key/values, any mode) ``generate`` answers prompts like ``AdapterBank.generate``, an adapter per
request or per row (:mod:`qpeft_deploy.runtime.ort_generate`).
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.io.onnx_adapter import (
    PARAM_PREFIX,
    base_id,
    check_values,
    encode_ort_adapter,
    read_onnx_adapter,
    structure_id,
    swap_kind,
    swap_parameters,
)
from qpeft_deploy.io.ort import cpu_session, ort_errors, ort_message
from qpeft_deploy.io.qpeft_file import SUFFIX, read_adapter
from qpeft_deploy.runtime.generation import Generation
from qpeft_deploy.runtime.ort_generate import Decoder, check_prompts, generate

_DEFAULT = object()


@dataclass(frozen=True)
class _Adapter:
    """A loaded adapter: onnxruntime's handle (kept alive here: RunOptions does not own it) and its labels."""

    handle: ort.LoraAdapter
    labels: list[str] | None


class OrtAdapterSession:
    """One onnxruntime session over a swappable ONNX model, serving named adapters per call."""

    def __init__(self, model_path: str | Path, *, threads: int | None = None):
        self.path = Path(model_path)
        try:
            self._session = cpu_session(self.path, threads)
        except ort_errors() as e:
            raise FormatError(f"{self.path}: cannot load the ONNX model ({ort_message(e)})") from None
        meta = self._session.get_modelmeta().custom_metadata_map
        self._swap = meta.get("qpeft.swap")
        self._structure, self._base = int(meta.get("qpeft.structure", 0)), int(meta.get("qpeft.base", 0))
        self._params = {
            i.name: i.shape
            for i in self._session.get_overridable_initializers()
            if i.name.startswith(PARAM_PREFIX)
        }
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._output = self._session.get_outputs()[0].name
        self._default_labels = json.loads(meta.get("qpeft.labels", "[]")) or None
        self._adapters: dict[str, _Adapter] = {}
        self._lock = threading.Lock()
        self._generation: Decoder | None = None  # built on the first generate()
        self.default_adapter: str | None = None

    # ------------------------------------------------------------------------------------------- adapters

    def load(self, name: str, path: str | Path) -> None:
        """Load (or replace) adapter ``name`` from an onnxruntime adapter file, a .qpeft file or a PEFT folder."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"adapter name must be a non-empty string, got {name!r}")
        path = Path(path)
        if self._swap is None:
            raise ConfigError(f"{self.path}: not a swappable model (export it with --mode swappable)")
        structure, base, params, labels = self._read(path)
        self._check(path, structure, base, params)
        adapter = _Adapter(_activate(path, encode_ort_adapter(params, structure, base)), labels)
        with self._lock:
            self._adapters[name] = adapter  # runs in flight keep the adapter they looked up alive

    def _read(self, path: Path) -> tuple[int, int, dict[str, np.ndarray], list[str] | None]:
        if not path.exists():
            raise ConfigError(f"{path}: no such adapter file")
        if path.is_file() and path.suffix != SUFFIX:
            structure, base, params, _ = read_onnx_adapter(path)
            return structure, base, params, None
        info = read_adapter(path)
        labels = info.config.labels() or None
        if self._swap == "angles" and info.config.variant != "pauli":
            raise ConfigError(
                f"{path}: a {info.config.variant} adapter has no circuit angles, but {self.path} is a --swap "
                "angles export: it expects Pauli adapters (serve this one from a --swap factors export)"
            )
        try:
            params = swap_parameters(info, self._swap)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        check_values(path, params)
        return structure_id(info, self._swap), base_id(info.fingerprint), params, labels

    def _check(self, path: Path, structure: int, base: int, params: dict[str, np.ndarray]) -> None:
        """Refuse an adapter that does not fit this model (before any run)."""
        kind = swap_kind(params)
        if kind is not None and kind != self._swap:
            raise ConfigError(
                f"{path}: a --swap {kind} adapter, but {self.path} is a --swap {self._swap} export: it expects "
                f"--swap {self._swap} adapters (qpeft export onnx-adapter --swap {self._swap}, or the .qpeft file)"
            )
        missing, unknown = (
            sorted(self._params.keys() - params.keys()),
            sorted(params.keys() - self._params.keys()),
        )
        if missing or unknown:
            raise ConfigError(
                f"{path}: adapter does not fit {self.path} (other targets, ranks or head): "
                f"missing {missing[:2]}, unknown {unknown[:2]}"
            )
        labels = set()
        for name, value in params.items():
            expected = self._params[name]
            if (
                value.dtype != np.float32
                or value.ndim != len(expected)
                or any(isinstance(e, int) and e != d for e, d in zip(expected, value.shape))
            ):
                raise ConfigError(
                    f"{path}: {name} is {value.dtype}{list(value.shape)}, the model takes float32{expected}"
                )
            labels.update(d for e, d in zip(expected, value.shape) if not isinstance(e, int))
        if len(labels) > 1:
            raise ConfigError(f"{path}: head tensors disagree on the number of labels ({sorted(labels)})")
        if structure != self._structure:
            raise ConfigError(f"{path}: adapter was made for another model structure than {self.path}")
        if base and self._base and base != self._base:
            raise BaseMismatchError(f"{path}: adapter was trained on another base model than {self.path}'s")

    def unload(self, name: str) -> None:
        """Forget adapter ``name``."""
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise ConfigError(f"unknown adapter {name!r}; loaded: {sorted(self._adapters)}")
        if self.default_adapter == name:
            self.default_adapter = None

    def names(self) -> list[str]:
        """Names of the loaded adapters, sorted."""
        with self._lock:
            return sorted(self._adapters)

    def labels(self, name: str | None = None) -> list[str] | None:
        """Label names of adapter ``name`` (None: the exported default), when known."""
        return self._default_labels if name is None else self._lookup([name])[name].labels

    def _lookup(self, names: Sequence[str]) -> dict[str, _Adapter]:
        with self._lock:
            unknown = sorted(set(names) - self._adapters.keys())
            if unknown:
                raise ConfigError(f"unknown adapter {unknown[0]!r}; loaded: {sorted(self._adapters)}")
            return {name: self._adapters[name] for name in names}

    # ----------------------------------------------------------------------------------------------- runs

    def __call__(self, inputs: Mapping, adapter: str | Sequence[str | None] | None = _DEFAULT):
        """The model's first output for ``inputs`` (input_ids, attention_mask, ...), with ``adapter`` (a name,
        None for the exported default, or one entry per row). Returns an array, or for a mixed batch whose
        adapters have different label counts a list of per-row arrays."""
        feeds = self._feeds(inputs)
        rows = len(next(iter(feeds.values())))
        if adapter is _DEFAULT:
            adapter = self.default_adapter
        if adapter is None or isinstance(adapter, str):
            return self._run(feeds, self._lookup([adapter])[adapter] if adapter else None)
        loaded = self._lookup([a for a in dict.fromkeys(self._row_names(adapter, rows)) if a is not None])
        parts = {}
        for name in dict.fromkeys(adapter):
            index = np.array([i for i, a in enumerate(adapter) if a == name])
            parts[name] = (index, self._run({k: v[index] for k, v in feeds.items()}, loaded.get(name)))
        return _merge_rows(parts.values(), rows)

    def generate(
        self,
        prompts: str | Sequence[str],
        adapter: str | Sequence[str | None] | None = _DEFAULT,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """:meth:`AdapterBank.generate <qpeft_deploy.runtime.bank.AdapterBank.generate>` on a decoder export
        (past key/values; any mode): each prompt answered with up to ``max_new_tokens`` tokens, greedy or
        sampled (``temperature``, ``top_p``, ``seed``), with ``adapter`` (a name, None for the exported default,
        or one entry per row: a mixed batch runs per adapter). Every input is checked first."""
        decoder = self._decoder()
        ids = check_prompts(decoder, prompts, max_new_tokens, temperature, top_p)
        names = self._row_names(self.default_adapter if adapter is _DEFAULT else adapter, len(ids))
        loaded = self._lookup([a for a in dict.fromkeys(names) if a is not None])
        options = {name: _run_options(loaded.get(name)) for name in dict.fromkeys(names)}
        return generate(self._session, decoder, ids, names, options, max_new_tokens, temperature, top_p, seed)

    def _decoder(self) -> Decoder:
        with self._lock:
            if self._generation is None:
                self._generation = Decoder.of(self._session, self.path)
            return self._generation

    @staticmethod
    def _row_names(adapter: str | Sequence[str | None] | None, rows: int) -> list[str | None]:
        """One adapter name (or None) per row."""
        if adapter is None or isinstance(adapter, str):
            return [adapter] * rows
        if len(adapter) != rows:
            raise ConfigError(f"{len(adapter)} adapter names for a batch of {rows} rows")
        return list(adapter)

    def _feeds(self, inputs: Mapping) -> dict[str, np.ndarray]:
        """The model's inputs as arrays (token ids int64, pixel values float32); token_type_ids default to 0."""
        feeds = {
            k: np.asarray(v.numpy() if hasattr(v, "numpy") else v)
            for k, v in inputs.items()
            if k in self._inputs
        }
        if "token_type_ids" in self._inputs and "token_type_ids" not in feeds and "input_ids" in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        missing = [name for name in self._inputs if name not in feeds]
        if missing:
            raise ConfigError(f"inputs lack {missing}; the model takes {self._inputs}")
        return {
            k: v.astype(np.float32 if v.dtype.kind == "f" else np.int64, copy=False) for k, v in feeds.items()
        }

    def _run(self, feeds: dict[str, np.ndarray], adapter: _Adapter | None) -> np.ndarray:
        try:
            return self._session.run([self._output], feeds, _run_options(adapter))[0]
        except ort_errors() as e:
            raise ConfigError(
                f"{self.path}: cannot run the model on these inputs ({ort_message(e)})"
            ) from None


def _run_options(adapter: _Adapter | None) -> ort.RunOptions:
    """RunOptions with ``adapter`` active (the caller keeps ``adapter``, and so its handle, alive)."""
    options = ort.RunOptions()
    if adapter is not None:
        options.add_active_adapter(adapter.handle)
    return options


def _activate(path: Path, data: bytes) -> ort.LoraAdapter:
    """onnxruntime's handle of checked adapter bytes, loaded from a private copy: onnxruntime memory-maps the
    file it loads, and the user's file may change or vanish while the adapter serves."""
    handle = ort.LoraAdapter()
    with tempfile.TemporaryDirectory(prefix="qpeft-") as folder:
        copy = Path(folder) / "adapter.onnx_adapter"
        try:
            copy.write_bytes(data)
            handle.Load(str(copy))
        except OSError as e:
            raise ConfigError(
                f"{path}: cannot stage the adapter for onnxruntime: {e.strerror or e}"
            ) from None
        except ort_errors() as e:
            raise FormatError(f"{path}: onnxruntime cannot load the adapter ({ort_message(e)})") from None
    return handle


def _merge_rows(parts, rows: int) -> np.ndarray | list[np.ndarray]:
    """Rows of per-adapter outputs back in batch order: one array, or a list when the row shapes differ."""
    parts = list(parts)
    if len({out.shape[1:] for _, out in parts}) == 1:
        merged = np.empty((rows, *parts[0][1].shape[1:]), parts[0][1].dtype)
        for index, out in parts:
            merged[index] = out
        return merged
    merged_rows: list = [None] * rows
    for index, out in parts:
        for i, row in zip(index, out):
            merged_rows[i] = row
    return merged_rows
