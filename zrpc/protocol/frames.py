"""Frame layout: a 10-byte header and a payload.

::

    +----------------+--------+--------+----------------+
    | length (u32)   | type   | flags  | stream id (u32)|   network byte order
    +----------------+--------+--------+----------------+
    | payload (length bytes)                             |

:class:`FrameDecoder` turns a byte stream into ``(type, flags, stream_id,
payload)`` tuples and rejects a length above its limit as soon as the header
is read, before buffering the payload. Control payloads (HELLO, OPEN, STATUS,
RESET, GOAWAY) are MessagePack; WINDOW is a u32; PING/PONG are 8 opaque bytes.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from zrpc.status import ProtocolError, Status

__all__ = [
    "CONTROL_FRAME_LIMIT",
    "HEADER",
    "HEADER_SIZE",
    "FrameDecoder",
    "FrameFlag",
    "FrameType",
    "RawFrame",
    "encode_frame",
]

HEADER: Final = struct.Struct("!IBBI")
HEADER_SIZE: Final = HEADER.size
MAX_STREAM_ID: Final = 2**31 - 1
#: Largest payload of any frame other than MESSAGE (HELLO with a token, OPEN with metadata...).
CONTROL_FRAME_LIMIT: Final = 64 * 1024


class FrameType(enum.IntEnum):
    HELLO = 0x1
    OPEN = 0x2
    MESSAGE = 0x3
    END = 0x4
    STATUS = 0x5
    RESET = 0x6
    WINDOW = 0x7
    PING = 0x8
    PONG = 0x9
    GOAWAY = 0xA


class FrameFlag(enum.IntFlag):
    NONE = 0
    COMPRESSED = 0x1  # MESSAGE: payload is zlib-compressed
    END_STREAM = 0x2  # MESSAGE: last message from this sender (half-close)


RawFrame = tuple[int, int, int, bytes]

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from
_MESSAGE = int(FrameType.MESSAGE)
_MAX_TYPE = max(FrameType)


def encode_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """Encode one frame (header + payload)."""
    return _pack(len(payload), ftype, flags, stream_id) + payload


class FrameDecoder:
    """Incremental frame decoder.

    ``max_message_size`` bounds MESSAGE payloads, ``control_limit`` every other
    frame. A violation raises :class:`ProtocolError` with RESOURCE_EXHAUSTED;
    an unknown frame type raises it with INTERNAL.
    """

    __slots__ = ("_buf", "control_limit", "max_message_size")

    def __init__(self, max_message_size: int, control_limit: int = CONTROL_FRAME_LIMIT) -> None:
        self._buf = bytearray()
        self.max_message_size = max_message_size
        self.control_limit = control_limit

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[RawFrame]:
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        frames: list[RawFrame] = []
        pos = 0
        end = len(view)
        while end - pos >= HEADER_SIZE:
            length, ftype, flags, sid = _unpack_from(view, pos)
            if ftype == _MESSAGE:
                if length > self.max_message_size:
                    raise ProtocolError(
                        f"MESSAGE of {length} bytes exceeds max_message_size {self.max_message_size}",
                        Status.RESOURCE_EXHAUSTED,
                    )
            elif ftype == 0 or ftype > _MAX_TYPE:
                raise ProtocolError(f"unknown frame type 0x{ftype:02x}", Status.INTERNAL)
            elif length > self.control_limit:
                raise ProtocolError(
                    f"{FrameType(ftype).name} frame of {length} bytes exceeds the control frame limit {self.control_limit}",
                    Status.RESOURCE_EXHAUSTED,
                )
            if sid > MAX_STREAM_ID:
                raise ProtocolError(f"stream id {sid} out of range", Status.INTERNAL)
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            frames.append((ftype, flags, sid, bytes(view[start:stop])))
            pos = stop
        if pos == end:
            if buf:
                buf.clear()
        elif buf:
            del buf[:pos]
        else:
            buf += view[pos:]
        return frames
