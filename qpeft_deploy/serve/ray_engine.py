"""Ray Serve engine (extra ``[ray]``): ``qpeft serve`` past one process, with Ray Serve's model multiplexing.

Each replica of the :data:`DEPLOYMENT` deployment holds one base model (an
:class:`~qpeft_deploy.runtime.bank.AdapterBank`: a MiniLM-style classifier or a causal LM such as SmolLM2) and a
bounded LRU of adapters, loaded by multiplexed id: a request names its adapter in the
``serve_multiplexed_model_id`` header (HTTP) or with ``handle.options(multiplexed_model_id=name)`` (Python), Ray
routes it to a replica that already holds that adapter where it can, and the replica loads ``<name>.qpeft``
(or the PEFT-native folder ``<name>/``) from the configured adapters folder on first use; Ray evicts the least
recently used adapter past ``max_adapters_per_replica`` (:class:`LoadedAdapter.__del__` unloads it from the
bank). An adapter id is a plain name, never a path: it is checked by
:func:`~qpeft_deploy.runtime.bank.check_name` and the resolved file must sit in the folder
(:func:`~qpeft_deploy.serve.app.folder_file`: no ``..``, no absolute path, no symlink out).

Endpoints (the bodies, checks, answers and error statuses of ``serve/app.py``; the adapter a body names must
be the header's, and a body naming one adapter string without the header uses that one):
- ``POST /v1/classify`` ``{"adapter": "<name>", "texts": [...]}`` → :class:`~qpeft_deploy.serve.app.ClassifyResponse`
- ``POST /v1/generate`` (causal-LM base) :class:`~qpeft_deploy.serve.app.GenerateRequest` →
  :class:`~qpeft_deploy.serve.app.GenerateResponse` (no header and no adapter: the base model)
- ``GET /v1/adapters`` → this replica's id and loaded adapters; ``GET /healthz``.
Answers carry ``x-qpeft-replica`` (the replica's id) and, on the request that loaded its adapter into the
replica, ``x-qpeft-load-ms`` and ``x-qpeft-load-cpu-ms`` (wall and thread CPU time of reading, validating and
packing the file into the bank; U and V are built on first use).

Configuration: :func:`build_app` is the application builder (``serve run qpeft_deploy.serve.ray_engine:build_app
base=minilm adapters=/srv/adapters``, or ``import_path`` + ``args`` in a Serve config file), its arguments
:class:`RayServeArgs` (replicas or Ray's ``autoscaling_config``, adapters per replica, limits).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from qpeft_deploy.errors import ConfigError
from qpeft_deploy.runtime.bank import AdapterBank
from qpeft_deploy.serve.app import (
    ApiError,
    ClassifyResponse,
    GenerateResponse,
    ServeSettings,
    adapters_folder,
    classify_request,
    error_response,
    folder_file,
    generate_request,
    generated_text,
    load_file,
    prediction_out,
    read_json,
    redactor,
    validation_message,
)

APP = "qpeft"
DEPLOYMENT = "QpeftAdapters"
MODEL_ID_HEADER = "serve_multiplexed_model_id"  # Ray Serve's multiplexing header
REPLICA_HEADER = "x-qpeft-replica"
LOAD_HEADER = "x-qpeft-load-ms"  # wall time of the load on the replica
LOAD_CPU_HEADER = "x-qpeft-load-cpu-ms"  # CPU time of the loading thread (wall less waiting for a core)
log = logging.getLogger("qpeft.serve")


class RayServeArgs(BaseModel):
    """The application builder's arguments (``args:`` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="the base: 'minilm', 'smollm2' or an HF folder (on every node)")
    adapters: str = Field(description="the adapters folder (the same path on every node)")
    max_adapters_per_replica: int = Field(64, ge=1, description="the LRU bound of each replica")
    num_replicas: int = Field(1, ge=1, description="fixed replica count (without autoscaling)")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Ray's autoscaling_config (replaces num_replicas)"
    )
    num_cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs reserved per replica")
    torch_threads: int = Field(1, ge=1, description="intra-op torch threads per replica")
    max_ongoing_requests: int = Field(8, ge=1, description="requests one replica takes at once")
    cache_mb: int = Field(256, ge=0, description="byte budget of each replica's U/V cache, in MiB")
    max_length: int = Field(128, ge=1, description="tokens per text")
    settings: ServeSettings = Field(ServeSettings(), description="request limits, as qpeft serve's")


