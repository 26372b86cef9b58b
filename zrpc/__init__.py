"""zrpc: streaming RPC over TLS with multiplexed streams, in Python.

Four call patterns (unary, client streaming, server streaming,
bidirectional), typed MessagePack messages, credit-based flow control,
deadlines, cancellation, keepalive and graceful shutdown. Run services
in-process with :class:`Server`, or sharded behind ``zrpc-broker start``.
"""

from zrpc.address import Address, AddressError, parse_address
from zrpc.client import BidirectionalStream, Client, ClientStream, ServerStream
from zrpc.codec import DecodeError
from zrpc.config import ClientConfig, ServerConfig, StreamConfig
from zrpc.context import RequestContext
from zrpc.dispatch import ServerCall
from zrpc.server import Server
from zrpc.service import Cardinality, MethodSpec, Service, ServiceSpec
from zrpc.status import ConnectionReset, ProtocolError, RpcError, Status, StreamClosed, Timeout
from zrpc.tls import TlsConfig

__version__ = "0.1.0"

__all__ = [
    "Address",
    "AddressError",
    "BidirectionalStream",
    "Cardinality",
    "Client",
    "ClientConfig",
    "ClientStream",
    "ConnectionReset",
    "DecodeError",
    "MethodSpec",
    "ProtocolError",
    "RequestContext",
    "RpcError",
    "Server",
    "ServerCall",
    "ServerConfig",
    "ServerStream",
    "Service",
    "ServiceSpec",
    "Status",
    "StreamClosed",
    "StreamConfig",
    "Timeout",
    "TlsConfig",
    "__version__",
    "parse_address",
]
