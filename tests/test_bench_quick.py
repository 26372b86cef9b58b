"""The benchmark harness runs end to end: ``python -m bench run --quick`` (about 1-2 minutes).

Checks the shape of the results only (every scenario, numeric throughput,
machine info, plots): the numbers depend on the machine, so no timing is
asserted. Needs the ``bench`` extra (grpcio, matplotlib), which ``scripts/test`` installs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

# Needs the `bench` extra; scripts/test installs it, so a missing one fails here instead of skipping.
import grpc  # noqa: F401
import matplotlib  # noqa: F401
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["unary", "server_stream", "pingpong", "broker_hop", "fanout", "idle", "durable_chat"]

pytestmark = [pytest.mark.multiprocess]


@pytest.mark.timeout(360)
def test_quick_run_reports_every_scenario(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=330)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-4000:]}"
    results = json.loads((tmp_path / "latest.json").read_text())

    assert results["mode"] == "quick"
    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["python"]
    assert "grpcio" in machine["packages"]
    for name in SCENARIOS:
        entry = results["scenarios"][name]
        assert entry["error"] is None, entry.get("traceback")
        assert entry["cases"], f"{name}: no cases"
        for case in entry["cases"]:
            tp = case["throughput"]
            assert isinstance(tp, int | float) and not isinstance(tp, bool), (name, case)
            assert math.isfinite(tp), (name, case)
            assert "latency_ms" in case and "server_cpu_s" in case, (name, case)
    assert results["goals"], "no goal rows"
    for png in results["plots"]:
        assert (tmp_path / png).stat().st_size > 0
    impls = {c["impl"] for c in results["scenarios"]["unary"]["cases"]}
    assert {"grpc", "grpc-uvloop"} <= impls, impls
    methods = {c.get("method") for c in results["scenarios"]["durable_chat"]["cases"]}
    assert methods == {"Chat/SendMessage", "Echo/Say"}, methods


@pytest.mark.timeout(240)
def test_repeat_and_noise_report_medians_ranges_and_noisy_figures(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--quick", "--only", "broker_hop",
                           "--repeat", "2", "--noise", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-4000:]}"
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["settings"]["repeat"] == 2 and results["settings"]["noise"] is True
    assert [len(results["rounds"][c]) for c in ("quiet", "noise")] == [2, 2]
    assert [e["broker_hop"]["noise"] for e in results["rounds"]["noise"]] == [True, True]
    for case in results["scenarios"]["broker_hop"]["cases"]:
        assert case["repeats"] == 2
        lo, hi = case["spread"]["throughput"]
        assert lo <= case["throughput"] <= hi
    (goal,) = results["goals"]
    assert len(goal["values"]) == 2 and goal["range"] == [min(goal["values"]), max(goal["values"])]
    assert goal["noise"] is not None and "noise_change" in goal
    assert "under noise" in proc.stdout
