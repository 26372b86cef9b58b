"""bench.report's repeat and noise arithmetic on hand-made results (no processes, no timings)."""

from __future__ import annotations

from typing import Any

from bench.report import compare_noise, evaluate_rounds, markdown, merge_rounds


def _case(impl: str, label: str, tp: float, p50: float, **extra: Any) -> dict[str, Any]:
    return {"impl": impl, "label": label, "throughput": tp, "unit": "calls/s",
            "latency_ms": {"p50": p50, "p90": p50, "p99": p50, "max": p50}, **extra}


def _round(zrpc: float, broker: float, grpc: float, grpc_uv: float) -> dict[str, Any]:
    cs = [_case("zrpc", "c64", zrpc, 1.0, concurrency=64),
          _case("zrpc-broker", "c64", broker, 1.0, concurrency=64),
          _case("grpc", "c64", grpc, 1.0, concurrency=64),
          _case("grpc-uvloop", "c64", grpc_uv, 1.0, concurrency=64)]
    return {"unary": {"title": "unary", "cases": cs, "error": None}}


def test_medians_ranges_and_the_faster_grpc_loop() -> None:
    rounds = [_round(100, 80, 30, 40), _round(120, 60, 30, 20), _round(90, 90, 25, 30)]
    merged = merge_rounds(rounds)["unary"]["cases"]
    z = next(c for c in merged if c["impl"] == "zrpc")
    assert (z["throughput"], z["spread"]["throughput"], z["repeats"]) == (100, [90, 120], 3)
    rows = {r["id"]: r for r in evaluate_rounds(rounds)}
    # per round, grpc.aio's faster loop: 40, 30, 30 -> broker ratios 2.0, 2.0, 3.0
    assert rows["1a"]["values"] == [2.0, 2.0, 3.0]
    assert (rows["1a"]["ratio"], rows["1a"]["range"], rows["1a"]["met"]) == (2.0, [2.0, 3.0], False)
    # in-process: 2.5, 4.0, 3.0 -> median 3.0 meets ">= 3x"
    assert (rows["1b"]["ratio"], rows["1b"]["met"]) == (3.0, True)
    # broker vs in-process: 0.8, 0.5, 1.0
    assert (rows["1c"]["ratio"], rows["1c"]["range"], rows["1c"]["met"]) == (0.8, [0.5, 1.0], True)


def test_noise_change_is_negative_when_a_ratio_gets_worse() -> None:
    quiet = evaluate_rounds([_round(100, 80, 25, 20)])
    noisy = evaluate_rounds([_round(100, 50, 25, 20)])
    compare_noise(quiet, noisy)
    row = next(r for r in quiet if r["id"] == "1c")
    assert (row["ratio"], row["noise"], row["noise_change"], row["noise_ok"]) == (0.8, 0.5, -0.375, False)
    same = next(r for r in quiet if r["id"] == "1b")
    assert (same["noise_change"], same["noise_ok"]) == (0.0, True)
    table = markdown({"goals": quiet, "settings": {"repeat": 1}})
    assert "under noise" in table and "-38%" in table


def test_lower_is_better_latency_ratio() -> None:
    def pp(z: float, g: float, guv: float) -> dict[str, Any]:
        return {"pingpong": {"cases": [_case("zrpc", "1 stream", 1, z), _case("zrpc-broker", "1 stream", 1, 2 * z),
                                       _case("grpc", "1 stream", 1, g), _case("grpc-uvloop", "1 stream", 1, guv)],
                             "error": None}}
    quiet = evaluate_rounds([pp(0.1, 0.3, 0.2)])
    noisy = evaluate_rounds([pp(0.2, 0.3, 0.2)])
    compare_noise(quiet, noisy)
    row = next(r for r in quiet if r["id"] == "3a")
    assert (row["peer"], row["ratio"], row["met"]) == (0.2, 0.5, True)  # against uvloop's 0.2 ms
    assert (row["noise"], row["noise_change"], row["noise_ok"]) == (1.0, -0.5, False)
