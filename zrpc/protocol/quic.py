"""zrpc over QUIC, sans-IO: one QUIC stream per zrpc stream.

:class:`StreamMux` sits between a QUIC stack (the aioquic glue in
:mod:`zrpc.quic`) and an unchanged :class:`~zrpc.protocol.connection.Connection`:

* outgoing: :meth:`StreamMux.split` cuts what ``Connection.data_to_send()``
  returned into runs of frames per QUIC stream, and says which QUIC streams
  to finish (FIN) after the run;
* incoming: :meth:`StreamMux.receive` decodes each QUIC stream's bytes on
  their own (frames of different streams interleave at the byte level only on
  TCP), checks the QUIC mapping rules, and returns the complete frames to feed
  to ``Connection.receive_data`` in arrival order.

The mapping (specified in ``docs/protocol.md``, "zrpc over QUIC"): connection
frames (HELLO, PING, PONG, GOAWAY and the connection's WINDOW, stream id 0)
travel on QUIC stream 0, the control stream; zrpc stream ``n`` (odd) travels
on the client-initiated bidirectional QUIC stream ``2n + 2``. A side finishes
its half of a QUIC stream right after it sends, or receives, the STATUS or
RESET that closes the zrpc stream. A QUIC RESET_STREAM or STOP_SENDING from
the peer, or a FIN before the zrpc stream closed, acts as a RESET of the zrpc
stream. Nothing here touches a socket or a clock.
"""

from __future__ import annotations

import msgpack

from zrpc.protocol.frames import HEADER, HEADER_SIZE, FrameDecoder, FrameType, encode_frame
from zrpc.status import ProtocolError, Status

__all__ = ["CONTROL_STREAM", "StreamMux", "quic_stream_id", "zrpc_stream_id"]

#: The QUIC stream that carries the connection's frames.
CONTROL_STREAM = 0

_CONTROL_TYPES = frozenset(int(t) for t in (FrameType.HELLO, FrameType.PING, FrameType.PONG,
                                             FrameType.GOAWAY, FrameType.WINDOW))
_STREAM_TYPES = frozenset(int(t) for t in (FrameType.OPEN, FrameType.MESSAGE, FrameType.END,
                                            FrameType.STATUS, FrameType.RESET, FrameType.WINDOW))
_T_OPEN = int(FrameType.OPEN)
_T_RESET = int(FrameType.RESET)
_T_GOAWAY = int(FrameType.GOAWAY)
_CLOSING = frozenset((int(FrameType.STATUS), _T_RESET))
_unpack_from = HEADER.unpack_from


def quic_stream_id(sid: int) -> int:
    """The QUIC stream carrying zrpc stream ``sid`` (0: the control stream)."""
    return 2 * sid + 2 if sid else CONTROL_STREAM


def zrpc_stream_id(quic_id: int) -> int:
    """The zrpc stream carried by QUIC stream ``quic_id`` (a client-initiated bidirectional one)."""
    return quic_id // 2 - 1 if quic_id else 0


class _QuicStream:
    __slots__ = ("closed", "decoder", "fin_pending", "fin_sent", "first", "recv_done")

    def __init__(self, decoder: FrameDecoder) -> None:
        self.decoder = decoder
        self.first = True           # no frame received on it yet
        self.closed = False         # a STATUS or RESET of the zrpc stream was sent or received
        self.fin_pending = False    # our FIN is owed on the next write
        self.fin_sent = False
        self.recv_done = False


