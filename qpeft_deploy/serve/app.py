"""``qpeft serve``: an HTTP service over one base model and many adapters (extra ``[serve]``): classification, or
generation on a causal-LM base.

Endpoints (every error is a 4xx/5xx with a JSON body ``{"error": "<message>"}``; the server keeps serving):
- ``POST /v1/classify`` ``{"adapter": "<name>", "texts": ["...", ...]}`` →
  ``{"adapter": name, "predictions": [{"label": "...", "scores": {"<label>": p, ...}}, ...]}``.
  Concurrent requests (any adapters) are collected for ``batch_window_s`` into one mixed batch of at most
  ``max_batch_rows`` rows and classified by one backend call.
- ``POST /v1/generate`` (a causal-LM base, torch backend) :class:`GenerateRequest` ``{"prompts": ["...", ...]}``
  or ``{"prompt": "..."}``, ``"adapter"``: a name, a name (or null: the base) per prompt, or null;
  ``"max_new_tokens"`` (at most ``ServeSettings.max_new_tokens``), ``"temperature"`` (0: greedy), ``"top_p"``,
  ``"seed"`` → :class:`GenerateResponse` ``{"generations": [{"adapter", "text", "tokens", "finish_reason"},
  ...]}``: the bank's :meth:`~qpeft_deploy.runtime.bank.AdapterBank.generate`, a request's prompts being one
  mixed batch (one forward per token). Requests run one at a time on a generation thread (no cross-request
  batching). The schemas are in ``/openapi.json``.
- ``GET /v1/adapters`` → ``{"adapters": [{"name": ..., "labels": [...]}, ...], "skipped": [{"file": ...,
  "error": ...}, ...]}`` (skipped: files of the folder that could not be loaded at start-up).
- ``POST /v1/adapters``: JSON ``{"name": "<name>"}`` loads ``<name>.qpeft`` (or the PEFT-native folder ``<name>/``) from the served adapters folder
  (never any other path: names are plain, and the resolved file must sit in that folder), or an
  ``application/octet-stream`` body with ``?name=<name>`` loads uploaded bytes, validated like any file and
  kept in memory only. Loading an existing name replaces that adapter.
- ``DELETE /v1/adapters/<name>`` unloads; ``GET /healthz`` → ``{"status": "ok", "adapters": n, "skipped": n}``.

Reliability: one bad request harms no other. Each request is validated alone before it is batched (a text with
a lone surrogate is a 422); if a mixed batch still fails, its requests are retried one by one, so only the
request that causes an error gets it (4xx for bad input, 500 for a bug). An adapter file of the folder that
cannot be loaded is logged, listed as skipped and left out; the server starts with the rest. No message names
a server path: the adapters folder and the base folder are named as such, any other absolute path by its file
name.

Status codes: 400 malformed JSON or a corrupt adapter file, 404 unknown adapter (the message lists the loaded
ones), 409 an adapter of another base, 413 body too large, 415 wrong content type, 422 well-formed but invalid
input (types, empty or oversized batch, over-long text or a text the tokenizer refuses, a prompt past the
model's context, /v1/classify on a causal LM or /v1/generate on a classifier, a classification adapter on a
causal LM or the reverse), 500 a bug (answered to the request that hit it only).
A backend is anything with ``load``/``unload``/``names``/``labels``/``classify``
(:class:`Backend`): ``torch`` is :class:`~qpeft_deploy.runtime.bank.AdapterBank` (a mixed batch is one
forward), ``onnx`` is :class:`OrtBackend` over an OrtAdapterSession on a swappable ONNX export (which runs a
mixed batch as one onnxruntime run per adapter, and serves only adapters of the exported targets and ranks).
A backend that generates has ``causal = True`` and ``generate`` (the torch bank on a causal LM); it serves
/v1/generate instead of /v1/classify.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError, QpeftError
from qpeft_deploy.io.peft_folder import CONFIG_FILE
from qpeft_deploy.io.strict_json import strict_json
from qpeft_deploy.models import load_tokenizer, tokenize
from qpeft_deploy.runtime.bank import DEFAULT_CACHE_BYTES, AdapterBank, Generation, Prediction, check_name

BACKENDS = ("torch", "onnx")
DEFAULT_NEW_TOKENS = 32  # a /v1/generate request's max_new_tokens when it gives none (capped by the limit)
SUFFIX = ".qpeft"
log = logging.getLogger("qpeft.serve")


class Backend(Protocol):
    """What the server needs from a runtime (the CONVENTIONS.md runtime API plus labels and classify)."""

    def load(self, name: str, path: str | Path) -> None: ...

    def unload(self, name: str) -> None: ...

    def names(self) -> list[str]: ...

    def labels(self, name: str) -> list[str]: ...

    def classify(
        self, texts: Sequence[str], adapter: str | Sequence[str | None] | None = None
    ) -> list[Prediction]: ...


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one server."""

    max_texts: int = 64  # texts per request
    max_text_chars: int = 4096
    max_batch_rows: int = 64  # rows per mixed batch
    batch_window_s: float = 0.005
    max_body_bytes: int = 4 << 20
    max_upload_bytes: int = 16 << 20
    max_new_tokens: int = 256  # tokens per generated answer (prompts per request: max_texts)


