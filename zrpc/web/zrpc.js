// zrpc.js - a client for the zrpc wire protocol, version 1 (docs/protocol.md).
//
// An ES module for browsers and Node >= 20. It has three layers:
//
//   * frames: encodeFrame / FrameDecoder (section 2);
//   * Connection: the client side of the protocol without any I/O - bytes in,
//     events out, bytes to send - with the stream state table, flow control
//     and limits (sections 3-8, 11, 13);
//   * Client: calls over a *transport* (anything with send(bytes) and close(),
//     which calls transport.onbytes(bytes) and transport.onclose(error)):
//     unary, clientStream, serverStream, bidi; statuses become ZrpcError.
//
// webSocketTransport(url) carries the byte stream in binary WebSocket messages
// (docs/protocol.md section 1.1, the broker's --web-port); node-transport.js
// has a TLS transport for Node. Messages are MessagePack (@msgpack/msgpack,
// bundled as ./vendor/msgpack.mjs by scripts/build_web_vendor.py from the
// version package-lock.json pins), so the same file runs in browsers and Node.

import { decode as mpDecode, encode as mpEncode } from "./vendor/msgpack.mjs";

export const PROTOCOL_VERSION = 1;
export const HEADER_SIZE = 10;
export const CONTROL_FRAME_LIMIT = 64 * 1024;
export const MAX_STREAM_ID = 2 ** 31 - 1;
export const MAX_WINDOW = 2 ** 31 - 1;

export const FrameType = Object.freeze({
  HELLO: 0x1, OPEN: 0x2, MESSAGE: 0x3, END: 0x4, STATUS: 0x5,
  RESET: 0x6, WINDOW: 0x7, PING: 0x8, PONG: 0x9, GOAWAY: 0xa,
});
const TYPE_NAMES = Object.fromEntries(Object.entries(FrameType).map(([k, v]) => [v, k]));

export const Flag = Object.freeze({ COMPRESSED: 0x1, END_STREAM: 0x2 });

/** Status codes (section 9); the numbering is gRPC's. */
export const Status = Object.freeze({
  OK: 0, CANCELLED: 1, UNKNOWN: 2, INVALID_ARGUMENT: 3, DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5, ALREADY_EXISTS: 6, PERMISSION_DENIED: 7, RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9, ABORTED: 10, OUT_OF_RANGE: 11, UNIMPLEMENTED: 12,
  INTERNAL: 13, UNAVAILABLE: 14, DATA_LOSS: 15, UNAUTHENTICATED: 16,
});
const STATUS_NAMES = Object.fromEntries(Object.entries(Status).map(([k, v]) => [v, k]));

/** A code the receiver does not know is UNKNOWN (2). */
export function statusCode(code) {
  return Number.isInteger(code) && code in STATUS_NAMES ? code : Status.UNKNOWN;
}

export function statusName(code) {
  return STATUS_NAMES[statusCode(code)];
}

/**
 * Exponential backoff, the policy of Python's `zrpc.backoff.Backoff`: the n-th consecutive
 * failed attempt (n >= 1) waits min(maximum, initial * multiplier^(n-1)) ms, spread by
 * +/- `jitter` (a fraction).
 */
export function backoffDelay(attempt, { initial = 50, maximum = 5000, multiplier = 2, jitter = 0.2 } = {}) {
  const base = Math.min(maximum, initial * multiplier ** Math.max(0, attempt - 1));
  return Math.max(0, base * (1 + (Math.random() * 2 - 1) * jitter));
}

/**
 * Settings a client announces in HELLO (section 3.1), with the reference defaults (the same
 * numbers as `zrpc/defaults.py`; tests/test_options_doc.py checks that they agree).
 */
export const DEFAULT_SETTINGS = Object.freeze({
  max_message_size: 4 * 1024 * 1024,
  max_concurrent_streams: 1024,
  initial_stream_window: 256 * 1024,
  initial_connection_window: 4 * 1024 * 1024,
  max_metadata_size: 16 * 1024,
});
const SETTING_KEYS = Object.keys(DEFAULT_SETTINGS);

/**
 * A failed call or connection: `code` (number), `status` (its name, e.g. "NOT_FOUND"),
 * `reason` (the peer's message), `details` (STATUS details, or null).
 */
export class ZrpcError extends Error {
  constructor(code, reason = "", details = null) {
    const c = statusCode(code);
    super(reason ? `${statusName(c)}: ${reason}` : statusName(c));
    this.name = "ZrpcError";
    this.code = c;
    this.status = statusName(c);
    this.reason = reason;
    this.details = details ?? null;
  }
}

/** A protocol violation by the peer: the connection fails with `code`. */
export class ProtocolError extends Error {
  constructor(message, code = Status.INTERNAL) {
    super(message);
    this.name = "ProtocolError";
    this.code = code;
  }
}

/** sendMessage without credit: wait for a WINDOW (a "window" event). */
export class FlowControlBlocked extends Error {
  constructor(streamId) {
    super(`stream ${streamId} has no send credit`);
    this.name = "FlowControlBlocked";
    this.streamId = streamId;
  }
}

const EMPTY = new Uint8Array(0);

// ------------------------------------------------------------------- frames

/** One frame: 10-byte header (length u32, type u8, flags u8, stream id u32, big-endian) + payload. */
export function encodeFrame(type, flags, streamId, payload = EMPTY) {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, payload.length);
  out[4] = type;
  out[5] = flags;
  view.setUint32(6, streamId);
  out.set(payload, HEADER_SIZE);
  return out;
}

