"""`tapestry serve`: the HTTP API (native + OpenAI-compatible), a web page, metrics."""

from __future__ import annotations

from typing import Optional

import typer


def serve_command(
    checkpoint: str = typer.Option("default", help="'default' (the embedded ToyWorld model) or a pipeline folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TAPESTRY_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1/ (or set TAPESTRY_API_KEY)."),
    max_batch: int = typer.Option(16, help="Generations running (and batched step by step) at once."),
    max_queue: int = typer.Option(64, help="Generations waiting beyond those; more are refused with 429."),
    no_batching: bool = typer.Option(False, "--no-batching", help="Run one generation at a time (no cross-request batching)."),
    timeout: float = typer.Option(300.0, help="Seconds a request may take, queueing included."),
    max_steps: int = typer.Option(100, help="Most denoising steps a request may ask for."),
    max_new_tokens: int = typer.Option(1024, help="Most text tokens a request may ask for."),
    max_body_mb: float = typer.Option(16.0, help="Largest request body in MiB."),
    ray: bool = typer.Option(False, "--ray", help="Deploy on Ray Serve (local Ray instance) instead of one uvicorn."),
    replicas: int = typer.Option(1, help="With --ray: replicas of the app, requests spread across them."),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads (default: torch's own choice). "
                                          "1 suits many concurrent small generations on few cores."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No access log."),
) -> None:
    """Serve a checkpoint over HTTP: POST /v1/documents, the OpenAI images and chat endpoints,
    GET /healthz, /metrics and a web page at /.

    Example:

        tapestry serve --port 8000
        curl -s localhost:8000/v1/images/generations -H 'content-type: application/json' \\
             -d '{"prompt": "A small red striped square sits in the centre."}'
    """
    from tapestry.cli import fail
    from tapestry.errors import TapestryError

    try:
        from tapestry.serve.inputs import ServeLimits
    except ImportError as e:
        raise fail(f"tapestry serve needs the serve extra: pip install 'tapestry[serve]' ({e})") from None
    if threads is not None:
        if threads < 1:
            raise fail("--threads must be >= 1")
        import torch

        torch.set_num_threads(threads)
    if replicas < 1 or max_batch < 1 or max_queue < 0 or timeout <= 0:
        raise fail("--replicas and --max-batch must be >= 1, --max-queue >= 0, --timeout > 0")
    if replicas > 1 and not ray:
        raise fail("--replicas needs --ray (one uvicorn process serves one replica)")
    limits = ServeLimits(max_batch=max_batch, max_queue=max_queue, timeout_s=timeout, max_steps=max_steps,
                         max_new_tokens=max_new_tokens, max_body_bytes=int(max_body_mb * 1024 * 1024))
    if ray:
        from tapestry.serve.ray_serve import run_ray

        try:
            run_ray(checkpoint, host, port, replicas, limits, not no_batching, api_key)
        except TapestryError as e:
            raise fail(str(e)) from None
        return
    import logging

    import uvicorn

    from tapestry.infer.pipeline import Pipeline
    from tapestry.serve.app import ServeConfig, create_app

    try:
        pipeline = Pipeline.from_pretrained(checkpoint)
    except TapestryError as e:
        raise fail(str(e)) from None
    config = ServeConfig(limits=limits, batching=not no_batching, api_key=api_key)
    app = create_app(pipeline, config)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    print(f"tapestry serve: {checkpoint} ({pipeline.checkpoint_hash}) on http://{host}:{port}  "
          f"batching={'on' if config.batching else 'off'} max_batch={max_batch} max_queue={max_queue}"
          f"{'  api key required' if api_key else ''}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=int(config.grace_s))
