"""Goals, the summary table and the plots of a results file.

``evaluate(results)`` turns the measured cases into one row per goal
(zrpc, peer, ceiling, ratio, met?); with ``--repeat``, ``merge_rounds`` and
``evaluate_rounds`` take the median over the rounds and keep the range, and
``compare_noise`` sets the ``--noise`` figures beside the quiet ones;
``markdown(results)`` renders them;
``plot(results, out, name)`` writes ``<name>-<scenario>.png`` files (Agg
backend). ``python -m bench report FILE`` re-plots and prints the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"zrpc": "#1f77b4", "zrpc-broker": "#2ca02c", "zrpc-broker-zmq": "#98df8a", "grpc": "#d62728", "grpc-uvloop": "#ff9896",
          "bare": "#7f7f7f",
          "raw-pyzmq": "#9467bd"}
SUSTAINED_P99_MS = 50.0
SUSTAINED_DELIVERED = 0.99


def cases(results: dict[str, Any], scenario: str) -> list[dict[str, Any]]:
    return list((results.get("scenarios", {}).get(scenario) or {}).get("cases") or [])


def find(results: dict[str, Any], scenario: str, impl: str, **match: Any) -> dict[str, Any] | None:
    for c in cases(results, scenario):
        if c.get("impl") == impl and all(c.get(k) == v for k, v in match.items()):
            return c
    return None


def _tp(c: dict[str, Any] | None) -> float | None:
    return None if c is None else c.get("throughput")


def _p50(c: dict[str, Any] | None) -> float | None:
    return None if c is None else (c.get("latency_ms") or {}).get("p50")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def best_sustained(results: dict[str, Any], impl: str) -> tuple[dict[str, Any] | None, bool]:
    """The fan-out step with the most deliveries/s that kept p99 < 50 ms and delivered >= 99 %.

    Returns (case, True); when no step qualifies, (the step with the most deliveries/s, False).
    """
    steps = [c for c in cases(results, "fanout") if c.get("impl") == impl]
    ok = [c for c in steps
          if (c.get("latency_ms") or {}).get("p99") is not None
          and c["latency_ms"]["p99"] < SUSTAINED_P99_MS
          and (c.get("delivered_ratio") or 0) >= SUSTAINED_DELIVERED]
    if ok:
        return max(ok, key=lambda c: c["throughput"]), True
    if steps:
        return max(steps, key=lambda c: c["throughput"]), False
    return None, False


GRPC_IMPLS = ("grpc", "grpc-uvloop")


def _faster_grpc(results: dict[str, Any], scenario: str, lower_is_better: bool = False,
                 **match: Any) -> tuple[float | None, str]:
    """grpc.aio's better figure over its two loops (default, uvloop), and which loop gave it."""
    got = []
    for impl in GRPC_IMPLS:
        c = find(results, scenario, impl, **match)
        v = _p50(c) if lower_is_better else _tp(c)
        if v is not None:
            got.append((v, impl))
    if not got:
        return None, "-"
    v, impl = min(got) if lower_is_better else max(got)
    return v, "uvloop" if impl == "grpc-uvloop" else "default loop"