/**
 * Incremental frame decoder. The header is checked as soon as its 10 bytes are
 * in (type, length limit, stream id), before any payload is buffered; a
 * violation throws ProtocolError. feed() returns the frames completed:
 * {type, flags, streamId, payload}.
 */
export class FrameDecoder {
  constructor(maxMessageSize, controlLimit = CONTROL_FRAME_LIMIT) {
    this.maxMessageSize = maxMessageSize;
    this.controlLimit = controlLimit;
    this._header = new Uint8Array(HEADER_SIZE);
    this._headerLen = 0;
    this._frame = null; // the frame whose payload is being filled
    this._filled = 0;
  }

  /** Bytes received that are not part of a complete frame yet. */
  get buffered() {
    return this._frame === null ? this._headerLen : HEADER_SIZE + this._filled;
  }

  feed(data) {
    const frames = [];
    let pos = 0;
    while (pos < data.length) {
      if (this._frame === null) {
        const take = Math.min(HEADER_SIZE - this._headerLen, data.length - pos);
        this._header.set(data.subarray(pos, pos + take), this._headerLen);
        this._headerLen += take;
        pos += take;
        if (this._headerLen < HEADER_SIZE) break;
        this._frame = this._parseHeader();
        this._filled = 0;
      } else {
        const payload = this._frame.payload;
        const take = Math.min(payload.length - this._filled, data.length - pos);
        payload.set(data.subarray(pos, pos + take), this._filled);
        this._filled += take;
        pos += take;
      }
      if (this._frame !== null && this._filled === this._frame.payload.length) {
        frames.push(this._frame);
        this._frame = null;
        this._headerLen = 0;
      }
    }
    return frames;
  }

  _parseHeader() {
    const view = new DataView(this._header.buffer);
    const length = view.getUint32(0);
    const type = this._header[4];
    const flags = this._header[5];
    const streamId = view.getUint32(6);
    if (type === FrameType.MESSAGE) {
      if (length > this.maxMessageSize) {
        throw new ProtocolError(`MESSAGE of ${length} bytes exceeds max_message_size ${this.maxMessageSize}`,
          Status.RESOURCE_EXHAUSTED);
      }
    } else if (type === 0 || type > FrameType.GOAWAY) {
      throw new ProtocolError(`unknown frame type 0x${type.toString(16).padStart(2, "0")}`, Status.INTERNAL);
    } else if (length > this.controlLimit) {
      throw new ProtocolError(`${TYPE_NAMES[type]} frame of ${length} bytes exceeds the control frame limit ${this.controlLimit}`,
        Status.RESOURCE_EXHAUSTED);
    }
    if (streamId > MAX_STREAM_ID) throw new ProtocolError(`stream id ${streamId} out of range`, Status.INTERNAL);
    return { type, flags, streamId, payload: new Uint8Array(length) };
  }
}

// -------------------------------------------------------------- MessagePack

const stringKeysOnly = (key) => {
  if (typeof key !== "string") throw new TypeError("map keys must be strings");
  return key;
};

/** Decode one complete control payload (trailing bytes are an error). */
function unpackControl(payload, what, options) {
  try {
    return mpDecode(payload, options);
  } catch (err) {
    throw new ProtocolError(`malformed ${what} payload: ${err.name}`, Status.INTERNAL);
  }
}

function isInt(v) {
  return typeof v === "number" && Number.isInteger(v);
}

function triple(payload, what, n) {
  const body = unpackControl(payload, what);
  if (!Array.isArray(body) || body.length !== n) throw new ProtocolError(`${what} payload must be an array of ${n}`);
  if (!isInt(body[0]) || typeof body[1] !== "string") throw new ProtocolError(`${what} payload has wrong types`);
  return body;
}

// -------------------------------------------------------------- connection

const OPEN = "open";
const HALF_CLOSED_LOCAL = "half_closed_local"; // the client sent END

function positiveInt(value, name, high) {
  if (!isInt(value) || value < 1 || value > high) throw new RangeError(`${name} must be an integer in [1, ${high}], got ${value}`);
  return value;
}

/**
 * The client end of a zrpc connection without I/O (mirrors zrpc/protocol/connection.py).
 *
 * receiveData(bytes) returns events; frames to send accumulate until
 * dataToSend(). Events: {type: "hello", settings}, {type: "message", streamId,
 * payload, compressed}, {type: "status", streamId, code, message, details},
 * {type: "reset", streamId, code, message}, {type: "window", streamId},
 * {type: "goaway", lastStreamId, code, message}, {type: "pong", data},
 * {type: "terminated", code, message} (a connection error: a GOAWAY is queued
 * and the connection is closed). Bad input never throws; local misuse does.
 */
export class Connection {
  constructor(settings = {}, { keepaliveIntervalMs = null, keepaliveTimeoutMs = 10000, now = 0 } = {}) {
    const local = { ...DEFAULT_SETTINGS };
    for (const key of SETTING_KEYS) if (settings[key] !== undefined) local[key] = settings[key];
    positiveInt(local.max_message_size, "max_message_size", 2 ** 32 - 1);
    positiveInt(local.max_concurrent_streams, "max_concurrent_streams", 2 ** 31 - 1);
    positiveInt(local.initial_stream_window, "initial_stream_window", MAX_WINDOW);
    positiveInt(local.initial_connection_window, "initial_connection_window", MAX_WINDOW);
    positiveInt(local.max_metadata_size, "max_metadata_size", CONTROL_FRAME_LIMIT);
    this.local = Object.freeze(local);
    this.keepaliveIntervalMs = keepaliveIntervalMs;
    this.keepaliveTimeoutMs = keepaliveTimeoutMs;
    this.streams = new Map(); // id -> {id, state, sendWindow, recvWindow, unacked}
    this.closed = false;
    this.helloSent = false;
    this.peer = null; // the server's HELLO map
    this.goawayReceived = null; // last stream id the server will process
    this.goawaySent = null;
    this._out = [];
    this._decoder = new FrameDecoder(local.max_message_size);
    this._sendConnWindow = 0;
    this._peerStreamWindow = 0;
    this._peerMaxMessage = 0;
    this._peerMaxStreams = 0;
    this._recvConnWindow = local.initial_connection_window;
    this._connUnacked = 0;
    this._nextId = 1;
    this.lastReceived = now;
    this._pingSentAt = null;
    this._pingCounter = 0n;
  }

