"""The broker <-> worker link, shared by ``broker/`` and ``workers/`` (not part of the zrpc framework).

* :mod:`cluster.link` -- the link as two small interfaces (the broker's end,
  a worker's end, plus the worker's event publisher) that the broker and the
  worker runtime are written against;
* :mod:`cluster.zmqlink` -- their ZeroMQ implementation (ROUTER/DEALER + PUB/SUB);
* :mod:`cluster.zmqio` -- draining a ZeroMQ socket from an asyncio loop;
* :mod:`cluster.wire` -- the commands and bus framing both ends speak, and the
  workers' authenticator (the broker names the principal);
* :mod:`cluster.config` -- the :class:`~cluster.config.WorkerConfig` a broker hands to
  the workers it spawns (the same type ``zrpc-worker`` builds from its options);
* :mod:`cluster.sharding` -- the stable key -> shard function.
"""