def _met(value: float | None, op: str, threshold: float) -> bool | None:
    if value is None:
        return None
    return value >= threshold if op == ">=" else value <= threshold


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per goal. ``check`` = (field, op, threshold): the field (``ratio`` or ``zrpc``)
    that decides ``met``; grpc.aio figures are its faster loop's."""
    rows: list[dict[str, Any]] = []

    def row(sid: str, scenario: str, goal: str, unit: str, zrpc: float | None, peer: float | None,
            ceiling: float | None, ratio: float | None, check: tuple[str, str, float],
            note: str = "", met: bool | None = None) -> None:
        """``met`` overrides the check (a goal with two conditions; not recomputed over rounds)."""
        value = ratio if check[0] == "ratio" else zrpc
        rows.append({"id": sid, "scenario": scenario, "goal": goal, "unit": unit, "zrpc": zrpc,
                     "peer": peer, "ceiling": ceiling, "ratio": ratio, "check": list(check),
                     "met": _met(value, check[1], check[2]) if met is None else met,
                     "fixed": met is not None, "note": note})

    # 1. unary
    if cases(results, "unary"):
        g64, loop = _faster_grpc(results, "unary", concurrency=64)
        bare = _tp(find(results, "unary", "bare", concurrency=64))
        inproc = _tp(find(results, "unary", "zrpc", concurrency=64))
        for sid, impl, what in (("1a", "zrpc-broker", "via broker"), ("1b", "zrpc", "in-process")):
            z = _tp(find(results, "unary", impl, concurrency=64))
            row(sid, "unary", f"{what} >= 3x grpc.aio calls/s at concurrency 64", "calls/s",
                z, g64, bare, _ratio(z, g64), ("ratio", ">=", 3.0),
                f"grpc.aio on its {loop}; ceiling: bare TLS echo, 64 x 100 B in flight")
        z = _tp(find(results, "unary", "zrpc-broker", concurrency=64))
        row("1c", "unary", "via broker >= 0.75x zrpc in-process calls/s at concurrency 64", "calls/s",
            z, inproc, bare, _ratio(z, inproc), ("ratio", ">=", 0.75), "peer: zrpc in-process")
    # 2. server streaming
    if cases(results, "server_stream"):
        g1, loop = _faster_grpc(results, "server_stream", streams=1)
        bare = _tp(find(results, "server_stream", "bare", streams=1))
        for sid, impl, what in (("2a", "zrpc", "in-process"), ("2b", "zrpc-broker", "via broker")):
            z = _tp(find(results, "server_stream", impl, streams=1))
            row(sid, "server_stream", f"{what} >= 3x grpc.aio msgs/s on one stream", "msgs/s",
                z, g1, bare, _ratio(z, g1), ("ratio", ">=", 3.0),
                f"grpc.aio on its {loop}; ceiling: bare TLS, 64-byte records")
    # 3. ping-pong
    if cases(results, "pingpong"):
        g, loop = _faster_grpc(results, "pingpong", lower_is_better=True)
        bare = _p50(find(results, "pingpong", "bare"))
        for sid, impl, what, want in (("3a", "zrpc", "in-process", 0.5), ("3b", "zrpc-broker", "via broker", 1.0)):
            z = _p50(find(results, "pingpong", impl))
            row(sid, "pingpong", f"{what}: p50 <= {want:g}x grpc.aio in-process", "ms p50",
                z, g, bare, _ratio(z, g), ("ratio", "<=", want),
                f"grpc.aio on its {loop}; zrpc/bare echo = {_ratio(z, bare)}")
    # 4. hop
    if cases(results, "broker_hop"):
        z = _tp(find(results, "broker_hop", "zrpc-broker"))
        raw = _tp(find(results, "broker_hop", "raw-pyzmq"))
        row("4", "broker_hop", ">= 25% of raw pyzmq DEALER/ROUTER round trips/s", "msgs/s",
            z, raw, raw, _ratio(z, raw), ("ratio", ">=", 0.25),
            "zrpc: Echo/Say calls/s at c64 through the broker to 1 worker")
    # 5. fan-out
    if cases(results, "fanout"):
        zc, z_ok = best_sustained(results, "zrpc-broker")
        gbest = [(best_sustained(results, impl), impl) for impl in GRPC_IMPLS if find(results, "fanout", impl)]
        (gc, g_ok), gimpl = max(gbest, key=lambda x: (x[0][1], _tp(x[0][0]) or 0)) if gbest else ((None, False), "-")
        zt, gt = _tp(zc), _tp(gc)
        zp99 = None if zc is None else zc["latency_ms"]["p99"]
        row("5a", "fanout", ">= 100,000 deliveries/s to 1,000 subscribers with p99 < 50 ms",
            "deliveries/s", zt if z_ok else None, gt, None, None, ("zrpc", ">=", 100_000),
            f"best sustained step: {zc['label'] if zc else '-'} (p99 {zp99} ms)" if z_ok else
            f"no step with p99 < 50 ms; best {zt} deliveries/s at p99 {zp99} ms")
        row("5b", "fanout", ">= 3x grpc.aio deliveries/s (p99 < 50 ms)", "deliveries/s",
            zt if z_ok else None, gt, None, _ratio(zt if z_ok else None, gt), ("ratio", ">=", 3.0),
            f"{gimpl}: " + ("best sustained step" if g_ok else "no sustained step; its best step is used"))
    # 6. idle
    if cases(results, "idle"):
        zc = find(results, "idle", "zrpc-broker")
        bc = find(results, "idle", "bare")
        z = None if zc is None else zc.get("rss_per_connection_kib")
        b = None if bc is None else bc.get("rss_per_connection_kib")
        row("6", "idle", "<= 64 KiB broker RSS per idle TLS connection", "KiB/conn", z, b, b, _ratio(z, b),
            ("zrpc", "<=", 64), f"{zc.get('connections') if zc else 0} connections held")
    # 7. durable chat
    if cases(results, "durable_chat"):
        z = _tp(find(results, "durable_chat", "zrpc-broker", method="Chat/SendMessage", keyed=None))
        say = _tp(find(results, "durable_chat", "zrpc-broker", method="Echo/Say"))
        row("7", "durable_chat", ">= 0.9x Echo/Say through the same broker (2 workers, c64)", "sends/s",
            z, say, say, _ratio(z, say), ("ratio", ">=", 0.9),
            "peer: Echo/Say c64 through a broker with the same 2 workers (no storage)")
        pg = _tp(find(results, "durable_chat", "zrpc-broker-pg"))
        r = _ratio(pg, z)
        row("7b", "durable_chat", ">= 50% of the SQLite acked sends/s through PostgreSQL", "sends/s",
            pg, z, None, r, ("ratio", ">=", 0.5),
            "peer: the SQLite store (default); PostgreSQL on this machine, fsync on, server CPU not counted")
        keyed = _tp(find(results, "durable_chat", "zrpc-broker", keyed=True))
        r = _ratio(keyed, z)
        row("7c", "durable_chat", "idempotency keys cost <= 15% of acked sends/s (SQLite)", "sends/s",
            keyed, z, None, r, ("ratio", ">=", 0.85),
            "peer: the same sends without a key (no dedupe lookup, no key row)")
    # 8. QUIC beside TLS/TCP (same server process, cases back to back)
    for c in cases(results, "quic"):
        if c["impl"] != "zrpc-quic":
            continue
        label = c["label"]
        setup = label.startswith("connection set-up")
        tls = find(results, "quic", "zrpc-tls", label="connection set-up" if setup else label)
        if label in ("unary c1", "ping-pong") or setup:
            q, t = _p50(c), _p50(tls)
            r = _ratio(q, t)
            want = 1.0 if setup else 2.0
            goal = ("p50 <= TLS/TCP's full handshake" if setup else "p50 within 2x of TLS/TCP")
            row(f"8 {label} p50", "quic", f"QUIC {label}: {goal}", "ms p50", q, t, None, r,
                ("ratio", "<=", want), "peer: zrpc over TLS/TCP, same server")
        if not setup:
            q, t = _tp(c), _tp(tls)
            r = _ratio(q, t)
            row(f"8 {label}", "quic", f"QUIC {label}: >= 0.5x TLS/TCP throughput", c.get("unit", ""),
                q, t, None, r, ("ratio", ">=", 0.5), "peer: zrpc over TLS/TCP, same server")
    # 9. hostile clients
    if cases(results, "hostile"):
        by = {c.get("attack"): c for c in cases(results, "hostile")}
        for sid, attack in (("9a", "storm"), ("9b", "flood")):
            c = by.get(attack)
            if c is None:
                continue
            row(sid, "hostile", f"{attack}: broker peak RSS <= 256 MiB", "MiB", c["peak_mib"], None, None,
                None, ("zrpc", "<=", 256), f"baseline {c['baseline_mib']} MiB")
            back = round(c["after_10s_mib"] - c["baseline_mib"], 1)
            row(sid + "'", "hostile", f"{attack}: RSS within 32 MiB of baseline 10 s after", "MiB",
                back, None, None, None, ("zrpc", "<=", 32), f"{c['after_10s_mib']} MiB 10 s after")
            lat = c["bystander_ms"]
            ok = lat["max"] is not None and lat["p99"] is not None and lat["max"] <= 1000 and lat["p99"] <= 100
            row(sid + "''", "hostile", f"{attack}: bystander max <= 1 s, p99 <= 100 ms", "ms p99",
                lat["p99"], None, None, None, ("zrpc", "<=", 100), f"max {lat['max']} ms; Health/Check max "
                f"{c['health_ms']['max']} ms, {c['health_ms']['failures']} failed", met=ok)
        for sid, kind in (("9c", "normal"), ("9d", "garbage")):
            c = by.get(f"churn_{kind}")
            if c is not None:
                g = c["growth_after_first_mib"]
                row(sid, "hostile", f"churn ({kind}): RSS growth <= 8 MiB over "
                    f"{c['connections_after_first']} connections after the first 200", "MiB", g, None, None,
                    None, ("zrpc", "<=", 8), f"after each round: {c['rss_mib_after_each_round']}")
    return rows


