"""The front process: TLS edge, routing to shard workers over ZeroMQ, fan-out."""
