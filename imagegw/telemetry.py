"""Prometheus counters of the gateway, served at ``/metrics``.

gunicorn runs several worker processes: with ``PROMETHEUS_MULTIPROC_DIR`` set (the
service sets it, and its gunicorn hooks make and clear the directory), every worker
writes its counters to files there and ``/metrics`` in any worker adds up all of them.
Without it (tests of the manager alone, tools) the counters live in this process.
Without ``prometheus_client`` installed everything here does nothing and ``/metrics``
says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

try:
    import prometheus_client as prom
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # the gateway extra brings it; a bare install just has no /metrics
    prom = None  # type: ignore[assignment]

AVAILABLE = prom is not None
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PULL_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class _Null:
    """Stands in for a metric when prometheus_client is missing."""

    def labels(self, *_a: Any, **_k: Any) -> _Null:
        return self

    def inc(self, *_a: Any) -> None:
        pass

    def observe(self, *_a: Any) -> None:
        pass


if prom is not None:
    PULLS = prom.Counter(
        "shifter_imagegw_pulls", "Pulls that ended, by final state (READY or FAILURE)", ["state"]
    )
    PULL_SECONDS = prom.Histogram(
        "shifter_imagegw_pull_duration_seconds",
        "Time from a pull's start to its end, by final state",
        ["state"],
        buckets=PULL_BUCKETS,
    )
    PULLS_STARTED = prom.Counter("shifter_imagegw_pulls_started", "Pulls started")
    LOOKUPS = prom.Counter(
        "shifter_imagegw_lookups", "Image lookups, by result (found or not_found)", ["result"]
    )
    AUTH_FAILURES = prom.Counter(
        "shifter_imagegw_auth_failures", "Requests refused for their credential"
    )
    ADMIN_ACTIONS = prom.Counter(
        "shifter_imagegw_admin_actions", "Admin actions (expire, autoexpire, import)", ["action"]
    )
    PRUNED_BYTES = prom.Counter(
        "shifter_imagegw_layer_cache_pruned_bytes", "Bytes of layers removed from the cache"
    )
    # Zeros from the start, so a dashboard sees the series before the first event.
    for _state in ("READY", "FAILURE"):
        PULLS.labels(_state)
    # Bound once: lookups are the hot path, and labels() takes a lock and checks its
    # arguments on every call.
    LOOKUPS_FOUND = LOOKUPS.labels("found")
    LOOKUPS_NOT_FOUND = LOOKUPS.labels("not_found")
else:
    PULLS = PULL_SECONDS = PULLS_STARTED = LOOKUPS = AUTH_FAILURES = _Null()  # type: ignore
    LOOKUPS_FOUND = LOOKUPS_NOT_FOUND = _Null()  # type: ignore
    ADMIN_ACTIONS = PRUNED_BYTES = _Null()  # type: ignore


class _QueueDepth:
    """Read at scrape time from the store every worker shares, not counted per process."""

    def __init__(self, depth: Callable[[], dict[str, int]]) -> None:
        self.depth = depth

    def collect(self) -> Iterable[Any]:
        gauge = GaugeMetricFamily(
            "shifter_imagegw_queue_depth",
            "Pulls and imports not yet READY or FAILURE, by status",
            labels=["status"],
        )
        for status, count in sorted(self.depth().items()):
            gauge.add_metric([status], count)
        yield gauge


def render(queue_depth: Callable[[], dict[str, int]]) -> bytes:
    """The exposition text: every worker's counters plus the queue depth."""
    if prom is None:
        raise RuntimeError("prometheus_client is not installed (pip install 'shifter-py[gateway]')")
    registry = prom.CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
        text = b""
    else:
        text = prom.generate_latest(prom.REGISTRY)
    registry.register(_QueueDepth(queue_depth))
    return text + prom.generate_latest(registry)
