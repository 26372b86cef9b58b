"""Chat service internals of a shard worker: room state (rooms) and durable history (store)."""
