// Test support (no tests here): the doc's worked example and a scripted server end.

import { readFileSync } from "node:fs";

import { decode, encode } from "../vendor/msgpack.mjs";

import { FrameDecoder, FrameType, encodeFrame, memoryTransportPair } from "../zrpc.js";

const DOC = new URL("../../../docs/protocol.md", import.meta.url);

/** The frames of docs/protocol.md's ```zrpc-hex block: [{dir, name, bytes}]. */
export function docExample() {
  const text = readFileSync(DOC, "utf8");
  const m = /```zrpc-hex\n([\s\S]*?)```/.exec(text);
  if (!m) throw new Error("docs/protocol.md has no ```zrpc-hex block");
  const frames = [];
  for (const line of m[1].split("\n")) {
    const head = /^#\s*(C->S|S->C)\s+(\w+)/.exec(line);
    if (head) {
      frames.push({ dir: head[1], name: head[2], hex: "" });
    } else if (line.trim() && !line.trimStart().startsWith("#")) {
      frames[frames.length - 1].hex += line.split("|")[0].replace(/\s+/g, "");
    }
  }
  return frames.map(({ dir, name, hex }) => ({ dir, name, bytes: Uint8Array.from(Buffer.from(hex, "hex")) }));
}

export function concat(...parts) {
  return Uint8Array.from(Buffer.concat(parts.map((p) => Buffer.from(p))));
}

export const hex = (bytes) => Buffer.from(bytes).toString("hex");

export const SERVER_DEFAULTS = {
  version: 1, max_message_size: 4194304, max_concurrent_streams: 1024,
  initial_stream_window: 262144, initial_connection_window: 4194304, max_metadata_size: 16384,
};

/**
 * The server end of a memory transport pair, driven by the test: every frame the
 * client sends is decoded into `frames` ({type, flags, streamId, payload, body}) and
 * handed to `onframe`; helpers send frames back.
 */
export class FakeServer {
  constructor() {
    const [clientSide, serverSide] = memoryTransportPair();
    this.transport = clientSide;
    this.side = serverSide;
    this.frames = [];
    this.bytes = [];
    this.onframe = null;
    this.closed = false;
    this._waiters = [];
    this._decoder = new FrameDecoder(2 ** 32 - 1, 2 ** 32 - 1);
    serverSide.onbytes = (bytes) => {
      this.bytes.push(bytes);
      for (const f of this._decoder.feed(bytes)) {
        const body = [FrameType.HELLO, FrameType.OPEN, FrameType.STATUS, FrameType.RESET, FrameType.GOAWAY].includes(f.type)
          ? decode(f.payload) : undefined;
        const frame = { ...f, body };
        this.frames.push(frame);
        if (this.onframe) this.onframe(frame, this);
        this._check();
      }
    };
    serverSide.onclose = () => {
      this.closed = true;
      this._check();
    };
  }

  /** Resolve once `predicate(frames)` holds. */
  until(predicate, what = "condition", timeoutMs = 2000) {
    return new Promise((resolve, reject) => {
      const w = { predicate, resolve };
      this._waiters.push(w);
      const t = setTimeout(() => reject(new Error(`timed out waiting for ${what}; frames: ${JSON.stringify(this.summary())}`)), timeoutMs);
      w.resolve = (v) => {
        clearTimeout(t);
        resolve(v);
      };
      this._check();
    });
  }

  _check() {
    for (const w of [...this._waiters]) {
      const v = w.predicate(this.frames, this);
      if (v) {
        this._waiters.splice(this._waiters.indexOf(w), 1);
        w.resolve(v);
      }
    }
  }

  summary() {
    return this.frames.map((f) => [f.type, f.flags, f.streamId, f.payload.length]);
  }

  of(type) {
    return this.frames.filter((f) => f.type === type);
  }

  raw(bytes) {
    this.side.send(bytes);
  }

  send(type, flags, streamId, payload) {
    this.side.send(encodeFrame(type, flags, streamId, payload));
  }

  hello(settings = {}) {
    this.send(FrameType.HELLO, 0, 0, encode({ ...SERVER_DEFAULTS, ...settings }));
  }

  message(streamId, value, flags = 0) {
    this.send(FrameType.MESSAGE, flags, streamId, value instanceof Uint8Array ? value : encode(value));
  }

  status(streamId, code = 0, message = "", details = null) {
    this.send(FrameType.STATUS, 0, streamId, encode([code, message, details]));
  }

  reset(streamId, code, message = "") {
    this.send(FrameType.RESET, 0, streamId, encode([code, message]));
  }

  window(streamId, increment) {
    const p = new Uint8Array(4);
    new DataView(p.buffer).setUint32(0, increment);
    this.send(FrameType.WINDOW, 0, streamId, p);
  }

  goaway(lastStreamId, code, message = "") {
    this.send(FrameType.GOAWAY, 0, 0, encode([lastStreamId, code, message]));
  }

  ping(data) {
    this.send(FrameType.PING, 0, 0, data);
  }

  close() {
    this.side.close();
  }
}

/** The WINDOW increments the client sent on `streamId`. */
export function windows(server, streamId) {
  return server.of(FrameType.WINDOW).filter((f) => f.streamId === streamId)
    .map((f) => new DataView(f.payload.buffer, f.payload.byteOffset, 4).getUint32(0));
}

export const tick = () => new Promise((r) => setTimeout(r, 0));