  // ----------------------------------------------------------------- input

  receiveData(data, now = null) {
    if (this.closed) return [];
    if (now !== null) this.lastReceived = now;
    let frames;
    try {
      frames = this._decoder.feed(data);
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      this._decoder = new FrameDecoder(this.local.max_message_size);
      return [this._fail(err)];
    }
    const events = [];
    for (const { type, flags, streamId, payload } of frames) {
      try {
        if (type === FrameType.MESSAGE) this._onMessage(events, flags, streamId, payload);
        else if (type === FrameType.WINDOW) this._onWindow(events, streamId, payload);
        else if (this.peer === null && type !== FrameType.HELLO && type !== FrameType.GOAWAY) {
          throw new ProtocolError(`${TYPE_NAMES[type]} frame before HELLO`);
        } else if (type === FrameType.OPEN) throw new ProtocolError("server sent OPEN");
        else if (type === FrameType.END) this._onEnd(streamId);
        else if (type === FrameType.STATUS) this._onStatus(events, streamId, payload);
        else if (type === FrameType.RESET) this._onReset(events, streamId, payload);
        else if (type === FrameType.PING) this._onPing(streamId, payload);
        else if (type === FrameType.PONG) this._onPong(events, payload);
        else if (type === FrameType.GOAWAY) this._onGoaway(events, payload);
        else this._onHello(events, streamId, payload);
      } catch (err) {
        if (!(err instanceof ProtocolError)) throw err;
        events.push(this._fail(err));
        break;
      }
      if (this.closed) break;
    }
    return events;
  }

  _fail(err) {
    this.close(err.code, err.message);
    return { type: "terminated", code: err.code, message: err.message };
  }

  _lookup(streamId, what) {
    const st = this.streams.get(streamId);
    if (st === undefined && !(streamId > 0 && streamId <= this._nextId - 2)) {
      throw new ProtocolError(`${what} on stream ${streamId}, which was never opened`);
    }
    return st; // undefined: a stream that closed already; its late frames are ignored
  }

  _onMessage(events, flags, streamId, payload) {
    const size = payload.length;
    if (this._recvConnWindow <= 0) throw new ProtocolError("connection flow-control window exceeded", Status.RESOURCE_EXHAUSTED);
    this._recvConnWindow -= size;
    const st = this._lookup(streamId, "MESSAGE");
    if (st === undefined) {
      this._ackConnection(size); // a late MESSAGE counts as consumed at once
      return;
    }
    if (st.recvWindow <= 0) throw new ProtocolError(`stream ${streamId} flow-control window exceeded`, Status.RESOURCE_EXHAUSTED);
    st.recvWindow -= size;
    if (flags & Flag.END_STREAM) throw new ProtocolError("server sent END_STREAM; a server ends a stream with STATUS");
    events.push({ type: "message", streamId, payload, compressed: Boolean(flags & Flag.COMPRESSED) });
  }

  _onEnd(streamId) {
    if (this._lookup(streamId, "END") !== undefined) throw new ProtocolError("server sent END; a server ends a stream with STATUS");
  }

