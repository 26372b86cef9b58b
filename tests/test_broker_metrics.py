"""broker.metrics: counters kept as plain ints and dicts are exported on scrape like Prometheus's own."""

from __future__ import annotations

from prometheus_client import generate_latest

from broker.metrics import BrokerMetrics


def scrape(m: BrokerMetrics) -> dict[str, float]:
    text = generate_latest(m.registry).decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_calls_latency_and_byte_counters_on_scrape() -> None:
    m = BrokerMetrics()
    for code in (0, 0, 14):
        m.call_done("Echo/Say", code)
    for seconds in (0.005, 0.2, 30.0):  # on a bound, mid-range, past the last bound
        m.call_latency("Echo/Say", seconds)
    m.bytes_in += 100
    m.frames_to_workers += 3
    v = scrape(m)
    assert v['zrpc_calls_total{method="Echo/Say",status="OK"}'] == 2
    assert v['zrpc_calls_total{method="Echo/Say",status="UNAVAILABLE"}'] == 1
    assert v['zrpc_call_seconds_bucket{le="0.005",method="Echo/Say"}'] == 1
    assert v['zrpc_call_seconds_bucket{le="0.1",method="Echo/Say"}'] == 1
    assert v['zrpc_call_seconds_bucket{le="0.25",method="Echo/Say"}'] == 2
    assert v['zrpc_call_seconds_bucket{le="10.0",method="Echo/Say"}'] == 2
    assert v['zrpc_call_seconds_bucket{le="+Inf",method="Echo/Say"}'] == 3
    assert v['zrpc_call_seconds_count{method="Echo/Say"}'] == 3
    assert abs(v['zrpc_call_seconds_sum{method="Echo/Say"}'] - 30.205) < 1e-9
    assert v["zrpc_bytes_received_total"] == 100 and v["zrpc_worker_messages_sent_total"] == 3