class ApiError(Exception):
    """An HTTP error with a status code and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _status(error: QpeftError) -> int:
    if isinstance(error, BaseMismatchError):
        return 409
    return 400 if isinstance(error, FormatError) else 422


# ------------------------------------------------------------------------------------------- messages

_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/[^\s'\"`:;,()\[\]{}<>]+")


class Redactor:
    """Makes a message safe to send: known server folders named by role, other absolute paths by file name."""

    def __init__(self, folders: dict[Path, str]):
        named = [
            (str(path), role) for path, role in folders.items() if len(str(path)) > 1
        ]  # never "/" itself
        self.folders = sorted(named, key=lambda p: -len(p[0]))

    def __call__(self, message: str) -> str:
        """The one-line, path-free, UTF-8-safe form of ``message``."""
        for path, role in self.folders:  # a file in a known folder by its name, the folder by its role
            message = message.replace(f"{path}/", "").replace(path, role)
        message = _ABSOLUTE_PATH.sub(lambda m: m.group().rstrip("/").rpartition("/")[2] or "/", message)
        line = " ".join(message.split())
        return line.encode("utf-8", "backslashreplace").decode("utf-8")


# ------------------------------------------------------------------------------------------- batching


_NOTHING = object()  # MicroBatcher._collect took no extra queue item


@dataclass
class _Job:
    """One request waiting for the worker."""

    adapters: list[str]  # one per text
    texts: list[str]
    future: Future


class MicroBatcher:
    """Collects requests for a short window and classifies them as one mixed batch on a worker thread."""

    def __init__(self, backend: Backend, window_s: float = 0.005, max_rows: int = 64):
        self.backend, self.window_s, self.max_rows = backend, window_s, max_rows
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="qpeft-batcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Finish queued work and stop the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, adapters: list[str], texts: list[str]) -> Future:
        """A future of the texts' predictions, each under its adapter."""
        job = _Job(adapters, texts, Future())
        self._queue.put(job)
        return job.future

    def _run(self) -> None:
        item = self._queue.get()
        while item is not None:  # None: close() was called
            batch, item = self._collect(item)
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]  # drop abandoned requests
            if live:
                self._execute(live)
            if item is _NOTHING:
                item = self._queue.get()

    def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None | object]:
        """Jobs arriving within the window, up to max_rows rows; returns the batch and the next queue item
        already taken (a job that did not fit, None to stop) or _NOTHING."""
        batch, rows = [first], len(first.texts)
        deadline = time.monotonic() + self.window_s
        while rows < self.max_rows:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None or rows + len(job.texts) > self.max_rows:
                return batch, job
            batch.append(job)
            rows += len(job.texts)
        return batch, _NOTHING

    def _execute(self, batch: list[_Job]) -> None:
        """Classify the batch as one call; if that fails, each job alone, so an error reaches only its cause."""
        try:
            predictions = self._classify(batch)
        except Exception as error:
            if len(batch) > 1:  # one bad request must not fail the others: retry each alone
                for job in batch:
                    self._execute([job])
                return
            if not isinstance(error, QpeftError):  # a bug: logged, answered 500 to this request only
                log.error("classification failed", exc_info=error)
            batch[0].future.set_exception(error)
            return
        start = 0
        for job in batch:
            job.future.set_result(predictions[start : start + len(job.texts)])
            start += len(job.texts)

    def _classify(self, batch: list[_Job]) -> list[Prediction]:
        """One backend call over every row of the batch (RuntimeError when it answers the wrong row count)."""
        texts = [t for job in batch for t in job.texts]
        names = [name for job in batch for name in job.adapters]
        predictions = list(self.backend.classify(texts, adapter=names))
        if len(predictions) != len(texts):
            raise RuntimeError(f"the backend answered {len(predictions)} rows for {len(texts)} texts")
        return predictions