  _onWindow(events, streamId, payload) {
    if (this.peer === null) throw new ProtocolError("WINDOW frame before HELLO");
    if (payload.length !== 4) throw new ProtocolError("WINDOW payload must be 4 bytes");
    const inc = new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0);
    if (inc === 0) throw new ProtocolError("WINDOW increment of 0");
    if (streamId === 0) {
      this._sendConnWindow += inc;
      if (this._sendConnWindow > MAX_WINDOW) throw new ProtocolError("connection window above 2^31-1", Status.RESOURCE_EXHAUSTED);
    } else {
      const st = this._lookup(streamId, "WINDOW");
      if (st === undefined) return;
      st.sendWindow += inc;
      if (st.sendWindow > MAX_WINDOW) throw new ProtocolError(`stream ${streamId} window above 2^31-1`, Status.RESOURCE_EXHAUSTED);
    }
    events.push({ type: "window", streamId });
  }

  _onHello(events, streamId, payload) {
    if (streamId !== 0) throw new ProtocolError("HELLO on a stream");
    let settings;
    try {
      settings = mpDecode(payload, { mapKeyConverter: stringKeysOnly });
    } catch (err) {
      const code = err instanceof TypeError ? Status.INVALID_ARGUMENT : Status.INTERNAL;
      throw new ProtocolError(`malformed HELLO payload: ${err.message}`, code);
    }
    if (settings === null || typeof settings !== "object" || Array.isArray(settings) || settings instanceof Uint8Array) {
      throw new ProtocolError("HELLO payload must be a map with string keys", Status.INVALID_ARGUMENT);
    }
    if (settings.version !== PROTOCOL_VERSION) {
      throw new ProtocolError(`unsupported protocol version ${settings.version}; this end speaks ${PROTOCOL_VERSION}`,
        Status.FAILED_PRECONDITION);
    }
    const peerInt = (key, high) => {
      const v = settings[key];
      if (!isInt(v) || v < 1 || v > high) {
        throw new ProtocolError(`HELLO field '${key}' must be an integer in [1, ${high}], got ${v}`, Status.INVALID_ARGUMENT);
      }
      return v;
    };
    const streamWindow = peerInt("initial_stream_window", MAX_WINDOW);
    const connWindow = peerInt("initial_connection_window", MAX_WINDOW);
    this._peerMaxMessage = peerInt("max_message_size", 2 ** 32 - 1);
    this._peerMaxStreams = peerInt("max_concurrent_streams", 2 ** 31 - 1);
    peerInt("max_metadata_size", CONTROL_FRAME_LIMIT);
    const first = this.peer === null;
    this.peer = settings;
    if (first) {
      this._sendConnWindow = connWindow;
      this._peerStreamWindow = streamWindow;
    }
    events.push({ type: "hello", settings });
  }

  _onStatus(events, streamId, payload) {
    const st = this._lookup(streamId, "STATUS");
    const [code, message, details] = triple(payload, "STATUS", 3);
    if (st === undefined) return;
    this.streams.delete(streamId);
    events.push({ type: "status", streamId, code, message, details: details ?? null });
  }

  _onReset(events, streamId, payload) {
    const st = this._lookup(streamId, "RESET");
    const [code, message] = triple(payload, "RESET", 2);
    if (st === undefined) return;
    this.streams.delete(streamId);
    events.push({ type: "reset", streamId, code, message });
  }

  _onPing(streamId, payload) {
    if (streamId !== 0 || payload.length !== 8) throw new ProtocolError("PING must be on stream 0 with 8 bytes");
    this._out.push(encodeFrame(FrameType.PONG, 0, 0, payload));
  }

  _onPong(events, payload) {
    if (payload.length !== 8) throw new ProtocolError("PONG must carry 8 bytes");
    this._pingSentAt = null;
    events.push({ type: "pong", data: payload });
  }

  _onGoaway(events, payload) {
    const body = unpackControl(payload, "GOAWAY");
    if (!Array.isArray(body) || body.length !== 3 || !isInt(body[0]) || body[0] < 0 || !isInt(body[1])
        || typeof body[2] !== "string") {
      throw new ProtocolError("GOAWAY payload must be [last_stream_id, code, message]");
    }
    this.goawayReceived = body[0];
    events.push({ type: "goaway", lastStreamId: body[0], code: body[1], message: body[2] });
  }

  // ---------------------------------------------------------------- output

  get hasDataToSend() {
    return this._out.length > 0;
  }

  /** Everything queued to send, coalesced into one array; empties the queue. */
  dataToSend() {
    const parts = this._out;
    this._out = [];
    if (parts.length === 1) return parts[0];
    let n = 0;
    for (const p of parts) n += p.length;
    const out = new Uint8Array(n);
    let pos = 0;
    for (const p of parts) {
      out.set(p, pos);
      pos += p.length;
    }
    return out;
  }

  _queueControl(type, streamId, body) {
    this._out.push(encodeFrame(type, 0, streamId, mpEncode(body)));
  }

  /** Send our HELLO (first thing on a connection); extra: {user_agent, token}. */
  sendHello(extra = {}) {
    if (this.helloSent) throw new Error("HELLO already sent");
    const body = { version: PROTOCOL_VERSION };
    for (const key of SETTING_KEYS) body[key] = this.local[key];
    for (const [k, v] of Object.entries(extra)) if (v !== undefined && v !== null) body[k] = v;
    this._queueControl(FrameType.HELLO, 0, body);
    this.helloSent = true;
  }

  /** Open a stream; returns its id. Needs the server's HELLO. */
  openStream(method, metadata = {}, timeoutMs = null) {
    if (this.closed || this.goawayReceived !== null) throw new ZrpcError(Status.UNAVAILABLE, "connection is closing");
    if (this.peer === null) throw new Error("openStream before the server's HELLO");
    if (typeof method !== "string" || !method) throw new TypeError("method must be a non-empty string");
    if (this.streams.size >= this._peerMaxStreams) {
      throw new ZrpcError(Status.RESOURCE_EXHAUSTED, `peer's max_concurrent_streams (${this._peerMaxStreams}) reached`);
    }
    const streamId = this._nextId;
    if (streamId > MAX_STREAM_ID) throw new ZrpcError(Status.UNAVAILABLE, "stream ids exhausted on this connection; open a new one");
    if (timeoutMs !== null && (!isInt(timeoutMs) || timeoutMs < 0 || timeoutMs >= 2 ** 40)) {
      throw new RangeError("timeoutMs must be null or an integer in [0, 2^40)");
    }
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string") throw new TypeError(`metadata value of ${k} must be a string`);
    }
    const payload = mpEncode([method, timeoutMs, metadata]);
    if (payload.length > CONTROL_FRAME_LIMIT) {
      throw new ZrpcError(Status.INVALID_ARGUMENT, `method and metadata take ${payload.length} bytes; the limit is ${CONTROL_FRAME_LIMIT}`);
    }
    this._nextId += 2;
    this._out.push(encodeFrame(FrameType.OPEN, 0, streamId, payload));
    this.streams.set(streamId, {
      id: streamId, state: OPEN, sendWindow: this._peerStreamWindow,
      recvWindow: this.local.initial_stream_window, unacked: 0,
    });
    return streamId;
  }

  get canOpenStream() {
    return this.peer !== null && !this.closed && this.goawayReceived === null && this.streams.size < this._peerMaxStreams;
  }

  _live(streamId) {
    const st = this.streams.get(streamId);
    if (st === undefined) throw new ZrpcError(Status.CANCELLED, `stream ${streamId} is closed`);
    return st;
  }

  /** Bytes that may be sent now on the stream (<= 0: wait for a "window" event). */
  sendCredit(streamId) {
    const st = this._live(streamId);
    if (st.state !== OPEN) throw new ZrpcError(Status.CANCELLED, `cannot send on stream ${streamId} after END`);
    return Math.min(st.sendWindow, this._sendConnWindow);
  }

  /** Queue one MESSAGE. Needs sendCredit() > 0 (the message may overshoot the credit). */
  sendMessage(streamId, payload, { endStream = false } = {}) {
    const st = this._live(streamId);
    if (payload.length > this._peerMaxMessage) {
      throw new ZrpcError(Status.RESOURCE_EXHAUSTED,
        `message of ${payload.length} bytes exceeds the peer's max_message_size (${this._peerMaxMessage})`);
    }
    if (st.state !== OPEN) throw new ZrpcError(Status.CANCELLED, `cannot send on stream ${streamId} after END`);
    if (st.sendWindow <= 0 || this._sendConnWindow <= 0) throw new FlowControlBlocked(streamId);
    st.sendWindow -= payload.length;
    this._sendConnWindow -= payload.length;
    if (endStream) st.state = HALF_CLOSED_LOCAL;
    this._out.push(encodeFrame(FrameType.MESSAGE, endStream ? Flag.END_STREAM : 0, streamId, payload));
  }

  /** Half-close: no more messages from the client on this stream. */
  endStream(streamId) {
    const st = this._live(streamId);
    if (st.state !== OPEN) throw new ZrpcError(Status.CANCELLED, `stream ${streamId} already ended`);
    st.state = HALF_CLOSED_LOCAL;
    this._out.push(encodeFrame(FrameType.END, 0, streamId));
  }

  /** Abort a stream (no-op when it is closed already). */
  resetStream(streamId, code, message = "") {
    if (!this.streams.has(streamId)) return;
    this.streams.delete(streamId);
    this._queueControl(FrameType.RESET, streamId, [code, message]);
  }

  /**
   * The application consumed `size` bytes of a MESSAGE on the stream: return
   * the credit. A WINDOW goes out once a quarter of the window is consumed.
   */
  acknowledge(streamId, size) {
    this._ackConnection(size);
    const st = this.streams.get(streamId);
    if (st === undefined) return; // the stream is over: only the connection credit comes back
    st.unacked += size;
    if (st.unacked && st.unacked >= this.local.initial_stream_window >> 2) {
      const inc = st.unacked;
      st.unacked = 0;
      st.recvWindow += inc;
      this._out.push(windowFrame(streamId, inc));
    }
  }

  _ackConnection(size) {
    this._connUnacked += size;
    if (this._connUnacked && this._connUnacked >= this.local.initial_connection_window >> 2) {
      const inc = this._connUnacked;
      this._connUnacked = 0;
      this._recvConnWindow += inc;
      this._out.push(windowFrame(0, inc));
    }
  }

  /** Close now: GOAWAY [0, code, message]; every stream is gone. */
  close(code = Status.OK, message = "") {
    if (this.closed) return;
    this._queueControl(FrameType.GOAWAY, 0, [0, code, message]);
    this.goawaySent = 0;
    this.closed = true;
    this.streams.clear();
  }

  // ------------------------------------------------------------- keepalive

  /** Drive keepalive with the current time in ms (section 13). */
  tick(now) {
    if (this.closed || this.peer === null) return [];
    if (this._pingSentAt !== null) {
      if (now - this._pingSentAt > this.keepaliveTimeoutMs) {
        return [this._fail(new ProtocolError("keepalive timeout: no PONG", Status.UNAVAILABLE))];
      }
      return [];
    }
    if (this.keepaliveIntervalMs !== null && now - this.lastReceived >= this.keepaliveIntervalMs) this.ping(now);
    return [];
  }

  ping(now) {
    this._pingCounter += 1n;
    const data = new Uint8Array(8);
    new DataView(data.buffer).setBigUint64(0, this._pingCounter);
    this._pingSentAt = now;
    this._out.push(encodeFrame(FrameType.PING, 0, 0, data));
    return data;
  }
}

