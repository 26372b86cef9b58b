// Frames and the sans-IO Connection against docs/protocol.md (run: node --test zrpc/web/test/).

import assert from "node:assert/strict";
import { test } from "node:test";

import { decode, encode } from "../vendor/msgpack.mjs";

import {
  CONTROL_FRAME_LIMIT, Connection, Flag, FlowControlBlocked, FrameDecoder, FrameType, HEADER_SIZE,
  ProtocolError, Status, ZrpcError, backoffDelay, encodeFrame, statusName,
} from "../zrpc.js";
import { SERVER_DEFAULTS, concat, docExample, hex } from "./fake-server.js";

const frame = (type, flags, sid, payload = new Uint8Array(0)) => encodeFrame(type, flags, sid, payload);
const u32 = (n) => {
  const p = new Uint8Array(4);
  new DataView(p.buffer).setUint32(0, n);
  return p;
};

/** A client Connection that has the server's HELLO (optionally with other settings). */
function connected(server = {}, local = {}) {
  const conn = new Connection(local);
  conn.sendHello({ user_agent: "test" });
  conn.dataToSend();
  const events = conn.receiveData(frame(FrameType.HELLO, 0, 0, encode({ ...SERVER_DEFAULTS, ...server })));
  assert.equal(events[0].type, "hello");
  return conn;
}

function goawayOf(bytes) {
  const frames = new FrameDecoder(2 ** 32 - 1).feed(bytes);
  const g = frames.find((f) => f.type === FrameType.GOAWAY);
  return g ? decode(g.payload) : null;
}

// ---------------------------------------------------------------- section 14

test("the worked example's frames have the types, lengths and stream ids the doc names", () => {
  const frames = docExample();
  assert.deepEqual(frames.map((f) => `${f.dir} ${f.name}`),
    ["C->S HELLO", "S->C HELLO", "C->S OPEN", "C->S MESSAGE", "S->C MESSAGE", "S->C STATUS"]);
  for (const f of frames) {
    const decoded = new FrameDecoder(4194304).feed(f.bytes);
    assert.equal(decoded.length, 1, f.name);
    const [d] = decoded;
    assert.equal(d.type, FrameType[f.name]);
    assert.equal(d.payload.length + HEADER_SIZE, f.bytes.length);
    assert.equal(d.streamId, f.name === "HELLO" ? 0 : 1);
    // re-encoding the decoded frame gives the same bytes
    assert.equal(hex(encodeFrame(d.type, d.flags, d.streamId, d.payload)), hex(f.bytes));
  }
  const [, , open, msg, reply, status] = frames.map((f) => new FrameDecoder(4194304).feed(f.bytes)[0]);
  assert.deepEqual(decode(open.payload), ["Health/Check", 5000, {}]);
  assert.equal(msg.flags, Flag.END_STREAM);
  assert.deepEqual(decode(msg.payload), {});
  assert.deepEqual(decode(reply.payload), { status: "SERVING" });
  assert.deepEqual(decode(status.payload), [0, "", null]);
});

test("the client Connection produces the example's bytes exactly and decodes the server's", () => {
  const [cHello, sHello, cOpen, cMsg, sMsg, sStatus] = docExample().map((f) => f.bytes);
  const conn = new Connection();
  conn.sendHello({ user_agent: "zrpc-python" });
  assert.equal(hex(conn.dataToSend()), hex(cHello));

  const hello = conn.receiveData(sHello);
  assert.equal(hello.length, 1);
  assert.equal(hello[0].type, "hello");
  assert.deepEqual(hello[0].settings, SERVER_DEFAULTS);

  const sid = conn.openStream("Health/Check", {}, 5000);
  assert.equal(sid, 1);
  conn.sendMessage(sid, encode({}), { endStream: true });
  assert.equal(hex(conn.dataToSend()), hex(concat(cOpen, cMsg)));

  // the server's two frames arrive split at every possible byte boundary
  const both = concat(sMsg, sStatus);
  for (let cut = 0; cut <= both.length; cut++) {
    const c = new Connection();
    c.sendHello({ user_agent: "zrpc-python" });
    c.receiveData(sHello);
    c.openStream("Health/Check", {}, 5000);
    c.sendMessage(1, encode({}), { endStream: true });
    c.dataToSend();
    const events = [...c.receiveData(both.subarray(0, cut)), ...c.receiveData(both.subarray(cut))];
    assert.deepEqual(events.map((e) => e.type), ["message", "status"], `cut at ${cut}`);
    assert.deepEqual(decode(events[0].payload), { status: "SERVING" });
    assert.equal(events[0].compressed, false);
    assert.deepEqual([events[1].code, events[1].message, events[1].details], [0, "", null]);
    assert.equal(c.streams.size, 0, "STATUS closes the stream");
  }
  // No WINDOW: 16 bytes are far below a quarter of the 256 KiB window.
  const c = conn;
  c.receiveData(both);
  c.acknowledge(1, 16);
  assert.equal(c.hasDataToSend, false);
});

