"""Scale-out: the same app as N Ray Serve replicas behind Ray's HTTP proxy.

Each replica builds the whole app (its own pipeline, scheduler and step batcher) when it starts,
so a replica is exactly one `tapestry serve` process. `max_ongoing_requests` per replica equals
the generations it runs at once: requests beyond that wait in Ray's router, not inside a
replica, so a replica that dies takes only the requests it had started with it; the ones still
waiting go to the replicas that are alive.

    tapestry serve --ray --replicas 2 --port 8000
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from tapestry.errors import TapestryError


def build_deployment(checkpoint: str, limits, batching: bool = True, api_key: str | None = None,
                     replicas: int = 1, cpus_per_replica: float = 1.0):
    """The bound Ray Serve application (not yet running)."""
    try:
        from ray import serve
    except ImportError as e:
        raise TapestryError(f"--ray needs Ray Serve: pip install 'ray[serve]' ({e})") from None

    from tapestry.serve.app import ServeConfig

    config = ServeConfig(limits=limits, batching=batching, api_key=api_key)

    class TapestryReplica:
        def __init__(self, checkpoint: str, config: ServeConfig):
            self.checkpoint, self.config = checkpoint, config

        def __serve_build_asgi_app__(self):
            from tapestry.infer.pipeline import Pipeline
            from tapestry.serve.app import create_app

            return create_app(Pipeline.from_pretrained(self.checkpoint), self.config)

    ingress = serve.ingress()(TapestryReplica)
    deployment = serve.deployment(
        ingress, name="tapestry", num_replicas=replicas,
        max_ongoing_requests=limits.max_batch,
        max_queued_requests=-1,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    return deployment.bind(checkpoint, config)


def start_ray(checkpoint: str, host: str, port: int, replicas: int, limits, batching: bool = True,
              api_key: str | None = None, cpus_per_replica: float = 1.0):
    """Start a local Ray instance and the deployment; returns when every replica is ready."""
    import ray
    from ray import serve

    from tapestry.infer.pipeline import resolve_checkpoint

    resolve_checkpoint(checkpoint)  # a missing checkpoint is one error line here, not a replica crash loop
    # Ray Serve gives its HTTP proxy 5 s to report ready (and 10 s per health check) before it
    # kills it; on a small, busy machine importing the proxy takes longer. The processes Ray
    # starts inherit this environment, so the controller reads these.
    for name, seconds in (("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"), ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")):
        os.environ.setdefault(name, seconds)
    if not ray.is_initialized():
        # address="local": always a fresh instance of our own, never a cluster someone else started
        # replicas import tapestry from the same checkout as this driver
        package_root = str(Path(__file__).resolve().parents[2])
        try:
            ray.init(address="local", include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                     num_cpus=max(2, int(replicas * cpus_per_replica)),
                     runtime_env={"env_vars": {"PYTHONPATH": package_root}})
        except Exception as e:  # noqa: BLE001 - ray raises many types when it cannot start
            raise TapestryError(f"cannot start a local Ray instance: {e}") from None
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(build_deployment(checkpoint, limits, batching, api_key, replicas, cpus_per_replica),
              name="tapestry", route_prefix="/", blocking=False)


def run_ray(checkpoint: str, host: str, port: int, replicas: int, limits, batching: bool = True,
            api_key: str | None = None) -> None:
    """`tapestry serve --ray`: serve until interrupted, then shut Ray Serve down."""
    import ray
    from ray import serve

    start_ray(checkpoint, host, port, replicas, limits, batching, api_key)
    print(f"tapestry serve --ray: {replicas} replica(s) of {checkpoint} on http://{host}:{port}", flush=True)

    def stop(signum, frame):  # SIGTERM (a service manager, kill) shuts down like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