function windowFrame(streamId, inc) {
  const payload = new Uint8Array(4);
  new DataView(payload.buffer).setUint32(0, inc);
  return encodeFrame(FrameType.WINDOW, 0, streamId, payload);
}

// ------------------------------------------------------------------- client

/** The MessagePack codec used for messages (section 12.1). */
export const msgpackCodec = Object.freeze({
  encode: (value) => mpEncode(value),
  decode: (bytes) => mpDecode(bytes),
});

/** Inflate a COMPRESSED message (a zlib stream, section 12.2), at most `limit` bytes. */
export async function inflate(bytes, limit) {
  if (typeof DecompressionStream === "undefined") throw new ZrpcError(Status.INTERNAL, "no DecompressionStream for a compressed message");
  const ds = new DecompressionStream("deflate");
  const writer = ds.writable.getWriter();
  writer.write(bytes).catch(() => {});
  writer.close().catch(() => {});
  const reader = ds.readable.getReader();
  const chunks = [];
  let total = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.length;
      if (total > limit) {
        reader.cancel().catch(() => {});
        throw new ZrpcError(Status.RESOURCE_EXHAUSTED, `compressed message inflates beyond max_message_size (${limit})`);
      }
      chunks.push(value);
    }
  } catch (err) {
    if (err instanceof ZrpcError) throw err;
    throw new ZrpcError(Status.INTERNAL, `undecodable compressed message: ${err.message}`);
  }
  const out = new Uint8Array(total);
  let pos = 0;
  for (const c of chunks) {
    out.set(c, pos);
    pos += c.length;
  }
  return out;
}