test("HELLO carries version, the five settings, then user_agent and token", () => {
  const conn = new Connection({ initial_stream_window: 1024 });
  conn.sendHello({ user_agent: "zrpc-web", token: "secret" });
  const [f] = new FrameDecoder(4194304).feed(conn.dataToSend());
  const body = decode(f.payload);
  assert.deepEqual(Object.keys(body), ["version", "max_message_size", "max_concurrent_streams",
    "initial_stream_window", "initial_connection_window", "max_metadata_size", "user_agent", "token"]);
  assert.equal(body.initial_stream_window, 1024);
  assert.equal(body.token, "secret");
  assert.throws(() => new Connection({ initial_stream_window: 2 ** 31 }), RangeError);
  assert.throws(() => new Connection({ max_metadata_size: 70000 }), RangeError);
});

// ------------------------------------------------------------ frame decoder

test("the decoder rejects bad headers before buffering the payload", () => {
  const cases = [
    [frame(0, 0, 0), Status.INTERNAL, /unknown frame type 0x00/],
    [frame(0x0b, 0, 0), Status.INTERNAL, /unknown frame type 0x0b/],
    [encodeFrame(FrameType.MESSAGE, 0, 1, new Uint8Array(101)).subarray(0, HEADER_SIZE), Status.RESOURCE_EXHAUSTED, /exceeds max_message_size 100/],
    [encodeFrame(FrameType.OPEN, 0, 1, new Uint8Array(CONTROL_FRAME_LIMIT + 1)).subarray(0, HEADER_SIZE), Status.RESOURCE_EXHAUSTED, /control frame limit/],
    [frame(FrameType.PING, 0, 2 ** 31, new Uint8Array(8)), Status.INTERNAL, /stream id .* out of range/],
  ];
  for (const [bytes, code, pattern] of cases) {
    const d = new FrameDecoder(100);
    assert.throws(() => d.feed(bytes), (err) => err instanceof ProtocolError && err.code === code && pattern.test(err.message));
  }
  // a maximal MESSAGE is fine, and a header alone buffers only the header
  const d = new FrameDecoder(100);
  assert.deepEqual(d.feed(encodeFrame(FrameType.MESSAGE, 0, 1, new Uint8Array(100)).subarray(0, 50)), []);
  assert.equal(d.buffered, 50);
});

test("a connection error queues GOAWAY [0, code, message] and ends the connection", () => {
  const conn = connected({}, { max_message_size: 100 });
  const events = conn.receiveData(encodeFrame(FrameType.MESSAGE, 0, 1, new Uint8Array(200)).subarray(0, 10));
  assert.deepEqual(events.map((e) => [e.type, e.code]), [["terminated", Status.RESOURCE_EXHAUSTED]]);
  const g = goawayOf(conn.dataToSend());
  assert.equal(g[0], 0);
  assert.equal(g[1], Status.RESOURCE_EXHAUSTED);
  assert.match(g[2], /max_message_size/);
  assert.equal(conn.closed, true);
  assert.deepEqual(conn.receiveData(frame(FrameType.PING, 0, 0, new Uint8Array(8))), []);
});