class LoadedAdapter:
    """An adapter held in a replica's multiplexing LRU; Ray calls ``__del__`` when it evicts the adapter."""

    def __init__(self, bank: AdapterBank, name: str, load_ms: tuple[float, float]):
        self.bank, self.name, self.load_ms = bank, name, load_ms  # (wall, CPU) ms
        self._live, self._reported = True, False

    def first_load_ms(self) -> tuple[float, float] | None:
        """The (wall, CPU) load time, to the first request that asks (the one that caused the load), then
        None."""
        if self._reported:
            return None
        self._reported = True
        return self.load_ms

    def __del__(self) -> None:
        """Unload the adapter from the bank, once (Ray's eviction, then garbage collection, both call this)."""
        if self._live:
            self._live = False
            if self.name in self.bank.names():
                self.bank.unload(self.name)


class QpeftReplica:
    """One replica: a base model, its AdapterBank, and a multiplexed LRU of adapters read from one folder."""

    def __init__(self, args: RayServeArgs):
        torch.set_num_threads(args.torch_threads)
        self.settings = args.settings
        self.folder = adapters_folder(args.adapters)
        self.bank = AdapterBank.from_pretrained(
            args.base, cache_bytes=args.cache_mb << 20, max_length=args.max_length
        )
        self.bank.digest_base()  # now, not in the first adapter's load
        self.redact = redactor(self.bank, self.folder)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="qpeft-replica")  # the replica's CPU

        async def adapter(name: str) -> LoadedAdapter:
            return await self._in_worker(self._load, name)

        # wired per instance so that the LRU bound comes from the config (Ray detects instance attributes)
        self.adapter = serve.multiplexed(max_num_models_per_replica=args.max_adapters_per_replica)(adapter)

    def _load(self, name: str) -> LoadedAdapter:
        """Load ``name`` from the folder (a plain name whose resolved file sits in the folder) into the bank."""
        path = folder_file(self.folder, name)
        start, cpu = time.perf_counter(), time.thread_time()
        load_file(self.bank, name, path)
        times = ((time.perf_counter() - start) * 1000, (time.thread_time() - cpu) * 1000)
        return LoadedAdapter(self.bank, name, times)

    async def _in_worker(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.worker, lambda: fn(*args, **kwargs))

    async def _run(self, name: str | None, fn, *args, **kwargs) -> tuple[Any, tuple[float, float] | None]:
        """(``fn(*args)`` on the worker with adapter ``name`` loaded, load ms if this call loaded it). An adapter
        evicted between its load and the call (another request's load) is loaded again, once."""
        for attempt in range(2):
            loaded = None if name is None else await self.adapter(name)
            try:
                result = await self._in_worker(fn, *args, **kwargs)
            except ConfigError:
                if name is None or name in self.bank.names() or attempt:
                    raise
                continue
            return result, None if loaded is None else loaded.first_load_ms()
        raise AssertionError("unreachable")

    def _wanted(self, data: object, required: bool) -> str | None:
        """The request's adapter: the multiplexing header's, else the body's one adapter string."""
        header = serve.get_multiplexed_model_id()
        if header:
            return header
        adapter = data.get("adapter") if isinstance(data, dict) else None
        if isinstance(adapter, str):
            return adapter
        if required:
            raise ApiError(
                422, f"name the adapter in the {MODEL_ID_HEADER} header or as the body's one adapter string"
            )
        return None

    async def classify(self, data: object) -> dict:
        """A /v1/classify body → its ClassifyResponse as a dict (the Python handle's entry point)."""
        return (await self._classify(data))[0]

    async def generate(self, data: object) -> dict:
        """A /v1/generate body → its GenerateResponse as a dict (the Python handle's entry point)."""
        return (await self._generate(data))[0]

    async def _classify(self, data: object) -> tuple[dict, tuple[float, float] | None]:
        """A /v1/classify body → (ClassifyResponse as a dict, load ms if this request loaded the adapter)."""
        if self.bank.causal:
            raise ApiError(422, "the served base is a causal language model: use the v1/generate endpoint")
        name = self._wanted(data, required=True)
        _, texts = classify_request(data, self.settings, [name])
        predictions, load_ms = await self._run(name, self.bank.classify, texts, name)
        answer = ClassifyResponse(
            adapter=data["adapter"], predictions=[prediction_out(p) for p in predictions]
        )
        return answer.model_dump(), load_ms

    async def _generate(self, data: object) -> tuple[dict, tuple[float, float] | None]:
        """A /v1/generate body → (GenerateResponse as a dict, load ms if this request loaded the adapter)."""
        if not self.bank.causal:
            raise ApiError(
                422, "the served base is not a causal language model: use the v1/classify endpoint"
            )
        name = self._wanted(data, required=False)
        prompts, adapter, body = generate_request(data, self.settings, [] if name is None else [name])
        generations, load_ms = await self._run(
            name,
            self.bank.generate,
            prompts,
            adapter,
            body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        return GenerateResponse(generations=[generated_text(g) for g in generations]).model_dump(), load_ms

    async def __call__(self, request: Request) -> JSONResponse:
        """The HTTP entry point (Ray's proxy hands every request of the route prefix here)."""
        headers = {REPLICA_HEADER: self.replica}
        try:
            answer, load_ms = await self._route(request)
        except Exception as error:  # noqa: BLE001 - every error is answered (a bug as a logged 500)
            response = error_response(error, self.redact)
            response.headers.update(headers)
            return response
        if load_ms is not None:
            headers[LOAD_HEADER], headers[LOAD_CPU_HEADER] = (f"{ms:.3f}" for ms in load_ms)
        return JSONResponse(answer, headers=headers)

    async def _route(self, request: Request) -> tuple[dict, tuple[float, float] | None]:
        path, method = request.url.path.rstrip("/"), request.method
        if method == "POST" and path.endswith("/v1/classify"):
            return await self._classify(await read_json(request, self.settings.max_body_bytes))
        if method == "POST" and path.endswith("/v1/generate"):
            return await self._generate(await read_json(request, self.settings.max_body_bytes))
        if method == "GET" and path.endswith("/v1/adapters"):
            return {"replica": self.replica, "adapters": self.bank.names()}, None
        if method == "GET" and path.endswith("/healthz"):
            return {"status": "ok", "replica": self.replica, "adapters": len(self.bank.names())}, None
        raise ApiError(404, f"no endpoint {method} {path[:80]}")


def build_app(args: dict[str, Any] | RayServeArgs) -> Application:
    """The Ray Serve application (``serve run qpeft_deploy.serve.ray_engine:build_app``): :class:`QpeftReplica`
    under the name :data:`DEPLOYMENT`, with the replicas and resources of ``args``."""
    try:
        config = args if isinstance(args, RayServeArgs) else RayServeArgs.model_validate(args)
    except ValidationError as error:
        raise ConfigError(f"Ray Serve arguments: {validation_message(error)}") from None
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": config.num_cpus_per_replica},
        "max_ongoing_requests": config.max_ongoing_requests,
    }
    if config.autoscaling is not None:
        options["autoscaling_config"] = config.autoscaling
    else:
        options["num_replicas"] = config.num_replicas
    return serve.deployment(QpeftReplica).options(**options).bind(config)


