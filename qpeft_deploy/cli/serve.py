"""``qpeft serve``: serve a folder of adapters over HTTP (needs the ``[serve]`` extra: FastAPI + uvicorn)."""

from __future__ import annotations

import click

from qpeft_deploy.cli.options import base_option, quiet_option
from qpeft_deploy.errors import ConfigError


@click.command("serve")
@base_option
@click.option(
    "--adapters",
    required=True,
    help="folder of .qpeft files (served under their stem) and PEFT-native adapter folders (under their name)",
)
@click.option(
    "--engine",
    default="process",
    show_default=True,
    type=click.Choice(["process", "ray"]),
    help="process: one FastAPI process; ray: Ray Serve replicas on a local Ray cluster (extra [ray])",
)
@click.option(
    "--replicas", default=2, show_default=True, type=click.IntRange(1), help="--engine ray: replica count"
)
@click.option(
    "--max-adapters-per-replica",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="--engine ray: adapters each replica keeps loaded (least recently used evicted)",
)
@click.option(
    "--num-cpus",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="--engine ray: CPUs of the local Ray cluster, shared by the replicas",
)
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "onnx"]))
@click.option(
    "--onnx-model",
    default=None,
    help="for --backend onnx: a swappable ONNX export (its folder or model.onnx)",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (loopback by default)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--cache-mb",
    default=256,
    show_default=True,
    type=click.IntRange(0),
    help="byte budget of the materialised U/V cache, in MiB",
)
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(1), help="tokens per text")
@click.option(
    "--max-batch",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="most rows in one mixed batch (and texts in one request)",
)
@click.option(
    "--batch-window-ms",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0),
    help="how long to collect concurrent requests into one batch",
)
@click.option(
    "--max-new-tokens",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="most tokens of one generated answer (a causal-LM base)",
)
@quiet_option
def serve_command(
    base: str,
    adapters: str,
    engine: str,
    replicas: int,
    max_adapters_per_replica: int,
    num_cpus: int,
    backend: str,
    onnx_model: str | None,
    host: str,
    port: int,
    cache_mb: int,
    max_length: int,
    max_batch: int,
    batch_window_ms: float,
    max_new_tokens: int,
    quiet: bool,
) -> None:
    """Serve every adapter in a folder: POST /v1/classify (or /v1/generate on a causal LM such as smollm2),
    GET|POST /v1/adapters, GET /healthz. --engine ray: Ray Serve replicas on a local Ray cluster, each loading
    the adapters that requests name (serve_multiplexed_model_id header) into an LRU (docs/SERVING_AT_SCALE.md)."""
    try:
        from qpeft_deploy.serve.app import ServeSettings, serve
    except ImportError as error:
        raise ConfigError(
            f"qpeft serve needs the [serve] extra (pip install 'qpeft-deploy[serve]'): {error}"
        ) from None
    settings = ServeSettings(
        max_texts=max_batch,
        max_batch_rows=max_batch,
        batch_window_s=batch_window_ms / 1000,
        max_new_tokens=max_new_tokens,
    )
    if engine == "ray":
        if backend != "torch":
            raise ConfigError("--engine ray serves the torch backend only (leave out --backend onnx)")
        _serve_ray(
            host,
            port,
            num_cpus,
            quiet,
            base=base,
            adapters=adapters,
            num_replicas=replicas,
            num_cpus_per_replica=num_cpus / replicas,
            max_adapters_per_replica=max_adapters_per_replica,
            cache_mb=cache_mb,
            max_length=max_length,
            settings=settings,
        )
        return
    serve(
        base,
        adapters,
        backend=backend,
        onnx_model=onnx_model,
        host=host,
        port=port,
        settings=settings,
        cache_bytes=cache_mb << 20,
        max_length=max_length,
        log_level="warning" if quiet else "info",
    )


def _serve_ray(host: str, port: int, num_cpus: int, quiet: bool, **args) -> None:
    """Ray Serve on a local cluster until SIGINT/SIGTERM (one-line error without the [ray] extra)."""
    try:
        from qpeft_deploy.serve.ray_engine import RayServeArgs, serve_local
    except ImportError as error:
        raise ConfigError(
            f"qpeft serve --engine ray needs the [ray] extra (pip install 'qpeft-deploy[ray]'): {error}"
        ) from None
    from qpeft_deploy.models import resolve_base
    from qpeft_deploy.serve.app import adapters_folder

    resolve_base(args["base"])  # a missing base or folder is a one-line error before Ray starts
    adapters_folder(args["adapters"])
    serve_local(RayServeArgs(**args), num_cpus=num_cpus, host=host, port=port, quiet=quiet)