const nowMs = () => (globalThis.performance ? performance.now() : Date.now());

/**
 * A zrpc client over one transport. Client.connect(transport, options) sends
 * HELLO and resolves once the server's HELLO arrived (rejects with ZrpcError on
 * a refusal: GOAWAY, e.g. UNAUTHENTICATED).
 *
 * options: token, userAgent ("zrpc-js"), settings (HELLO settings),
 * keepaliveIntervalMs (30000; null: off), keepaliveTimeoutMs (10000),
 * handshakeTimeoutMs (10000), codec ({encode, decode}: MessagePack),
 * onGoaway({lastStreamId, code, message}).
 */
export class Client {
  static async connect(transport, options = {}) {
    const client = new Client(transport, options);
    await client.ready;
    return client;
  }

  constructor(transport, options = {}) {
    const {
      token = null, userAgent = "zrpc-js", settings = {}, keepaliveIntervalMs = 30000,
      keepaliveTimeoutMs = 10000, handshakeTimeoutMs = 10000, codec = msgpackCodec, onGoaway = null,
    } = options;
    this.transport = transport;
    this.codec = codec;
    this.onGoaway = onGoaway;
    this.conn = new Connection(settings, { keepaliveIntervalMs, keepaliveTimeoutMs, now: nowMs() });
    this.calls = new Map();
    this.error = null; // why the connection ended
    this._flushQueued = false;
    this._transportClosed = false;
    this._goaway = null;
    this.ready = new Promise((resolve, reject) => {
      this._ready = { resolve, reject, settled: false };
    });
    this.ready.catch(() => {});
    this.closed = new Promise((resolve) => {
      this._closedResolve = resolve;
    });
    transport.onbytes = (bytes) => this._receive(bytes);
    transport.onclose = (err) => this._lost(err);
    this._handshakeTimer = setTimeout(() => {
      this._terminate(new ZrpcError(Status.DEADLINE_EXCEEDED, `no HELLO from the server within ${handshakeTimeoutMs} ms`));
    }, handshakeTimeoutMs);
    if (keepaliveIntervalMs !== null) {
      const period = Math.min(keepaliveIntervalMs, keepaliveTimeoutMs) / 2;
      this._keepalive = setInterval(() => this._tick(), period);
      // Node: do not keep the process alive for keepalive alone
      if (typeof this._keepalive === "object" && this._keepalive.unref) this._keepalive.unref();
    }
    const extra = { user_agent: userAgent };
    if (token) extra.token = token;
    this.conn.sendHello(extra);
    this._flush();
  }

  /** The server's HELLO settings (after ready). */
  get serverSettings() {
    return this.conn.peer;
  }

  get isClosed() {
    return this.error !== null;
  }

  // ------------------------------------------------------------------ calls

  /** Unary call: one request, one response. */
  async unary(method, request, options = {}) {
    const call = this._open(method, "unary", options);
    await call._sendRaw(this.codec.encode(request), true);
    return call._single();
  }

  /** Client streaming: send() messages, then closeAndReceive() the response. */
  async clientStream(method, options = {}) {
    return this._open(method, "client_stream", options);
  }

  /** Server streaming: one request; iterate the responses (for await). */
  async serverStream(method, request, options = {}) {
    const call = this._open(method, "server_stream", options);
    await call._sendRaw(this.codec.encode(request), true);
    return call;
  }

  /** Bidirectional streaming: send() / closeSend() and iterate the responses. */
  async bidi(method, options = {}) {
    return this._open(method, "bidi", options);
  }

  _open(method, kind, { timeoutMs = null, metadata = {}, signal = null } = {}) {
    if (this.error !== null) throw this.error;
    if (this._goaway !== null) throw new ZrpcError(Status.UNAVAILABLE, `server sent GOAWAY: ${this._goaway.message || "shutting down"}`);
    const streamId = this.conn.openStream(method, metadata, timeoutMs);
    const call = new Call(this, streamId, method, kind);
    this.calls.set(streamId, call);
    if (timeoutMs !== null) {
      call._timer = setTimeout(() => call._abort(Status.DEADLINE_EXCEEDED, `deadline of ${timeoutMs} ms exceeded`), timeoutMs);
    }
    if (signal) {
      if (signal.aborted) call.cancel();
      else signal.addEventListener("abort", () => call.cancel(), { once: true });
    }
    this._scheduleFlush();
    return call;
  }

  /** Close the connection: GOAWAY OK, then the transport; calls in progress fail with CANCELLED. */
  close(reason = "client closed the connection") {
    if (this.error !== null) return;
    this.conn.close(Status.OK, reason);
    this._finishAll(new ZrpcError(Status.CANCELLED, reason));
  }

  // -------------------------------------------------------------- internals

  _scheduleFlush() {
    if (this._flushQueued) return;
    this._flushQueued = true;
    queueMicrotask(() => this._flush());
  }

  _flush() {
    this._flushQueued = false;
    if (!this.conn.hasDataToSend || this._transportClosed) return;
    const data = this.conn.dataToSend();
    // A WebSocket message may carry at most max(max_message_size, 64 KiB) + 10 bytes (section 1.1).
    const peerMax = this.conn.peer ? this.conn.peer.max_message_size : 0;
    const chunk = Math.max(peerMax, CONTROL_FRAME_LIMIT) + HEADER_SIZE;
    try {
      for (let pos = 0; pos < data.length; pos += chunk) this.transport.send(data.subarray(pos, pos + chunk));
    } catch (err) {
      this._lost(err);
    }
  }