test("connection errors of section 6.1 (client side)", () => {
  const ping = new Uint8Array(8);
  const cases = [
    ["frame before HELLO", (c) => c.receiveData(frame(FrameType.PING, 0, 0, ping)), Status.INTERNAL, false],
    ["HELLO on a stream", (c) => c.receiveData(frame(FrameType.HELLO, 0, 1, encode(SERVER_DEFAULTS))), Status.INTERNAL, false],
    ["HELLO not MessagePack", (c) => c.receiveData(frame(FrameType.HELLO, 0, 0, Uint8Array.of(0xc1))), Status.INTERNAL, false],
    ["HELLO not a map", (c) => c.receiveData(frame(FrameType.HELLO, 0, 0, encode([1]))), Status.INVALID_ARGUMENT, false],
    ["HELLO with an integer key", (c) => c.receiveData(frame(FrameType.HELLO, 0, 0, Uint8Array.of(0x81, 0x01, 0x01))), Status.INVALID_ARGUMENT, false],
    ["HELLO version 2", (c) => c.receiveData(frame(FrameType.HELLO, 0, 0, encode({ ...SERVER_DEFAULTS, version: 2 }))), Status.FAILED_PRECONDITION, false],
    ["HELLO window 0", (c) => c.receiveData(frame(FrameType.HELLO, 0, 0, encode({ ...SERVER_DEFAULTS, initial_stream_window: 0 }))), Status.INVALID_ARGUMENT, false],
    ["HELLO trailing bytes", (c) => c.receiveData(frame(FrameType.HELLO, 0, 0, concat(encode(SERVER_DEFAULTS), [0]))), Status.INTERNAL, false],
    ["OPEN from the server", (c) => c.receiveData(frame(FrameType.OPEN, 0, 2, encode(["A/B", null, {}]))), Status.INTERNAL, true],
    ["MESSAGE on a stream never opened", (c) => c.receiveData(frame(FrameType.MESSAGE, 0, 3, encode({}))), Status.INTERNAL, true],
    ["MESSAGE on stream 0", (c) => c.receiveData(frame(FrameType.MESSAGE, 0, 0, encode({}))), Status.INTERNAL, true],
    ["END from the server", (c) => c.receiveData(frame(FrameType.END, 0, 1)), Status.INTERNAL, true],
    ["END_STREAM from the server", (c) => c.receiveData(frame(FrameType.MESSAGE, Flag.END_STREAM, 1, encode({}))), Status.INTERNAL, true],
    ["STATUS of 2 elements", (c) => c.receiveData(frame(FrameType.STATUS, 0, 1, encode([0, ""]))), Status.INTERNAL, true],
    ["RESET with a string code", (c) => c.receiveData(frame(FrameType.RESET, 0, 1, encode(["1", ""]))), Status.INTERNAL, true],
    ["GOAWAY negative id", (c) => c.receiveData(frame(FrameType.GOAWAY, 0, 0, encode([-1, 0, ""]))), Status.INTERNAL, true],
    ["WINDOW of 3 bytes", (c) => c.receiveData(frame(FrameType.WINDOW, 0, 0, Uint8Array.of(0, 0, 1))), Status.INTERNAL, true],
    ["WINDOW of 0", (c) => c.receiveData(frame(FrameType.WINDOW, 0, 1, u32(0))), Status.INTERNAL, true],
    ["WINDOW above 2^31-1", (c) => c.receiveData(frame(FrameType.WINDOW, 0, 0, u32(2 ** 31 - 1))), Status.RESOURCE_EXHAUSTED, true],
    ["WINDOW for a stream never opened", (c) => c.receiveData(frame(FrameType.WINDOW, 0, 5, u32(1))), Status.INTERNAL, true],
    ["PING on a stream", (c) => c.receiveData(frame(FrameType.PING, 0, 1, ping)), Status.INTERNAL, true],
    ["PONG of 4 bytes", (c) => c.receiveData(frame(FrameType.PONG, 0, 0, u32(1))), Status.INTERNAL, true],
  ];
  for (const [what, act, code, needsHello] of cases) {
    const conn = needsHello ? connected() : new Connection();
    if (needsHello) conn.openStream("A/B");
    conn.dataToSend();
    const events = act(conn);
    assert.equal(events.at(-1)?.type, "terminated", what);
    assert.equal(events.at(-1).code, code, `${what}: ${events.at(-1).message}`);
    assert.equal(goawayOf(conn.dataToSend())[1], code, what);
  }
});

test("GOAWAY may replace the server's HELLO; late frames are ignored", () => {
  const conn = new Connection();
  conn.sendHello();
  const events = conn.receiveData(frame(FrameType.GOAWAY, 0, 0, encode([0, Status.UNAUTHENTICATED, "bad token"])));
  assert.deepEqual(events, [{ type: "goaway", lastStreamId: 0, code: Status.UNAUTHENTICATED, message: "bad token" }]);

  const c = connected();
  const sid = c.openStream("A/B");
  c.resetStream(sid, Status.CANCELLED, "bye");
  // a MESSAGE, STATUS, RESET and WINDOW crossing our RESET are late frames
  const late = c.receiveData(concat(frame(FrameType.MESSAGE, 0, sid, encode({ x: 1 })), frame(FrameType.WINDOW, 0, sid, u32(10)),
    frame(FrameType.STATUS, 0, sid, encode([0, "", null])), frame(FrameType.RESET, 0, sid, encode([1, "x"]))));
  assert.deepEqual(late, []);
  assert.equal(c.closed, false);
});

