"""Background load for ``python -m bench run --noise``: keep one core about half busy.

``python -m bench.noise [--duty 0.5] [--period-ms 10]`` spins for ``duty`` of
every period and sleeps the rest, until SIGTERM. One process, one thread:
at most one core, the way a neighbour's build or test run loads a shared
machine. The orchestrator starts it before a scenario's "noise" pass and
stops it afterwards; ``background_cores`` in each case shows what it took.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.noise")
    p.add_argument("--duty", type=float, default=0.5, help="busy share of each period (0-1)")
    p.add_argument("--period-ms", type=float, default=10.0)
    p.add_argument("--max-time", type=float, default=3600.0, help="exit after this many seconds")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    period = args.period_ms / 1e3
    busy = period * min(1.0, max(0.0, args.duty))
    end = time.monotonic() + args.max_time
    x = 0
    while True:
        t0 = time.monotonic()
        if t0 > end:
            return
        while time.monotonic() - t0 < busy:
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF  # busy work, nothing to optimise away
        rest = period - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)  # the idle half of the duty cycle


if __name__ == "__main__":
    main()