# ------------------------------------------------------------------------------------------- backends, folder


class OrtBackend:
    """The :class:`Backend` protocol over an OrtAdapterSession (swappable ONNX export) and a tokenizer.

    Every adapter must have the structure (targets, ranks) the model was exported with; heads may differ."""

    def __init__(self, session, tokenizer, max_length: int = 128):
        self.session, self.tokenizer, self.max_length = session, tokenizer, max_length
        self._tokenizer_lock = threading.Lock()

    def load(self, name: str, path: str | Path) -> None:
        """Load (or replace) adapter ``name``, checked against the exported model."""
        self.session.load(check_name(name), path)

    def unload(self, name: str) -> None:
        """Forget adapter ``name``."""
        self.session.unload(name)

    def names(self) -> list[str]:
        """Names of the loaded adapters."""
        return self.session.names()

    def labels(self, name: str) -> list[str]:
        """Label names of adapter ``name``."""
        return list(self.session.labels(name) or [])

    def classify(
        self, texts: Sequence[str], adapter: str | Sequence[str | None] | None = None
    ) -> list[Prediction]:
        """Top label and softmax scores per text, one adapter for all or one per row."""
        with self._tokenizer_lock:
            inputs = tokenize(self.tokenizer, list(texts), self.max_length)
        names = [adapter] * len(texts) if adapter is None or isinstance(adapter, str) else list(adapter)
        rows = list(self.session(inputs, adapter=adapter))
        return [_softmax_prediction(name, self.labels(name), row) for name, row in zip(names, rows)]


def _softmax_prediction(adapter: str, labels: list[str], logits: np.ndarray) -> Prediction:
    exp = np.exp(logits - logits.max())
    probs = (exp / exp.sum()).tolist()
    return Prediction(adapter, labels[int(np.argmax(logits))], dict(zip(labels, probs)))


def make_backend(
    kind: str,
    base: str,
    *,
    onnx_model: str | Path | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    max_length: int = 128,
) -> Backend:
    """The runtime serving ``base``: ``torch`` (AdapterBank) or ``onnx`` (OrtAdapterSession over
    ``onnx_model``, a swappable export folder or its model.onnx)."""
    if kind == "torch":
        return AdapterBank.from_pretrained(base, cache_bytes=cache_bytes, max_length=max_length)
    if kind != "onnx":
        raise ConfigError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if onnx_model is None:
        raise ConfigError(
            "the onnx backend serves a swappable ONNX export: give its folder (qpeft export "
            "onnx --mode swappable) as onnx_model / --onnx-model"
        )
    try:
        from qpeft_deploy.io.onnx_adapter import MODEL_FILE
        from qpeft_deploy.runtime.ort_session import OrtAdapterSession
    except ImportError as error:
        raise ConfigError(f"the onnx backend needs the [onnx] extra (onnxruntime): {error}") from None
    path = Path(onnx_model)
    return OrtBackend(
        OrtAdapterSession(path / MODEL_FILE if path.is_dir() else path), load_tokenizer(base), max_length
    )


