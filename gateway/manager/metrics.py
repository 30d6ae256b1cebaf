"""The manager's Prometheus metrics: dyno starts, ends by result, running dynos, and how
long a dyno takes from request to running process. The front serves them at /metrics
together with its own (it asks over the manager socket)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()

DYNO_STARTS = Counter("gateway_dyno_starts", "Dynos started", ["app", "size"], registry=REGISTRY)
DYNO_ENDS = Counter(
    "gateway_dyno_ends",
    "Dynos ended, by result (exited, stopped, cycled, crashed, unclaimed)",
    ["app", "size", "result"],
    registry=REGISTRY,
)
DYNOS_RUNNING = Gauge(
    "gateway_dynos_running", "Dynos running now", ["app", "size"], registry=REGISTRY
)
DYNO_START_SECONDS = Histogram(
    "gateway_dyno_start_seconds",
    "From the run request to the dyno's process running",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)


def exposition() -> str:
    return generate_latest(REGISTRY).decode()