# ================================================================ repeats, noise
def _median(xs: list[float]) -> float:
    import statistics

    return float(statistics.median(xs))


def _spread(xs: list[float]) -> list[float]:
    return [min(xs), max(xs)]


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scenario, one case per (impl, label): the median over the rounds of throughput,
    latency percentiles, CPU per op and RSS per connection, with each one's [min, max] and values."""
    if len(rounds) == 1:
        return rounds[0]
    merged: dict[str, Any] = {}
    for s in rounds[0]:
        entries = [r[s] for r in rounds if s in r]
        out = {k: v for k, v in entries[0].items() if k not in ("cases", "traceback")}
        out["error"] = "; ".join(e["error"] for e in entries if e.get("error")) or None
        out["wall_s"] = round(sum(e.get("wall_s", 0) for e in entries), 1)
        keys: list[tuple[str, str]] = []
        by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for e in entries:
            for c in e["cases"]:
                key = (c["impl"], c["label"])
                if key not in by_key:
                    keys.append(key)
                by_key.setdefault(key, []).append(c)
        out["cases"] = []
        for key in keys:
            cs = by_key[key]
            m = {k: v for k, v in cs[0].items() if k not in ("rounds", "profile")}
            m["repeats"] = len(cs)
            m["spread"] = {}
            for field in ("throughput", "server_cpu_us_per_op", "rss_per_connection_kib"):
                xs = [c[field] for c in cs if c.get(field) is not None]
                if xs:
                    m[field] = round(_median(xs), 2)
                    m["spread"][field] = _spread(xs)
            lat = dict(m.get("latency_ms") or {})
            for q in ("p50", "p90", "p99", "max"):
                xs = [(c.get("latency_ms") or {}).get(q) for c in cs]
                xs = [x for x in xs if x is not None]
                if xs:
                    lat[q] = round(_median(xs), 4)
                    m["spread"][q] = _spread(xs)
            m["latency_ms"] = lat
            out["cases"].append(m)
        merged[s] = out
    return merged


