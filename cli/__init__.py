"""Command-line entry points: ``zrpc-broker``, ``zrpc-worker`` and ``zrpc``."""
