"""zrpc benchmarks: ``python -m bench run [--quick] [--out DIR] [--only NAME,...]``.

Every server runs in its own process and is driven by separate load-generator
processes over TLS on loopback; see ``docs/performance.md`` for the scenarios,
the goals and the latest numbers.
"""