  _receive(bytes) {
    if (this.error !== null) return;
    const events = this.conn.receiveData(bytes, nowMs());
    for (const ev of events) {
      const call = this.calls.get(ev.streamId);
      switch (ev.type) {
        case "message":
          if (call) call._push(ev.payload, ev.compressed);
          else this.conn.acknowledge(ev.streamId, ev.payload.length);
          break;
        case "status":
          if (call) call._finish(ev.code, ev.message, ev.details);
          break;
        case "reset":
          if (call) call._finish(ev.code === Status.OK ? Status.UNKNOWN : ev.code, ev.message, null);
          break;
        case "window":
          if (ev.streamId === 0) for (const c of this.calls.values()) c._credit();
          else if (call) call._credit();
          break;
        case "hello":
          clearTimeout(this._handshakeTimer);
          if (!this._ready.settled) {
            this._ready.settled = true;
            this._ready.resolve(this);
          }
          break;
        case "goaway":
          this._onGoaway(ev);
          break;
        case "terminated":
          this._terminate(new ZrpcError(ev.code, ev.message));
          return;
        default:
          break;
      }
    }
    this._flush();
  }

  _onGoaway(ev) {
    this._goaway = ev;
    if (!this._ready.settled) {
      // a refusal in place of the server's HELLO
      this._terminate(new ZrpcError(ev.code === Status.OK ? Status.UNAVAILABLE : ev.code, ev.message || "server refused the connection"));
      return;
    }
    for (const [id, call] of this.calls) {
      if (id > ev.lastStreamId) {
        call._finish(Status.UNAVAILABLE, `refused by the server's GOAWAY (${ev.message || statusName(ev.code)}); safe to retry`, null);
      }
    }
    if (this.onGoaway) {
      try {
        this.onGoaway(ev);
      } catch (err) {
        console.error(err);
      }
    }
  }

  _tick() {
    if (this.error !== null) return;
    for (const ev of this.conn.tick(nowMs())) {
      if (ev.type === "terminated") {
        this._terminate(new ZrpcError(ev.code, ev.message));
        return;
      }
    }
    this._flush();
  }

  /** A connection error found here: GOAWAY (queued by conn.close), flush, close the transport. */
  _terminate(error) {
    if (this.error !== null) return;
    this.conn.close(error.code, error.reason);
    this._finishAll(error);
  }

  _finishAll(error) {
    this.error = error;
    clearTimeout(this._handshakeTimer);
    clearInterval(this._keepalive);
    this._flush();
    this._transportClosed = true;
    try {
      this.transport.close();
    } catch {
      // already closed
    }
    if (!this._ready.settled) {
      this._ready.settled = true;
      this._ready.reject(error);
    }
    for (const call of [...this.calls.values()]) call._finish(error.code, error.reason, null);
    this._closedResolve(error);
  }

  _lost(err) {
    this._transportClosed = true;
    if (this.error !== null) return;
    this.conn.closed = true;
    let error;
    const g = this._goaway;
    if (g !== null && g.code !== Status.OK) error = new ZrpcError(g.code, g.message);
    else error = new ZrpcError(Status.UNAVAILABLE, err ? `connection lost: ${err.message || err}` : "connection lost");
    this._finishAll(error);
  }
}

/**
 * One call (stream). send(message, {end}), closeSend(), receive() (the next
 * response, undefined after a successful end, throws ZrpcError), cancel(),
 * closeAndReceive() for client streaming, and `for await (const m of call)`.
 * After the end: call.code / call.statusMessage / call.details.
 */
export class Call {
  constructor(client, streamId, method, kind) {
    this.client = client;
    this.streamId = streamId;
    this.method = method;
    this.kind = kind;
    this.code = null; // set when the call is over
    this.statusMessage = "";
    this.details = null;
    this._inbox = [];
    this._waiter = null;
    this._creditWaiter = null;
    this._timer = null;
  }

  get done() {
    return this.code !== null;
  }

  get error() {
    return this.code === null || this.code === Status.OK ? null : new ZrpcError(this.code, this.statusMessage, this.details);
  }

  async send(message, { end = false } = {}) {
    await this._sendRaw(this.client.codec.encode(message), end);
  }

  async _sendRaw(payload, end) {
    const conn = this.client.conn;
    for (;;) {
      if (this.code !== null) {
        throw this.error ?? new ZrpcError(Status.CANCELLED, `stream ended: ${this.method} already finished`);
      }
      if (conn.sendCredit(this.streamId) > 0) {
        conn.sendMessage(this.streamId, payload, { endStream: end });
        this.client._scheduleFlush();
        return;
      }
      await new Promise((resolve) => {
        this._creditWaiter = resolve;
      });
    }
  }

  /** Half-close (client streaming and bidi). */
  closeSend() {
    const conn = this.client.conn;
    const st = conn.streams.get(this.streamId);
    if (this.code !== null || st === undefined || st.state !== OPEN) return;
    conn.endStream(this.streamId);
    this.client._scheduleFlush();
  }