test("PING is answered with a PONG carrying the same 8 bytes", () => {
  const conn = connected();
  const data = Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8);
  assert.deepEqual(conn.receiveData(frame(FrameType.PING, 0, 0, data)), []);
  assert.equal(hex(conn.dataToSend()), hex(frame(FrameType.PONG, 0, 0, data)));
});

test("keepalive: PING after silence, UNAVAILABLE when no PONG comes back", () => {
  const conn = new Connection({}, { keepaliveIntervalMs: 1000, keepaliveTimeoutMs: 500, now: 0 });
  conn.sendHello();
  conn.receiveData(frame(FrameType.HELLO, 0, 0, encode(SERVER_DEFAULTS)), 0);
  conn.dataToSend();
  conn.tick(999);
  assert.equal(conn.hasDataToSend, false);
  conn.tick(1000);
  const [ping] = new FrameDecoder(100).feed(conn.dataToSend());
  assert.equal(ping.type, FrameType.PING);
  assert.equal(ping.payload.length, 8);
  assert.deepEqual(conn.receiveData(frame(FrameType.PONG, 0, 0, ping.payload), 1100).map((e) => e.type), ["pong"]);
  conn.tick(2100);
  conn.dataToSend();
  const events = conn.tick(2601);
  assert.deepEqual(events.map((e) => [e.type, e.code]), [["terminated", Status.UNAVAILABLE]]);
  assert.match(events[0].message, /keepalive timeout/);
});

// ------------------------------------------------------------- flow control

test("send credit: both windows must be > 0, a message may overshoot, WINDOW adds credit", () => {
  const conn = connected({ initial_stream_window: 100, initial_connection_window: 150 });
  const a = conn.openStream("A/B");
  const b = conn.openStream("A/C");
  assert.equal(conn.sendCredit(a), 100);
  conn.sendMessage(a, new Uint8Array(60));
  assert.equal(conn.sendCredit(a), 40);
  conn.sendMessage(a, new Uint8Array(60)); // overshoots: credit was > 0
  assert.equal(conn.sendCredit(a), -20);
  assert.throws(() => conn.sendMessage(a, new Uint8Array(0)), FlowControlBlocked);
  assert.equal(conn.sendCredit(b), 30); // the connection has 150 - 120 left
  conn.sendMessage(b, new Uint8Array(40));
  assert.equal(conn.sendCredit(b), -10);
  assert.deepEqual(conn.receiveData(frame(FrameType.WINDOW, 0, a, u32(50))), [{ type: "window", streamId: a }]);
  assert.equal(conn.sendCredit(a), -10, "the connection window is still exhausted");
  conn.receiveData(frame(FrameType.WINDOW, 0, 0, u32(100)));
  assert.equal(conn.sendCredit(a), 30);
  assert.equal(conn.sendCredit(b), 60);
  conn.sendMessage(a, new Uint8Array(30), { endStream: true });
  assert.throws(() => conn.sendCredit(a), ZrpcError, "no sending after END_STREAM");
});

test("receive windows: WINDOW once a quarter is consumed, overrun is RESOURCE_EXHAUSTED", () => {
  const conn = connected({}, { initial_stream_window: 1000, initial_connection_window: 2000 });
  const sid = conn.openStream("A/B");
  conn.dataToSend();
  conn.receiveData(frame(FrameType.MESSAGE, 0, sid, new Uint8Array(200)));
  conn.acknowledge(sid, 200);
  assert.equal(conn.hasDataToSend, false, "200 < 1000/4");
  conn.receiveData(frame(FrameType.MESSAGE, 0, sid, new Uint8Array(100)));
  conn.acknowledge(sid, 100);
  const frames = new FrameDecoder(100).feed(conn.dataToSend());
  assert.deepEqual(frames.map((f) => [f.type, f.streamId, hex(f.payload)]), [[FrameType.WINDOW, sid, hex(u32(300))]]);
  // the connection counter reaches 2000/4 = 500 at the next 200 bytes
  conn.receiveData(frame(FrameType.MESSAGE, 0, sid, new Uint8Array(200)));
  conn.acknowledge(sid, 200);
  const again = new FrameDecoder(100).feed(conn.dataToSend());
  assert.deepEqual(again.map((f) => [f.streamId, new DataView(f.payload.buffer).getUint32(0)]), [[0, 500]]);
  // stream window now 1000 - 500 + 300 = 800: 800 bytes in, then any further MESSAGE overruns it
  const events = conn.receiveData(concat(frame(FrameType.MESSAGE, 0, sid, new Uint8Array(800)),
    frame(FrameType.MESSAGE, 0, sid, new Uint8Array(0))));
  assert.deepEqual(events.map((e) => e.type), ["message", "terminated"]);
  assert.equal(events[1].code, Status.RESOURCE_EXHAUSTED);
  assert.match(events[1].message, /stream 1 flow-control window exceeded/);
});

