"""Typed messages: dataclasses <-> MessagePack, plus optional compression.

A message type is a dataclass whose fields are ``int``, ``float``, ``str``,
``bytes``, ``bool``, ``Any``, a ``str``-valued :class:`enum.Enum`, another
message dataclass, ``list[...]``, ``dict[str, ...]`` or ``X | None`` of these.
On the wire it is a MessagePack map from field name to value; unknown keys are
ignored and missing keys take the field's default, so fields can be added
without breaking old peers. Decoding checks every type and raises
:class:`DecodeError` (reported to the caller as INVALID_ARGUMENT) on any
mismatch. ``dict`` or ``None`` as a message type means "plain MessagePack
value, unchecked" (what the generic ``zrpc call`` CLI uses).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
import zlib
from collections.abc import Callable
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import msgpack

from zrpc.packing import packer_with

__all__ = [
    "DecodeError",
    "compress",
    "decode",
    "decoder_for",
    "decompress",
    "encode",
    "encoder_for",
    "to_wire",
]

T = TypeVar("T")
_unpackb = msgpack.unpackb


class DecodeError(ValueError):
    """A payload is not valid for the expected message type."""


_Conv = Callable[[Any], Any]
_decoders: dict[Any, _Conv] = {}
_encoders: dict[Any, _Conv] = {}


def _ident(v: Any) -> Any:
    return v


def _build_decoder(tp: Any, path: str) -> _Conv:
    if tp is Any or tp is None or tp is dict or tp is object:
        return _ident
    origin = get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{path}: only X | None unions are supported")
        inner = _build_decoder(args[0], path)

        def opt(v: Any) -> Any:
            return None if v is None else inner(v)
        return opt
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        item = _build_decoder(item_tp, path + "[]")

        def lst(v: Any) -> Any:
            if not isinstance(v, list):
                raise DecodeError(f"{path}: expected an array, got {type(v).__name__}")
            return [item(x) for x in v]
        return lst
    if origin is dict:
        _, val_tp = get_args(tp) or (str, Any)
        val = _build_decoder(val_tp, path + "{}")

        def dct(v: Any) -> Any:
            if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                raise DecodeError(f"{path}: expected a map with string keys")
            return {k: val(x) for k, x in v.items()}
        return dct
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _dataclass_decoder(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        enum_tp = tp

        def en(v: Any) -> Any:
            try:
                return enum_tp(v)
            except ValueError:
                raise DecodeError(f"{path}: {v!r} is not a valid {enum_tp.__name__}") from None
        return en
    if tp is float:
        def flt(v: Any) -> Any:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise DecodeError(f"{path}: expected a number, got {type(v).__name__}")
        return flt
    if tp in (int, str, bytes, bool):
        expected = tp

        def exact(v: Any) -> Any:
            if type(v) is not expected:
                raise DecodeError(f"{path}: expected {expected.__name__}, got {type(v).__name__}")
            return v
        return exact
    raise TypeError(f"{path}: unsupported field type {tp!r}")


def _dataclass_decoder(cls: type) -> _Conv:
    cached = _decoders.get(cls)
    if cached is not None:
        return cached
    hints = get_type_hints(cls)
    specs: list[tuple[str, _Conv, bool]] = []
    name = cls.__name__

    def dec(v: Any) -> Any:
        if not isinstance(v, dict):
            raise DecodeError(f"{name}: expected a map, got {type(v).__name__}")
        kwargs = {}
        for field, conv, required in specs:
            if field in v:
                kwargs[field] = conv(v[field])
            elif required:
                raise DecodeError(f"{name}: missing field {field!r}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"{name}: {exc}") from None

    _decoders[cls] = dec  # before recursing: allows self-referencing types
    try:
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            specs.append((f.name, _build_decoder(hints[f.name], f"{name}.{f.name}"), required))
    except BaseException:
        _decoders.pop(cls, None)  # never leave a half-built decoder (missing fields) cached
        raise
    return dec


def _to_wire_value(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return encoder_for(type(v))(v)
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, list | tuple):
        return [_to_wire_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_wire_value(x) for k, x in v.items()}
    return v


def encoder_for(cls: type) -> _Conv:
    """A function turning an instance of ``cls`` into MessagePack-ready data."""
    cached = _encoders.get(cls)
    if cached is not None:
        return cached
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        return _to_wire_value
    hints = get_type_hints(cls)
    plain = {int, str, bytes, bool, float}
    names = [f.name for f in dataclasses.fields(cls)]
    simple = [n for n in names if hints[n] in plain]
    complex_ = [n for n in names if hints[n] not in plain]

    def enc(obj: Any) -> dict[str, Any]:
        d = {n: getattr(obj, n) for n in simple}
        for n in complex_:
            d[n] = _to_wire_value(getattr(obj, n))
        return d

    _encoders[cls] = enc
    return enc


def decoder_for(cls: Any) -> _Conv:
    """A function turning decoded MessagePack data into ``cls`` (validating types)."""
    cached = _decoders.get(cls)
    if cached is not None:
        return cached
    dec = _build_decoder(cls, getattr(cls, "__name__", str(cls)))
    _decoders[cls] = dec
    return dec


def to_wire(obj: Any) -> Any:
    """MessagePack-ready data for a message (dataclass) or a plain value."""
    return _to_wire_value(obj)


def _pack_default(v: Any) -> Any:
    """msgpack's hook for what it cannot pack itself: nested messages and enums."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return encoder_for(type(v))(v)
    if isinstance(v, enum.Enum):
        return v.value
    raise TypeError(f"cannot encode {type(v).__name__} as MessagePack")


_pack = packer_with(_pack_default)  # a reused packer per thread (see zrpc.packing)


def encode(obj: Any) -> bytes:
    """Encode a message to MessagePack bytes.

    Plain values (dicts, lists, str...) go straight to msgpack's C packer; the
    Python hook runs only for dataclasses and enums.
    """
    cls = type(obj)
    if cls is dict:
        return _pack(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _pack(encoder_for(cls)(obj))
    return _pack(obj)


def decode(cls: type[T] | None, data: bytes) -> T:
    """Decode MessagePack bytes as ``cls``; raises :class:`DecodeError` on any mismatch."""
    try:
        raw = _unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise DecodeError(f"invalid MessagePack: {type(exc).__name__}: {exc}") from None
    if cls is None:
        return raw
    return decoder_for(cls)(raw)


def compress(payload: bytes, threshold: int | None) -> tuple[bytes, bool]:
    """Compress with zlib when ``len(payload) > threshold`` and it helps."""
    if threshold is None or len(payload) <= threshold:
        return payload, False
    packed = zlib.compress(payload, 1)
    if len(packed) >= len(payload):
        return payload, False
    return packed, True


def decompress(payload: bytes, max_size: int) -> bytes:
    """Inflate a compressed message, refusing to produce more than ``max_size`` bytes."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(payload, max_size)
    except zlib.error as exc:
        raise DecodeError(f"invalid compressed message: {exc}") from None
    if d.unconsumed_tail:
        raise DecodeError(f"compressed message inflates beyond max_message_size ({max_size})")
    if not d.eof or d.unused_data:
        raise DecodeError("invalid compressed message: truncated or followed by extra bytes")
    return out