  async receive() {
    while (this._inbox.length === 0) {
      if (this.code !== null) {
        if (this.code !== Status.OK) throw this.error;
        return undefined;
      }
      await new Promise((resolve) => {
        this._waiter = resolve;
      });
    }
    const { payload, compressed } = this._inbox.shift();
    const client = this.client;
    client.conn.acknowledge(this.streamId, payload.length);
    client._scheduleFlush();
    let raw = payload;
    if (compressed) {
      try {
        raw = await inflate(payload, client.conn.local.max_message_size);
      } catch (err) {
        this.cancel(`undecodable compressed message: ${err.reason ?? err.message}`);
        throw err;
      }
    }
    try {
      return client.codec.decode(raw);
    } catch (err) {
      this.cancel(`undecodable response: ${err.message}`);
      throw new ZrpcError(Status.INTERNAL, `undecodable response from ${this.method}: ${err.message}`);
    }
  }

  /** Client streaming: half-close and wait for the single response. */
  async closeAndReceive() {
    this.closeSend();
    return this._single();
  }

  async _single() {
    const response = await this.receive();
    if (response === undefined) throw new ZrpcError(Status.INTERNAL, `${this.method} ended without a response`);
    const extra = await this.receive(); // the STATUS (throws if it is an error)
    if (extra !== undefined) {
      this.cancel("more than one response");
      throw new ZrpcError(Status.INTERNAL, `${this.method} sent more than one response`);
    }
    return response;
  }

  /** Abandon the call: RESET CANCELLED. */
  cancel(reason = "cancelled by the client") {
    this._abort(Status.CANCELLED, reason);
  }

  _abort(code, reason) {
    if (this.code !== null) return;
    const conn = this.client.conn;
    conn.resetStream(this.streamId, code, reason);
    // messages received but never read: give their connection credit back
    for (const { payload } of this._inbox) conn.acknowledge(this.streamId, payload.length);
    this._inbox = [];
    this.client._scheduleFlush();
    this._finish(code, reason, null);
  }

  [Symbol.asyncIterator]() {
    return {
      next: async () => {
        const value = await this.receive();
        return value === undefined ? { done: true, value: undefined } : { done: false, value };
      },
      return: async () => {
        this.cancel();
        return { done: true, value: undefined };
      },
    };
  }

  // called by the client
  _push(payload, compressed) {
    this._inbox.push({ payload, compressed });
    this._wake();
  }

  _credit() {
    const w = this._creditWaiter;
    this._creditWaiter = null;
    if (w) w();
  }

  _finish(code, message, details) {
    if (this.code !== null) return;
    this.code = statusCode(code);
    this.statusMessage = message;
    this.details = details;
    clearTimeout(this._timer);
    this.client.calls.delete(this.streamId);
    this._wake();
    this._credit();
  }

  _wake() {
    const w = this._waiter;
    this._waiter = null;
    if (w) w();
  }
}

// ---------------------------------------------------------------- transports

/**
 * Open a WebSocket to the broker's /zrpc endpoint (wss://host:port/zrpc) and
 * resolve with a transport once it is open. In Node 20 pass
 * {WebSocket} (or run with --experimental-websocket); Node >= 22 and browsers
 * have a global WebSocket.
 */
export function webSocketTransport(url, { WebSocket: WS = globalThis.WebSocket } = {}) {
  return new Promise((resolve, reject) => {
    if (typeof WS !== "function") {
      reject(new Error("no WebSocket implementation (Node 20: run with --experimental-websocket or pass {WebSocket})"));
      return;
    }
    let ws;
    try {
      ws = new WS(url);
    } catch (err) {
      reject(new ZrpcError(Status.UNAVAILABLE, `cannot connect to ${url}: ${err.message}`));
      return;
    }
    ws.binaryType = "arraybuffer";
    let opened = false;
    let ended = false;
    const transport = {
      url,
      onbytes: null,
      onclose: null,
      send(bytes) {
        ws.send(bytes);
      },
      close() {
        if (ws.readyState === 0 || ws.readyState === 1) ws.close(1000);
      },
      get bufferedAmount() {
        return ws.bufferedAmount;
      },
    };
    const end = (err) => {
      if (ended) return;
      ended = true;
      if (transport.onclose) transport.onclose(err);
    };
    ws.onopen = () => {
      opened = true;
      resolve(transport);
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        ws.close(1003, "zrpc uses binary messages");
        end(new Error("text message on a zrpc WebSocket"));
        return;
      }
      if (transport.onbytes) transport.onbytes(new Uint8Array(ev.data));
    };
    ws.onclose = (ev) => {
      if (!opened) {
        reject(new ZrpcError(Status.UNAVAILABLE, `cannot connect to ${url} (WebSocket close code ${ev.code})`));
        return;
      }
      end(ev.code === 1000 ? null : new Error(`WebSocket closed with code ${ev.code}${ev.reason ? ` (${ev.reason})` : ""}`));
    };
    ws.onerror = () => {}; // close follows
  });
}

/**
 * Two connected in-memory transports (tests): bytes sent on one arrive on the
 * other in a later microtask; close() closes both.
 */
export function memoryTransportPair() {
  const make = () => ({ onbytes: null, onclose: null, closed: false, sent: [] });
  const a = make();
  const b = make();
  const wire = (self, peer) => {
    self.send = (bytes) => {
      if (self.closed) throw new Error("transport closed");
      const copy = bytes.slice();
      self.sent.push(copy);
      queueMicrotask(() => {
        if (!peer.closed && peer.onbytes) peer.onbytes(copy);
      });
    };
    self.close = () => {
      if (self.closed) return;
      self.closed = true;
      queueMicrotask(() => {
        if (!peer.closed) {
          peer.closed = true;
          if (peer.onclose) peer.onclose(null);
        }
        if (self.onclose) self.onclose(null);
      });
    };
  };
  wire(a, b);
  wire(b, a);
  return [a, b];
}