test("late MESSAGEs count as consumed at once; closed streams return only connection credit", () => {
  const conn = connected({}, { initial_stream_window: 1000, initial_connection_window: 1000 });
  const sid = conn.openStream("A/B");
  conn.resetStream(sid, Status.CANCELLED);
  conn.dataToSend();
  conn.receiveData(frame(FrameType.MESSAGE, 0, sid, new Uint8Array(300)));
  const frames = new FrameDecoder(100).feed(conn.dataToSend());
  assert.deepEqual(frames.map((f) => [f.type, f.streamId]), [[FrameType.WINDOW, 0]]);

  const c = connected({}, { initial_stream_window: 1000, initial_connection_window: 1000 });
  const s = c.openStream("A/B");
  c.receiveData(concat(frame(FrameType.MESSAGE, 0, s, new Uint8Array(300)), frame(FrameType.STATUS, 0, s, encode([0, "", null]))));
  c.dataToSend();
  c.acknowledge(s, 300); // consumed after the STATUS: no stream WINDOW
  const f2 = new FrameDecoder(100).feed(c.dataToSend());
  assert.deepEqual(f2.map((f) => [f.type, f.streamId]), [[FrameType.WINDOW, 0]]);
});

test("opening streams: odd increasing ids, limits, GOAWAY", () => {
  const conn = connected({ max_concurrent_streams: 2 });
  assert.equal(conn.openStream("A/B"), 1);
  assert.equal(conn.openStream("A/B", { k: "v" }, null), 3);
  assert.throws(() => conn.openStream("A/B"), (e) => e instanceof ZrpcError && e.status === "RESOURCE_EXHAUSTED");
  conn.resetStream(1, Status.CANCELLED);
  assert.throws(() => conn.openStream("A/B", { k: "x".repeat(70000) }), (e) => e.status === "INVALID_ARGUMENT");
  assert.equal(conn.openStream("A/B"), 5);
  const events = conn.receiveData(frame(FrameType.GOAWAY, 0, 0, encode([3, 0, "shutting down"])));
  assert.deepEqual(events[0], { type: "goaway", lastStreamId: 3, code: 0, message: "shutting down" });
  assert.throws(() => conn.openStream("A/B"), (e) => e.status === "UNAVAILABLE");
  assert.throws(() => new Connection().openStream("A/B"), /before the server's HELLO/);
});

test("status names", () => {
  assert.equal(statusName(0), "OK");
  assert.equal(statusName(16), "UNAUTHENTICATED");
  assert.equal(statusName(99), "UNKNOWN");
  const e = new ZrpcError(5, "no such room", { room: "x" });
  assert.equal(e.status, "NOT_FOUND");
  assert.equal(e.message, "NOT_FOUND: no such room");
  assert.deepEqual(e.details, { room: "x" });
  assert.equal(new ZrpcError(42, "?").status, "UNKNOWN");
});

test("backoffDelay doubles from initial to maximum within the jitter", () => {
  const opts = { initial: 250, maximum: 8000, jitter: 0.25 };
  for (const [attempt, base] of [[1, 250], [2, 500], [3, 1000], [6, 8000], [20, 8000]]) {
    for (let i = 0; i < 50; i++) {
      const d = backoffDelay(attempt, opts);
      assert.ok(d >= base * 0.75 && d <= base * 1.25, `attempt ${attempt}: ${d}`);
    }
  }
  assert.equal(backoffDelay(3, { initial: 100, jitter: 0 }), 400);
});