def adapters_folder(path: str | Path) -> Path:
    """The served adapters folder, resolved (ConfigError when it is not a folder)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{path}: adapters folder not found")
    return folder.resolve()


def folder_file(folder: Path, name: str) -> Path:
    """``<folder>/<name>.qpeft``, or the PEFT-native folder ``<folder>/<name>/``; refuses names that are not
    plain and links that lead out of the served folder."""
    check_name(name)
    for path in (folder / f"{name}{SUFFIX}", folder / name):
        resolved = path.resolve()
        if resolved.parent == folder and _is_adapter(resolved):
            return resolved
    raise ApiError(
        404, f"no adapter file {name}{SUFFIX} (or PEFT folder {name}/) in the served adapters folder"
    )


def _is_adapter(path: Path) -> bool:
    """A ``.qpeft`` file, or a folder holding a PEFT adapter config."""
    return path.is_file() if path.suffix == SUFFIX else (path / CONFIG_FILE).is_file()


def _served(folder: Path) -> list[tuple[str, Path]]:
    """(name, path) of every adapter of the folder: ``*.qpeft`` files by stem, PEFT folders by name."""
    found = [(p.stem, p) for p in folder.glob(f"*{SUFFIX}")]
    found += [(p.name, p) for p in folder.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()]
    return sorted(found)


@dataclass(frozen=True)
class LoadedFolder:
    """What start-up loaded from the adapters folder: the names, and each skipped file's reason (no paths)."""

    names: list[str]
    skipped: dict[str, str]  # file name -> why it was not loaded


def load_folder(backend: Backend, folder: Path) -> LoadedFolder:
    """Load every ``*.qpeft`` file (under its stem) and PEFT-native folder (under its name) of the folder; one
    that fails is logged and skipped."""
    redact = redactor(backend, folder)
    names, skipped = [], {}
    for name, path in _served(folder):
        try:
            load_file(backend, name, folder_file(folder, name))
        except (QpeftError, ApiError) as error:
            skipped[path.name] = redact(str(error))
        except Exception as error:  # a bug while loading one file must not stop the others
            log.error("loading %s failed", path.name, exc_info=error)
            skipped[path.name] = f"internal error ({type(error).__name__})"
        else:
            names.append(name)
            continue
        log.warning("skipped adapter file %s: %s", path.name, skipped[path.name])
    return LoadedFolder(names, skipped)


# ------------------------------------------------------------------------------------------- the app


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> object:
    """The request's JSON body (415 unless application/json, 413 past ``limit`` bytes, 400 malformed)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ApiError(415, "send the body as application/json")
    try:
        return strict_json((await _body(request, limit)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ApiError(400, f"malformed JSON: {str(error).splitlines()[0][:120]}") from None


class ClassifyRequest(BaseModel):
    """The body of ``POST /v1/classify``: the texts and the adapter (one for all, or one per text)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    adapter: str | list[str] = Field(description="one adapter for every text, or one per text")
    texts: list[str] = Field(description="the texts to classify")


class PredictionOut(BaseModel):
    """One text's answer: the adapter that answered, the top label and a probability per label."""

    adapter: str
    label: str
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    """The answer of ``POST /v1/classify``: the adapter(s) as asked and one prediction per text, in order."""

    adapter: str | list[str]
    predictions: list[PredictionOut]


def classify_request(data: object, settings: ServeSettings, names: list[str]) -> tuple[list[str], list[str]]:
    """(one adapter per text, texts) of a /v1/classify body, or ApiError saying what is wrong with it."""
    if not isinstance(data, dict):
        raise ApiError(422, 'the body must be a JSON object {"adapter": "<name>", "texts": ["...", ...]}')
    request = _validated(ClassifyRequest, data)
    _check_texts(request.texts, "texts", settings)
    return _check_adapters(request.adapter, len(request.texts), "texts", names), request.texts


