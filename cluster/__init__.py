"""The broker <-> worker link, shared by ``broker/`` and ``workers/`` (not part of the zrpc framework).

* :mod:`cluster.wire` -- the commands and bus framing both ends speak, and the
  workers' authenticator (the broker names the principal);
* :mod:`cluster.zmqio` -- draining a ZeroMQ socket from an asyncio loop;
* :mod:`cluster.sharding` -- the stable key -> shard function.
"""
