"""Shard worker processes: each worker owns a shard of the chat rooms."""