def _validated(model: type[BaseModel], data: object) -> BaseModel:
    """``data`` read as ``model``, or ApiError 422 naming its first problem."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ApiError(422, validation_message(error)) from None


def _check_texts(texts: list[str], field: str, settings: ServeSettings) -> None:
    """ApiError 422 unless there are 1 to max_texts of them, each within max_text_chars and valid Unicode."""
    if not 1 <= len(texts) <= settings.max_texts:
        raise ApiError(
            422, f"{field} must be a list of 1 to {settings.max_texts} strings, got {len(texts)} items"
        )
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            raise ApiError(
                422, f"{field}[{i}] has {len(text)} characters; the limit is {settings.max_text_chars}"
            )
        _check_unicode(text, i, field)


def _check_adapters(
    adapter: str | list[str | None] | None, rows: int, field: str, names: list[str]
) -> list[str | None]:
    """One adapter name (None: the base) per row, after checking the count and that every name is loaded."""
    adapters = adapter if isinstance(adapter, list) else [adapter] * rows
    if len(adapters) != rows:
        raise ApiError(422, f"{len(adapters)} adapter names for {rows} {field}")
    for name in adapters:
        if name is not None and name not in names:
            raise ApiError(404, _unknown(name, names))
    return adapters


def _check_unicode(text: str, i: int, field: str = "texts") -> None:
    """ApiError 422 when ``<field>[i]`` is not encodable text (a lone surrogate, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ApiError(
            422, f"{field}[{i}] is not valid Unicode: a lone surrogate at character {error.start}"
        ) from None


class GenerateRequest(BaseModel):
    """The body of ``POST /v1/generate``: ``prompts`` (or one ``prompt``), the adapter(s) and decoding."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompts: list[str] | None = Field(None, description="prompts, each a user turn of the chat template")
    prompt: str | None = Field(None, description="one prompt (instead of prompts)")
    adapter: str | list[str | None] | None = Field(
        None, description="one adapter for every prompt, or one per prompt; null: the base model"
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="tokens per answer, at most the server's limit (default: 32 or that limit)"
    )
    temperature: float = Field(0.0, ge=0, description="0: greedy; else sampling at this temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set reaching top_p")
    seed: int | None = Field(None, description="seed of the sampling generator (reproducible answers)")

    @model_validator(mode="after")
    def _one_of_prompts_and_prompt(self) -> GenerateRequest:
        if (self.prompts is None) == (self.prompt is None):
            raise ValueError("give either prompts (a list) or prompt (one string)")
        return self

    def texts(self) -> list[str]:
        """The prompts as a list."""
        return [self.prompt] if self.prompt is not None else list(self.prompts)


class GeneratedText(BaseModel):
    """One prompt's answer."""

    adapter: str | None = Field(description="the adapter that answered (null: the base model)")
    text: str
    tokens: list[int] = Field(description="the new token ids, up to and including end-of-sequence")
    finish_reason: Literal["stop", "length"]


class GenerateResponse(BaseModel):
    """The answer of ``POST /v1/generate``: one generation per prompt, in order."""

    generations: list[GeneratedText]


def request_body(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of an endpoint that reads ``model`` from JSON itself (strict JSON and the size
    limit first, then the model), so that /openapi.json shows its schema."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def validation_message(error: ValidationError) -> str:
    """The first problem of a pydantic validation as one line: ``field: message``."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def generate_request(
    data: object, settings: ServeSettings, names: list[str]
) -> tuple[list[str], str | list[str | None] | None, GenerateRequest]:
    """(prompts, adapter(s), request) of a /v1/generate body, or ApiError saying what is wrong with it."""
    request = _validated(GenerateRequest, data)
    prompts = request.texts()
    _check_texts(prompts, "prompts", settings)
    if request.max_new_tokens is None:
        request.max_new_tokens = min(DEFAULT_NEW_TOKENS, settings.max_new_tokens)
    if request.max_new_tokens > settings.max_new_tokens:
        raise ApiError(
            422, f"max_new_tokens is {request.max_new_tokens}; the limit is {settings.max_new_tokens}"
        )
    _check_adapters(request.adapter, len(prompts), "prompts", names)
    return prompts, request.adapter, request


def _unknown(name: str, names: list[str]) -> str:
    loaded = ", ".join(names) if names else "none"
    return f"no adapter named {name[:60]!r} is loaded (loaded: {loaded})"


def generated_text(g: Generation) -> GeneratedText:
    """A bank generation as the response model."""
    return GeneratedText(adapter=g.adapter, text=g.text, tokens=g.tokens, finish_reason=g.finish_reason)


def prediction_out(p: Prediction) -> PredictionOut:
    """A bank prediction as the response model."""
    return PredictionOut(adapter=p.adapter, label=p.label, scores=p.scores)


def redactor(backend: Backend, folder: Path) -> Redactor:
    """The Redactor of a server: its adapters folder and (for the torch bank) its base folder named by role."""
    folders = {folder: "the adapters folder"}
    base_dir = getattr(backend, "base_dir", None)
    if base_dir is not None:
        folders[Path(base_dir)] = "the served base model"
    return Redactor(folders)


def error_response(error: Exception, redact: Redactor) -> JSONResponse:
    """The answer to any error: ``{"error": "<one path-free line>"}`` with its status (ApiError and QpeftError
    by their kind, an HTTPException as raised); anything else is a bug: logged, answered 500."""
    headers = None
    if isinstance(error, ApiError):
        status, message = error.status, str(error)
    elif isinstance(error, QpeftError):
        status, message = _status(error), str(error)
    elif isinstance(error, HTTPException):
        status, message, headers = error.status_code, str(error.detail), error.headers
    else:
        log.error("internal error: %r", error)
        status, message = 500, "internal error"
    return JSONResponse({"error": redact(message)}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI, redact: Redactor) -> None:
    """Every error answers through :func:`error_response`."""

    @app.exception_handler(Exception)
    async def any_error(_: Request, error: Exception) -> JSONResponse:
        return error_response(error, redact)

    for kind in (ApiError, QpeftError, HTTPException):  # before FastAPI's own handlers of these
        app.add_exception_handler(kind, any_error)


def create_app(
    backend: Backend,
    folder: Path,
    settings: ServeSettings = ServeSettings(),
    skipped: dict[str, str] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``backend``; adapters are loaded by name from ``folder`` only; ``skipped``: the
    files start-up could not load and why (listed until a file of that name loads)."""
    batcher = MicroBatcher(backend, settings.batch_window_s, settings.max_batch_rows)
    generator = ThreadPoolExecutor(1, thread_name_prefix="qpeft-generate")  # one generation at a time
    causal = bool(getattr(backend, "causal", False))
    skipped = dict(skipped or {})

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)
            generator.shutdown(wait=True)

    app = FastAPI(title="qpeft serve", lifespan=lifespan)
    _add_error_handlers(app, redactor(backend, folder))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "adapters": len(backend.names()), "skipped": len(skipped)}

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {
            "adapters": [{"name": n, "labels": backend.labels(n)} for n in backend.names()],
            "skipped": [{"file": file, "error": reason} for file, reason in skipped.items()],
        }

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        openapi_extra=request_body(ClassifyRequest),
    )
    async def classify(request: Request) -> ClassifyResponse:
        if causal:
            raise ApiError(422, "the served base is a causal language model: use the v1/generate endpoint")
        data = await read_json(
            request, settings.max_body_bytes
        )  # strict JSON and the size limit, then the model
        adapters, texts = classify_request(data, settings, backend.names())
        try:
            predictions = await asyncio.wrap_future(batcher.submit(adapters, texts))
        except ConfigError:
            names = backend.names()
            for name in adapters:
                if name not in names:  # unloaded while the request waited
                    raise ApiError(404, _unknown(name, names)) from None
            raise
        return ClassifyResponse(adapter=data["adapter"], predictions=[prediction_out(p) for p in predictions])

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        openapi_extra=request_body(GenerateRequest),
    )
    async def generate(request: Request) -> GenerateResponse:
        if not causal:
            raise ApiError(
                422, "the served base is not a causal language model: use the v1/classify endpoint"
            )
        data = await read_json(
            request, settings.max_body_bytes
        )  # strict JSON and the size limit, then the model
        prompts, adapter, body = generate_request(data, settings, backend.names())
        job = generator.submit(
            backend.generate,
            prompts,
            adapter,
            body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        try:
            generations = await asyncio.wrap_future(job)
        except ConfigError:
            names = backend.names()
            for name in adapter if isinstance(adapter, list) else [adapter]:
                if name is not None and name not in names:  # unloaded while the request waited
                    raise ApiError(404, _unknown(name, names)) from None
            raise
        return GenerateResponse(generations=[generated_text(g) for g in generations])

    @app.post("/v1/adapters", status_code=201)
    async def load(request: Request, name: str | None = None) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind == "application/octet-stream":
            name = check_name(name)
            data = await _body(request, settings.max_upload_bytes)
            await run_in_threadpool(_load_bytes, backend, name, data)
        else:
            body = await read_json(request, settings.max_body_bytes)
            if not isinstance(body, dict) or set(body) != {"name"} or not isinstance(body["name"], str):
                raise ApiError(
                    422,
                    'the body must be {"name": "<adapter>"} (the file <adapter>.qpeft in '
                    "the served folder), or adapter bytes as application/octet-stream "
                    "with ?name=",
                )
            name = body["name"]
            await run_in_threadpool(load_file, backend, name, folder_file(folder, name))
            skipped.pop(f"{name}{SUFFIX}", None)
            skipped.pop(name, None)
        return {"name": name, "labels": backend.labels(name)}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str) -> dict:
        if name not in backend.names():
            raise ApiError(404, f"no adapter named {name[:60]!r} is loaded")
        backend.unload(name)
        return {"unloaded": name}

    return app