class StreamMux:
    """Per-QUIC-stream framing for one end of a zrpc-over-QUIC connection.

    ``max_buffered`` bounds the bytes of incomplete frames held across all
    QUIC streams (a conforming peer stays within the connection window plus
    one message); past it :meth:`receive` raises RESOURCE_EXHAUSTED.
    """

    def __init__(self, is_client: bool, max_message_size: int, control_limit: int,
                 max_buffered: int) -> None:
        self.is_client = is_client
        self._max_message = max_message_size
        self._control_limit = control_limit
        self.max_buffered = max_buffered
        self._streams: dict[int, _QuicStream] = {}
        self._buffered: dict[int, int] = {}
        self._total = 0
        self._fins: list[int] = []
        #: (code, message) of the last GOAWAY sent: repeated in QUIC's CONNECTION_CLOSE.
        self.last_goaway: tuple[int, str] | None = None

    def _stream(self, quic_id: int) -> _QuicStream:
        st = self._streams.get(quic_id)
        if st is None:
            st = self._streams[quic_id] = _QuicStream(FrameDecoder(self._max_message, self._control_limit))
        return st

    @property
    def buffered(self) -> int:
        """Bytes of incomplete frames held now."""
        return self._total

    @property
    def fins_owed(self) -> bool:
        """FINs are owed since the last :meth:`split` (streams closed by frames received)."""
        return bool(self._fins)

    @property
    def open_streams(self) -> int:
        """QUIC streams with state held (not yet finished in both directions)."""
        return len(self._streams)

    # ------------------------------------------------------------------ input
    def receive(self, quic_id: int, data: bytes, end_stream: bool) -> bytes:
        """Bytes received on ``quic_id``: the complete frames they finish, for ``receive_data``.

        Raises :class:`ProtocolError` for a mapping violation (a connection error).
        """
        if quic_id % 4 != 0:
            raise ProtocolError(f"data on QUIC stream {quic_id}: zrpc uses only client-initiated "
                                "bidirectional streams", Status.INTERNAL)
        st = self._streams.get(quic_id)
        if st is None:
            if self.is_client and quic_id != CONTROL_STREAM:
                return b""  # a stream both sides finished: nothing may follow
            st = self._stream(quic_id)
        if st.recv_done:
            return b""
        frames = st.decoder.feed(data)
        held = st.decoder.buffered
        self._hold(quic_id, held)
        if self._total > self.max_buffered:
            raise ProtocolError(f"more than {self.max_buffered} bytes of incomplete frames "
                                "across QUIC streams", Status.RESOURCE_EXHAUSTED)
        expected = zrpc_stream_id(quic_id)
        allowed = _CONTROL_TYPES if quic_id == CONTROL_STREAM else _STREAM_TYPES
        out = []
        for ftype, flags, sid, payload in frames:
            if sid != expected:
                raise ProtocolError(f"frame for stream {sid} on QUIC stream {quic_id}, which carries "
                                    f"stream {expected}", Status.INTERNAL)
            if ftype not in allowed:
                raise ProtocolError(f"{FrameType(ftype).name} frame on QUIC stream {quic_id}",
                                    Status.INTERNAL)
            if quic_id != CONTROL_STREAM:
                if not self.is_client and (ftype == _T_OPEN) != st.first:
                    raise ProtocolError(f"QUIC stream {quic_id}: OPEN must be its first frame, "
                                        "and only that", Status.INTERNAL)
                st.first = False
                if ftype in _CLOSING:
                    st.closed = True
                    self._owe_fin(quic_id, st)
            out.append(encode_frame(ftype, flags, sid, payload))
        if end_stream:
            if quic_id == CONTROL_STREAM:
                raise ProtocolError("the peer finished the control stream", Status.INTERNAL)
            if held:
                raise ProtocolError(f"QUIC stream {quic_id} finished inside a frame", Status.INTERNAL)
            if not st.closed and not st.first:
                out.append(_reset_frame(expected, Status.CANCELLED,
                                        "the peer finished the QUIC stream before the zrpc stream closed"))
            self._recv_done(quic_id, st)
        return b"".join(out)

    def stream_reset(self, quic_id: int, error_code: int) -> bytes:
        """The peer sent RESET_STREAM or STOP_SENDING on ``quic_id``: a RESET frame to feed."""
        st = self._streams.get(quic_id)
        if quic_id == CONTROL_STREAM:
            raise ProtocolError("the peer reset the control stream", Status.INTERNAL)
        if st is None or st.recv_done or quic_id % 4 != 0:
            return b""
        code = error_code if 0 < error_code <= max(Status) else int(Status.CANCELLED)
        self._recv_done(quic_id, st)
        return _reset_frame(zrpc_stream_id(quic_id), code, "stream reset by the peer (QUIC)")

    def _hold(self, quic_id: int, held: int) -> None:
        self._total += held - self._buffered.get(quic_id, 0)
        if held:
            self._buffered[quic_id] = held
        else:
            self._buffered.pop(quic_id, None)

    def _recv_done(self, quic_id: int, st: _QuicStream) -> None:
        st.recv_done = True
        self._hold(quic_id, 0)
        self._owe_fin(quic_id, st)
        if st.fin_sent:
            del self._streams[quic_id]

    def _owe_fin(self, quic_id: int, st: _QuicStream) -> None:
        if not st.fin_sent and not st.fin_pending:
            st.fin_pending = True
            self._fins.append(quic_id)

    # ----------------------------------------------------------------- output
    def split(self, data: bytes) -> list[tuple[int, bytes, bool]]:
        """Cut ``Connection.data_to_send()`` output into ``(quic stream, bytes, fin)`` writes.

        Also carries the FINs owed since the last call (``split(b"")`` sends only those).
        Frames for a QUIC stream this side already finished are dropped: the zrpc
        stream is closed at both ends and the peer would ignore them.
        """
        runs: dict[int, list[memoryview]] = {}
        fins = self._fins
        pos, end = 0, len(data)
        view = memoryview(data)
        while pos < end:
            length, ftype, _flags, sid = _unpack_from(data, pos)
            stop = pos + HEADER_SIZE + length
            quic_id = quic_stream_id(sid)
            run = runs.get(quic_id)
            if run is None:
                run = runs[quic_id] = []
            run.append(view[pos:stop])
            if ftype in _CLOSING:
                fins.append(quic_id)
            elif ftype == _T_GOAWAY:
                _last, code, message = msgpack.unpackb(view[pos + HEADER_SIZE:stop])
                self.last_goaway = (code, message)
            pos = stop
        out: list[tuple[int, bytes, bool]] = []
        finish = set(fins) if fins else ()
        for quic_id, parts in runs.items():
            st = self._streams.get(quic_id)
            if st is None:
                if not self.is_client:
                    continue  # finished in both directions (the client opens every QUIC stream)
                st = self._stream(quic_id)
            elif st.fin_sent:
                continue
            fin = quic_id in finish
            out.append((quic_id, b"".join(parts), fin))
            if fin:
                st.closed = True
                self._fin_sent(quic_id, st)
        for quic_id in fins:
            if quic_id not in runs:
                st2 = self._streams.get(quic_id)
                if st2 is not None and not st2.fin_sent:
                    out.append((quic_id, b"", True))
                    self._fin_sent(quic_id, st2)
        fins.clear()
        return out

    def _fin_sent(self, quic_id: int, st: _QuicStream) -> None:
        st.fin_sent = True
        st.fin_pending = False
        if st.recv_done:
            del self._streams[quic_id]


def _reset_frame(sid: int, code: int, message: str) -> bytes:
    return encode_frame(_T_RESET, 0, sid, msgpack.packb([int(code), message]))
