"""Prometheus metrics of one server (its own registry, so two apps in one process never mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _BatchCollector:
    """Batched-forward counts read from the scheduler's StepBatcher at scrape time."""

    def __init__(self):
        self.scheduler = None

    def collect(self):
        stats = self.scheduler.stats() if self.scheduler is not None else {}
        forwards = CounterMetricFamily("tapestry_batched_forwards", "Decoder forwards run by the step batcher")
        forwards.add_metric([], stats.get("batched_forwards", 0))
        rows = CounterMetricFamily("tapestry_batched_rows", "Generation steps served by those forwards "
                                   "(rows / forwards = mean batch size)")
        rows.add_metric([], stats.get("batched_rows", 0))
        return [forwards, rows]


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tapestry_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("tapestry_request_seconds", "Time from request to last byte of the answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_length = Gauge("tapestry_queue_length", "Generations admitted and waiting to start", registry=r)
        self.active = Gauge("tapestry_active_generations", "Generations running now", registry=r)
        self.rejected = Counter("tapestry_rejected", "Requests refused because the queue was full (429)", registry=r)
        self.cancelled = Counter("tapestry_cancelled", "Generations cancelled (client gone, timeout, shutdown)",
                                 registry=r)
        self.tokens = Counter("tapestry_generated_tokens", "Text tokens generated (rate() = tokens/s)", registry=r)
        self.images = Counter("tapestry_generated_images", "Images generated (rate() = images/s)", registry=r)
        self.steps = Counter("tapestry_denoise_steps", "Denoising steps run", registry=r)
        self.batches = _BatchCollector()
        r.register(self.batches)

    def text(self) -> bytes:
        return generate_latest(self.registry)