def load_file(backend: Backend, name: str, path: Path) -> None:
    """Load a file of the served folder, naming it by its file name only in errors."""
    try:
        backend.load(name, path)
    except QpeftError as error:
        raise type(error)(str(error).replace(str(path), path.name)) from None


def _load_bytes(backend: Backend, name: str, data: bytes) -> None:
    """Load uploaded adapter bytes through a private temporary file (validated like any file)."""
    with tempfile.TemporaryDirectory(prefix="qpeft-upload-") as tmp:
        path = Path(tmp) / f"{name}{SUFFIX}"
        path.write_bytes(data)
        try:
            backend.load(name, path)
        except QpeftError as error:
            raise type(error)(str(error).replace(str(path), f"upload {name}")) from None


def serve(
    base: str,
    adapters: str | Path,
    *,
    backend: str = "torch",
    onnx_model: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings = ServeSettings(),
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    max_length: int = 128,
    log_level: str = "info",
) -> None:
    """Load every adapter of the folder onto ``base`` and serve them over HTTP until interrupted."""
    import uvicorn

    folder = adapters_folder(adapters)
    engine = make_backend(
        backend, base, onnx_model=onnx_model, cache_bytes=cache_bytes, max_length=max_length
    )
    loaded = load_folder(engine, folder)
    log.info(
        "serving %d adapters (%d skipped) from %s on %s:%d",
        len(loaded.names),
        len(loaded.skipped),
        folder,
        host,
        port,
    )
    app = create_app(engine, folder, settings, loaded.skipped)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
