"""Declaring services: methods, their cardinality, message types, shard keys.

Cardinality is data (as in grpclib): an enum of client-streaming x
server-streaming. A :class:`ServiceSpec` is the contract (what a generated
stub package would hold) shared by clients, the broker and workers; a
:class:`Service` binds handlers to a spec's methods.

Handler signatures by cardinality::

    UNARY          async def h(request, context) -> response
    CLIENT_STREAM  async def h(call) -> response          # async for m in call
    SERVER_STREAM  async def h(request, call) -> None     # await call.send(r)
    BIDI           async def h(call) -> None              # recv() / send()
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Cardinality", "Handler", "Method", "MethodSpec", "Service", "ServiceSpec"]


class Cardinality(enum.Enum):
    """(client streams, server streams)."""

    UNARY = (False, False)
    CLIENT_STREAM = (True, False)
    SERVER_STREAM = (False, True)
    BIDI = (True, True)

    @property
    def client_streaming(self) -> bool:
        return self.value[0]

    @property
    def server_streaming(self) -> bool:
        return self.value[1]

    @property
    def wire_name(self) -> str:
        return self.name.lower()


Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class MethodSpec:
    """One method of a contract. ``name`` is the full ``Service/Method`` name."""

    name: str
    cardinality: Cardinality
    request_type: Any = None
    response_type: Any = None
    shard_key: str | None = None  # request field whose value picks the shard

    def __post_init__(self) -> None:
        service, _, method = self.name.partition("/")
        if not service or not method or "/" in method:
            raise ValueError(f"method name must be 'Service/Method', got {self.name!r}")

    def describe(self) -> dict[str, Any]:
        """What reflection (``zrpc list``) and the broker's routing table need."""
        return {
            "name": self.name,
            "kind": self.cardinality.wire_name,
            "shard_key": self.shard_key,
            "request": getattr(self.request_type, "__name__", None),
            "response": getattr(self.response_type, "__name__", None),
        }


@dataclass(frozen=True)
class Method:
    """A method spec bound to its handler."""

    spec: MethodSpec
    handler: Handler


@dataclass
class ServiceSpec:
    """A contract: a named set of method specs."""

    name: str
    methods: dict[str, MethodSpec] = field(default_factory=dict)

    def _add(self, short: str, cardinality: Cardinality, request: Any, response: Any,
             shard_key: str | None) -> MethodSpec:
        spec = MethodSpec(f"{self.name}/{short}", cardinality, request, response, shard_key)
        if spec.name in self.methods:
            raise ValueError(f"method {spec.name} declared twice")
        self.methods[spec.name] = spec
        return spec

    def unary(self, short: str, request: Any, response: Any, *,
              shard_key: str | None = None) -> MethodSpec:
        return self._add(short, Cardinality.UNARY, request, response, shard_key)

    def client_stream(self, short: str, request: Any, response: Any, *,
                      shard_key: str | None = None) -> MethodSpec:
        return self._add(short, Cardinality.CLIENT_STREAM, request, response, shard_key)

    def server_stream(self, short: str, request: Any, response: Any, *,
                      shard_key: str | None = None) -> MethodSpec:
        return self._add(short, Cardinality.SERVER_STREAM, request, response, shard_key)

    def bidi(self, short: str, request: Any, response: Any, *,
             shard_key: str | None = None) -> MethodSpec:
        return self._add(short, Cardinality.BIDI, request, response, shard_key)

    def __iter__(self) -> Iterator[MethodSpec]:
        return iter(self.methods.values())


class Service:
    """Handlers bound to a contract (or declared ad hoc).

    >>> svc = Service("Echo")
    >>> @svc.unary("Say", request=dict, response=dict)
    ... async def say(request, context): return request
    """

    def __init__(self, spec: ServiceSpec | str) -> None:
        self.spec = spec if isinstance(spec, ServiceSpec) else ServiceSpec(spec)
        self.methods: dict[str, Method] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    def implement(self, method: MethodSpec | str) -> Callable[[Handler], Handler]:
        """Decorator binding a handler to a method of the spec."""
        spec = method if isinstance(method, MethodSpec) else self.spec.methods[
            method if "/" in method else f"{self.spec.name}/{method}"]
        if spec.name not in self.spec.methods:
            raise KeyError(f"{spec.name} is not a method of service {self.spec.name}")

        def bind(fn: Handler) -> Handler:
            self.methods[spec.name] = Method(spec, fn)
            return fn
        return bind

    def _declare(self, short: str, cardinality: Cardinality, request: Any, response: Any,
                 shard_key: str | None) -> Callable[[Handler], Handler]:
        spec = self.spec._add(short, cardinality, request, response, shard_key)
        return self.implement(spec)

    def unary(self, short: str, *, request: Any = None, response: Any = None,
              shard_key: str | None = None) -> Callable[[Handler], Handler]:
        return self._declare(short, Cardinality.UNARY, request, response, shard_key)

    def client_stream(self, short: str, *, request: Any = None, response: Any = None,
                      shard_key: str | None = None) -> Callable[[Handler], Handler]:
        return self._declare(short, Cardinality.CLIENT_STREAM, request, response, shard_key)

    def server_stream(self, short: str, *, request: Any = None, response: Any = None,
                      shard_key: str | None = None) -> Callable[[Handler], Handler]:
        return self._declare(short, Cardinality.SERVER_STREAM, request, response, shard_key)

    def bidi(self, short: str, *, request: Any = None, response: Any = None,
             shard_key: str | None = None) -> Callable[[Handler], Handler]:
        return self._declare(short, Cardinality.BIDI, request, response, shard_key)

    def check_complete(self) -> None:
        missing = [n for n in self.spec.methods if n not in self.methods]
        if missing:
            raise ValueError(f"service {self.name} has no handler for: {', '.join(missing)}")
