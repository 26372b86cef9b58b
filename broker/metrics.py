"""Prometheus metrics of the broker (served with ``--metrics-port``).

What the hot path counts (calls by method and status, call latency buckets,
bytes, worker messages, bus events) is kept in plain ints, dicts and lists
on :class:`BrokerMetrics`, added to without a lock or a label lookup, and
exported on scrape by :class:`_CountsCollector` as the same counters and
histogram Prometheus's own classes would give, like the fan-out's sums
(:class:`_FanOutCollector`); only rare events (worker deaths) and live
gauges use prometheus_client's classes. Every metric is listed in
docs/operations.md. Each finished call also goes to the INFO activity log
(:mod:`broker.activity`).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.activity import Activity
from zrpc.status import Status

if TYPE_CHECKING:
    from zrpc.fanout import FanOut

__all__ = ["BrokerMetrics"]


class _FanOutCollector(Collector):
    """The fan-out's running sums, read on scrape, exported as counters."""

    def __init__(self, fan: FanOut) -> None:
        self.fan = fan

    def collect(self) -> Iterator[CounterMetricFamily]:
        fan = self.fan
        yield CounterMetricFamily("zrpc_fanout_deliveries", "Events delivered to attached streams",
                                  value=fan.deliveries)
        yield CounterMetricFamily("zrpc_fanout_gaps", "Sequence gaps detected on the bus", value=fan.gaps)
        yield CounterMetricFamily("zrpc_fanout_repairs", "Gaps repaired from the owning shard",
                                  value=fan.repairs)


#: Upper bounds of the ``zrpc_call_seconds`` buckets (prometheus_client's defaults).
LATENCY_BUCKETS: tuple[float, ...] = tuple(float(b) for b in Histogram.DEFAULT_BUCKETS)


class _CountsCollector(Collector):
    """The broker's plain-int counters, read on scrape."""

    def __init__(self, m: BrokerMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        yield CounterMetricFamily("zrpc_bytes_received", "Bytes received from clients", value=m.bytes_in)
        yield CounterMetricFamily("zrpc_bytes_sent", "Bytes sent to clients", value=m.bytes_out)
        yield CounterMetricFamily("zrpc_worker_messages_sent", "Messages sent to workers",
                                  value=m.frames_to_workers)
        yield CounterMetricFamily("zrpc_worker_messages_received", "Messages from workers",
                                  value=m.frames_from_workers)
        yield CounterMetricFamily("zrpc_bus_events", "Events received from the bus", value=m.bus_events)
        calls = CounterMetricFamily("zrpc_calls", "Calls finished, by method and status",
                                    labels=["method", "status"])
        for (method, status), n in list(m.call_counts.items()):  # a copy: the loop thread adds
            calls.add_metric([method, status], n)
        yield calls
        latency = HistogramMetricFamily("zrpc_call_seconds", "Call latency from OPEN to STATUS",
                                        labels=["method"])
        for method, counts in list(m.latency_counts.items()):
            counts = list(counts)
            cumulative, buckets = 0, []
            for bound, n in zip(LATENCY_BUCKETS, counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([method], buckets, m.latency_sums.get(method, 0.0))
        yield latency


class BrokerMetrics:
    """The broker's Prometheus registry (see docs/operations.md for every metric)."""

    def __init__(self, activity: Activity | None = None) -> None:
        self.activity = activity if activity is not None else Activity(logging.getLogger("zrpc.broker"))
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("zrpc_connections", "Open client connections", registry=r)
        # plain ints and dicts (the hot path adds to them), exported on scrape
        self.call_counts: dict[tuple[str, str], int] = {}
        self.latency_counts: dict[str, list[int]] = {}  # per bucket of LATENCY_BUCKETS, not cumulative
        self.latency_sums: dict[str, float] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_to_workers = 0
        self.frames_from_workers = 0
        self.bus_events = 0
        r.register(_CountsCollector(self))
        self.workers_live = Gauge("zrpc_workers_live", "Workers registered and alive", registry=r)
        self.worker_deaths = Counter("zrpc_worker_deaths_total", "Workers lost (exit or heartbeat expiry)", registry=r)

    def call_done(self, method: str, code: int, message: str = "") -> None:
        status = Status.coerce(code)
        key = (method, status.name)
        counts = self.call_counts
        counts[key] = counts.get(key, 0) + 1
        self.activity.call_done(method, status, message)

    def call_latency(self, method: str, seconds: float) -> None:
        """One routed call's OPEN-to-STATUS time (``zrpc_call_seconds``)."""
        counts = self.latency_counts.get(method)
        if counts is None:
            counts = self.latency_counts[method] = [0] * len(LATENCY_BUCKETS)
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sums[method] = self.latency_sums.get(method, 0.0) + seconds

    def bind(self, fan: FanOut, *, live_workers: Callable[[], int], connections: Callable[[], int]) -> None:
        """Export what is read on scrape: the fan-out's sums and two live counts."""
        self.registry.register(_FanOutCollector(fan))
        self.workers_live.set_function(live_workers)
        self.connections.set_function(connections)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
