"""Prometheus metrics of the broker (served with ``--metrics-port``).

Counters are updated per call and per read/write batch, never per fan-out
delivery (those are summed by the fan-out and exported on scrape).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from zrpc.status import Status

if TYPE_CHECKING:
    from zrpc.fanout import FanOut

__all__ = ["BrokerMetrics"]


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("zrpc_connections", "Open client connections", registry=r)
        self.calls = Counter("zrpc_calls_total", "Calls finished, by method and status",
                             ["method", "status"], registry=r)
        self.bytes_in = Counter("zrpc_bytes_received_total", "Bytes received from clients", registry=r)
        self.bytes_out = Counter("zrpc_bytes_sent_total", "Bytes sent to clients", registry=r)
        self.frames_to_workers = Counter("zrpc_worker_messages_sent_total", "ZeroMQ messages sent to workers", registry=r)
        self.frames_from_workers = Counter("zrpc_worker_messages_received_total", "ZeroMQ messages from workers", registry=r)
        self.fanout_deliveries = Gauge("zrpc_fanout_deliveries", "Events delivered to attached streams", registry=r)
        self.fanout_gaps = Gauge("zrpc_fanout_gaps", "Sequence gaps detected on the bus", registry=r)
        self.fanout_repairs = Gauge("zrpc_fanout_repairs", "Gaps repaired from the owning shard", registry=r)
        self.bus_events = Counter("zrpc_bus_events_total", "Events received from the bus", registry=r)
        self.workers_live = Gauge("zrpc_workers_live", "Workers registered and alive", registry=r)
        self.worker_deaths = Counter("zrpc_worker_deaths_total", "Workers lost (exit or heartbeat expiry)", registry=r)
        self.latency = Histogram("zrpc_call_seconds", "Call latency from OPEN to STATUS", ["method"], registry=r)

    def call_done(self, method: str, code: int) -> None:
        self.calls.labels(method, Status.coerce(code).name).inc()

    def bind(self, fan: FanOut, *, live_workers: Callable[[], int], connections: Callable[[], int]) -> None:
        """Export what is read on scrape: the fan-out's sums and two live counts."""
        self.fanout_deliveries.set_function(lambda: fan.deliveries)
        self.fanout_gaps.set_function(lambda: fan.gaps)
        self.fanout_repairs.set_function(lambda: fan.repairs)
        self.workers_live.set_function(live_workers)
        self.connections.set_function(connections)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