@contextmanager
def local_cluster(
    num_cpus: int = 2,
    host: str = "127.0.0.1",
    port: int = 8000,
    temp_dir: str | None = None,
    quiet: bool = False,
):
    """A local Ray cluster (``num_cpus`` CPUs, no dashboard, Ray's files under ``temp_dir`` or $RAY_TMPDIR)
    with Serve's HTTP proxy on ``host:port``; Serve and Ray are shut down on exit, whatever happened."""
    import ray

    level = logging.WARNING if quiet else logging.INFO
    logging.getLogger("ray.serve").setLevel(level)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=level,
        _temp_dir=temp_dir,
    )
    try:
        serve.start(http_options={"host": host, "port": port})
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def serve_local(
    args: RayServeArgs, *, num_cpus: int = 2, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False
) -> None:
    """Run the application on a local Ray cluster until SIGINT or SIGTERM, then shut Serve and Ray down."""
    stop = threading.Event()
    with local_cluster(num_cpus, host, port, quiet=quiet):
        # after ray.init, whose core worker installs its own (aborting) SIGTERM handler
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            serve.run(build_app(args), name=APP, route_prefix="/")
            log.info("serving %s on http://%s:%d (Ray Serve, %s)", args.base, host, port, DEPLOYMENT)
            stop.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