def evaluate_rounds(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Goal rows of the merged (median) cases; the deciding figure is the median of the
    per-round figures (each round's pair was measured minutes apart at most), with its range."""
    rows = evaluate({"scenarios": merge_rounds(rounds)})
    per = [evaluate({"scenarios": r}) for r in rounds]
    for row in rows:
        field, op, threshold = row["check"]
        xs = [r[field] for rs in per for r in rs if r["id"] == row["id"] and r[field] is not None]
        if xs:
            row[field] = round(_median(xs), 3)
            row["range"] = _spread(xs)
            row["values"] = xs
            if not row["fixed"]:
                row["met"] = _met(row[field], op, threshold)
    return rows


def compare_noise(quiet: list[dict[str, Any]], noisy: list[dict[str, Any]]) -> None:
    """Annotate each quiet goal row with its figure under background load and the change
    (negative = worse; the goal: no ratio gets worse by more than 25 %)."""
    by_id = {r["id"]: r for r in noisy}
    for row in quiet:
        n = by_id.get(row["id"])
        if n is None:
            continue
        field, op, _ = row["check"]
        q, v = row.get(field), n.get(field)
        row["noise"] = v
        row["noise_range"] = n.get("range")
        if q and v:
            change = v / q - 1 if op == ">=" else q / v - 1
            row["noise_change"] = round(change, 3)
            row["noise_ok"] = change >= -0.25


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (unit.startswith("ms ") or abs(v) < 10):
        return f"{v:.3g}"
    if isinstance(v, int | float):
        return f"{v:,.0f}"
    return str(v)


def _fmt_range(r: dict[str, Any], value_key: str, range_key: str, unit: str) -> str:
    v = _fmt(r.get(value_key), unit)
    rng = r.get(range_key)
    if rng and rng[0] != rng[1]:
        v += f" ({_fmt(rng[0], unit)}-{_fmt(rng[1], unit)})"
    return v


def markdown(results: dict[str, Any]) -> str:
    rows = results.get("goals") or evaluate(results)
    settings = results.get("settings") or {}
    head = (f"{results.get('started', '?')}, {results.get('mode', '?')} mode, "
            f"{settings.get('repeat', 1)} round(s); ratios: median (min-max over the rounds)")
    noise = any("noise" in r for r in rows)
    cols = "| # | goal | unit | zrpc | peer | ceiling | ratio | met? |"
    sep = "|---|---|---|---|---|---|---|---|"
    if noise:
        cols += " under noise | change | holds? |"
        sep += "---|---|---|"
    out = [head, "", cols, sep]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        field = r["check"][0] if "check" in r else "ratio"
        ratio = _fmt_range(r, "ratio", "range", "") if field == "ratio" else _fmt(r["ratio"])
        zrpc = _fmt_range(r, "zrpc", "range", r["unit"]) if field == "zrpc" else _fmt(r["zrpc"], r["unit"])
        line = (f"| {r['id']} | {r['goal']} | {r['unit']} | {zrpc} | "
                f"{_fmt(r['peer'], r['unit'])} | {_fmt(r['ceiling'], r['unit'])} | {ratio} | {met} |")
        if noise:
            ok = {True: "yes", False: "**no**", None: "-"}[r.get("noise_ok")]
            ch = r.get("noise_change")
            line += (f" {_fmt_range(r, 'noise', 'noise_range', r['unit'] if field == 'zrpc' else '')} |"
                     f" {'-' if ch is None else f'{ch:+.0%}'} | {ok} |")
        out.append(line)
    return "\n".join(out)


def cases_markdown(results: dict[str, Any]) -> str:
    """Every measured case: throughput, latency, CPU (medians over the rounds, with the range)."""
    out = ["| scenario | impl | case | throughput | p50 ms | p90 ms | p99 ms | max ms | server CPU s | load CPU s | server us/op |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, entry in (results.get("scenarios") or {}).items():
        for c in entry.get("cases") or []:
            lat = c.get("latency_ms") or {}
            sp = c.get("spread") or {}
            extra = f" ({c['rss_per_connection_kib']} KiB/conn)" if c.get("rss_per_connection_kib") is not None else ""
            tp = _fmt(c.get("throughput"))
            if sp.get("throughput") and c.get("repeats", 1) > 1:
                tp += f" ({_fmt(sp['throughput'][0])}-{_fmt(sp['throughput'][1])})"
            p50 = _fmt(lat.get("p50"), "ms")
            if sp.get("p50") and c.get("repeats", 1) > 1:
                p50 += f" ({_fmt(sp['p50'][0], 'ms ')}-{_fmt(sp['p50'][1], 'ms ')})"
            out.append(f"| {s} | {c['impl']} | {c['label']}{extra} | {tp} {c.get('unit', '')} | "
                       f"{p50} | {_fmt(lat.get('p90'), 'ms')} | {_fmt(lat.get('p99'), 'ms')} | "
                       f"{_fmt(lat.get('max'), 'ms')} | {c.get('server_cpu_s', '-')} | {c.get('load_cpu_s', '-')} | "
                       f"{c.get('server_cpu_us_per_op', '-')} |")
    return "\n".join(out)


# ====================================================================== plots
def plot(results: dict[str, Any], out: Path, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    mode = results.get("mode", "")
    machine = results.get("machine", {})
    foot = f"{mode} run, {machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores, Python {machine.get('python', '?')}"

    def save(fig: Any, scenario: str) -> None:
        fig.text(0.99, 0.005, foot, ha="right", va="bottom", fontsize=7, color="#666")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = out / f"{name}-{scenario}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)

    def bars(ax: Any, labels: list[str], values: list[float | None], colors: list[str], fmt: str = "{:,.0f}") -> None:
        vals = [v or 0 for v in values]
        b = ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        for rect, v in zip(b, values, strict=True):
            ax.annotate("-" if v is None else fmt.format(v), (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                        ha="center", va="bottom", fontsize=7)

    def title(s: str) -> str:
        return str((results["scenarios"].get(s) or {}).get("title", s))

    # 1 unary and 2 streaming: grouped throughput + latency
    for s in ("unary", "server_stream"):
        cs = cases(results, s)
        if not cs:
            continue
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        labels = [f"{c['impl']} {c['label']}" for c in cs]
        colors = [COLORS.get(c["impl"], "#333") for c in cs]
        bars(a1, labels, [c["throughput"] for c in cs], colors)
        a1.set_ylabel(cs[0]["unit"])
        a1.set_title(title(s), fontsize=10)
        if s == "server_stream" or any(c["impl"] == "bare" for c in cs):
            a1.set_yscale("log")
        lat = [c for c in cs if (c.get("latency_ms") or {}).get("p50") is not None]
        x = range(len(lat))
        for q, mk in (("p50", "o"), ("p90", "s"), ("p99", "^")):
            a2.scatter(x, [c["latency_ms"][q] for c in lat], marker=mk, label=q)
        a2.set_xticks(list(x))
        a2.set_xticklabels([f"{c['impl']} {c['label']}" for c in lat], rotation=30, ha="right", fontsize=8)
        a2.set_yscale("log")
        a2.set_ylabel("ms" + (" (gap between messages on a stream)" if s == "server_stream" else " per call"))
        a2.legend(fontsize=8)
        a2.grid(axis="y", alpha=.3)
        save(fig, s)

    # 3 ping-pong
    cs = cases(results, "pingpong")
    if cs:
        fig, ax = plt.subplots(figsize=(7, 4))
        w = 0.25
        for k, q in enumerate(("p50", "p90", "p99")):
            vals = [(c.get("latency_ms") or {}).get(q) or 0 for c in cs]
            ax.bar([i + (k - 1) * w for i in range(len(cs))], vals, w, label=q)
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels([c["impl"] for c in cs])
        ax.set_ylabel("round trip, ms")
        ax.set_title(title("pingpong"), fontsize=10)
        ax.legend(fontsize=8)
        save(fig, "pingpong")

    # 4 hop, 7 chat
    for s in ("broker_hop", "durable_chat"):
        cs = cases(results, s)
        if not cs:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [f"{c['impl']}\n{c['label']}" for c in cs]
        vals = [c["throughput"] for c in cs]
        colors = [COLORS.get(c["impl"], "#333") for c in cs]
        if s == "durable_chat":
            say = find(results, "durable_chat", "zrpc-broker", method="Echo/Say")
            if say is not None:
                ax.axhline(0.9 * say["throughput"], color="k", ls="--", lw=1, label="goal: 0.9x Echo/Say")
                ax.legend(fontsize=8)
        bars(ax, labels, vals, colors)
        ax.set_ylabel(cs[0]["unit"])
        ax.set_title(title(s), fontsize=10)
        save(fig, s)

    # 5 fan-out
    cs = cases(results, "fanout")
    if cs:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for impl in sorted({c["impl"] for c in cs}):
            steps = [c for c in cs if c["impl"] == impl]
            xs = [c["offered_per_s"] for c in steps]
            a1.plot(xs, [c["throughput"] for c in steps], "o-", color=COLORS.get(impl), label=impl)
            a2.plot(xs, [c["latency_ms"]["p99"] or 0 for c in steps], "o-", color=COLORS.get(impl), label=f"{impl} p99")
            a2.plot(xs, [c["latency_ms"]["p50"] or 0 for c in steps], "x:", color=COLORS.get(impl), label=f"{impl} p50")
        top = max(c["offered_per_s"] for c in cs)
        a1.plot([0, top], [0, top], "k:", lw=1, label="offered")
        a1.axhline(100_000, color="k", ls="--", lw=1, label="goal 100,000/s")
        a1.set_xlabel("offered deliveries/s (publish rate x 1,000 subscribers)")
        a1.set_ylabel("deliveries/s")
        a1.set_title(title("fanout"), fontsize=10)
        a1.legend(fontsize=8)
        a2.axhline(SUSTAINED_P99_MS, color="k", ls="--", lw=1, label="goal p99 50 ms")
        a2.set_yscale("log")
        a2.set_xlabel("offered deliveries/s")
        a2.set_ylabel("publish-to-delivery latency, ms")
        a2.legend(fontsize=7)
        save(fig, "fanout")

    # 6 idle
    cs = cases(results, "idle")
    if cs:
        fig, ax = plt.subplots(figsize=(6, 4))
        bars(ax, [f"{c['impl']}\n{c.get('connections', 0):,} conns" for c in cs],
             [c.get("rss_per_connection_kib") for c in cs], [COLORS.get(c["impl"], "#333") for c in cs],
             "{:.1f} KiB")
        ax.axhline(64, color="k", ls="--", lw=1, label="goal 64 KiB")
        ax.set_ylabel("server RSS growth per connection, KiB")
        ax.set_title(title("idle"), fontsize=10)
        ax.legend(fontsize=8)
        save(fig, "idle")

    # CPU per operation, every throughput case with a server
    rows = [(f"{s}: {c['impl']} {c['label']}", c["server_cpu_us_per_op"], c.get("load_cpu_us_per_op"), c["impl"])
            for s, e in (results.get("scenarios") or {}).items() if s not in ("fanout", "idle")
            for c in e.get("cases") or [] if c.get("server_cpu_us_per_op") is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.2))
        y = range(len(rows))
        ax.barh([i + 0.2 for i in y], [r[1] for r in rows], 0.4, color=[COLORS.get(r[3], "#333") for r in rows],
                label="server (all processes)")
        ax.barh([i - 0.2 for i in y], [r[2] or 0 for r in rows], 0.4, color="#cccccc", label="load generator")
        ax.set_yticks(list(y))
        ax.set_yticklabels([r[0] for r in rows], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("CPU microseconds per operation (call, message, round trip)")
        ax.invert_yaxis()
        ax.legend(fontsize=8)
        save(fig, "cpu")
    return written
