// The Client (calls over a transport) against a scripted server end (run: node --test zrpc/web/test/).

import assert from "node:assert/strict";
import { test } from "node:test";
import { deflateSync } from "node:zlib";

import { decode, encode } from "../vendor/msgpack.mjs";

import { Client, Flag, FrameType, Status, ZrpcError } from "../zrpc.js";
import { FakeServer, concat, docExample, hex, tick, windows } from "./fake-server.js";

/** A Client connected to a FakeServer whose HELLO carries `settings`. */
async function setup(settings = {}, options = {}) {
  const server = new FakeServer();
  const connecting = Client.connect(server.transport, { keepaliveIntervalMs: null, ...options });
  await server.until((fs) => fs.length >= 1, "client HELLO");
  server.hello(settings);
  const client = await connecting;
  return { server, client };
}

const opens = (server) => server.of(FrameType.OPEN);
const messagesOn = (server, sid) => server.of(FrameType.MESSAGE).filter((f) => f.streamId === sid);

test("a unary call sends exactly the worked example's bytes", async () => {
  const [cHello, sHello, cOpen, cMsg, sMsg, sStatus] = docExample().map((f) => f.bytes);
  const server = new FakeServer();
  const connecting = Client.connect(server.transport, { userAgent: "zrpc-python", keepaliveIntervalMs: null });
  await server.until((fs) => fs.length === 1, "HELLO");
  assert.equal(hex(server.bytes[0]), hex(cHello));
  server.raw(sHello);
  const client = await connecting;
  assert.equal(client.serverSettings.max_message_size, 4194304);
  const answer = client.unary("Health/Check", {}, { timeoutMs: 5000 });
  await server.until((fs) => fs.length === 3, "OPEN + MESSAGE");
  assert.equal(hex(concat(...server.bytes.slice(1))), hex(concat(cOpen, cMsg)), "OPEN and MESSAGE in one write");
  server.raw(concat(sMsg, sStatus));
  assert.deepEqual(await answer, { status: "SERVING" });
  assert.equal(client.calls.size, 0);
  client.close();
  await server.until((_, s) => s.closed, "transport closed");
  assert.deepEqual(server.of(FrameType.GOAWAY).at(-1).body.slice(0, 2), [0, Status.OK]);
});

test("the token travels in HELLO; a refusal GOAWAY rejects connect with its status", async () => {
  const server = new FakeServer();
  const connecting = Client.connect(server.transport, { token: "t0k3n", keepaliveIntervalMs: null });
  await server.until((fs) => fs.length === 1, "HELLO");
  assert.equal(server.frames[0].body.token, "t0k3n");
  server.goaway(0, Status.UNAUTHENTICATED, "invalid token: signature");
  await assert.rejects(connecting, (err) => err instanceof ZrpcError && err.status === "UNAUTHENTICATED"
    && err.reason === "invalid token: signature");
  await server.until((_, s) => s.closed, "transport closed");
});

test("statuses become ZrpcError with the status name, code, reason and details", async () => {
  const { server, client } = await setup();
  const call = client.unary("Chat/ListUsers", { room: "x" });
  await server.until((fs) => opens(server).length === 1 && fs.length >= 3, "call");
  server.status(1, Status.NOT_FOUND, "no such room", { retry_after_ms: 250 });
  await assert.rejects(call, (err) => err instanceof ZrpcError && err.status === "NOT_FOUND" && err.code === 5
    && err.reason === "no such room" && err.details.retry_after_ms === 250 && err.message === "NOT_FOUND: no such room");
  const unknown = client.unary("A/B", {});
  await server.until(() => opens(server).length === 2, "second call");
  server.status(3, 99, "odd code");
  await assert.rejects(unknown, (err) => err.status === "UNKNOWN" && err.code === 2);
  const reset = client.unary("A/C", {});
  await server.until(() => opens(server).length === 3, "third call");
  server.reset(5, Status.RESOURCE_EXHAUSTED, "max_concurrent_streams (1) reached");
  await assert.rejects(reset, (err) => err.status === "RESOURCE_EXHAUSTED");
  client.close();
});

test("the four call patterns", async () => {
  const { server, client } = await setup();
  // the scripted server: echo per pattern
  server.onframe = (f, s) => {
    if (f.type === FrameType.OPEN) s.methods = { ...s.methods, [f.streamId]: { method: f.body[0], got: [] } };
    const st = s.methods?.[f.streamId];
    if (!st) return;
    if (f.type === FrameType.MESSAGE) {
      const m = decode(f.payload);
      st.got.push(m);
      if (st.method === "Echo/Chat") s.message(f.streamId, { echo: m.n });
      if (st.method === "Echo/Count") {
        for (let i = 0; i < m.n; i++) s.message(f.streamId, { i });
        s.status(f.streamId);
      }
      if (st.method === "Echo/Say") {
        s.message(f.streamId, { ...m, said: true });
        s.status(f.streamId);
      }
    }
    const ended = f.type === FrameType.END || (f.type === FrameType.MESSAGE && f.flags & Flag.END_STREAM);
    if (ended && st.method === "Echo/Sum") {
      s.message(f.streamId, { sum: st.got.reduce((a, m) => a + m.n, 0) });
      s.status(f.streamId);
    }
    if (ended && st.method === "Echo/Chat") s.status(f.streamId);
  };

  assert.deepEqual(await client.unary("Echo/Say", { text: "hi" }), { text: "hi", said: true });

  const up = await client.clientStream("Echo/Sum");
  for (const n of [1, 2, 3]) await up.send({ n });
  assert.deepEqual(await up.closeAndReceive(), { sum: 6 });

  const down = await client.serverStream("Echo/Count", { n: 4 });
  const got = [];
  for await (const m of down) got.push(m.i);
  assert.deepEqual(got, [0, 1, 2, 3]);
  assert.equal(down.code, Status.OK);

  const chat = await client.bidi("Echo/Chat", { metadata: { "zrpc-shard-key": "k" }, timeoutMs: 10000 });
  const echoes = [];
  for (const n of [7, 8]) {
    await chat.send({ n });
    echoes.push((await chat.receive()).echo);
  }
  chat.closeSend();
  assert.equal(await chat.receive(), undefined);
  assert.deepEqual(echoes, [7, 8]);

  const [sayOpen, sumOpen, countOpen, chatOpen] = opens(server);
  assert.deepEqual(sayOpen.body, ["Echo/Say", null, {}]);
  assert.deepEqual([sumOpen.streamId, countOpen.streamId, chatOpen.streamId], [3, 5, 7]);
  assert.deepEqual(chatOpen.body, ["Echo/Chat", 10000, { "zrpc-shard-key": "k" }]);
  // unary and server streaming half-close with END_STREAM on their one message; client streaming with END
  assert.equal(messagesOn(server, 1)[0].flags, Flag.END_STREAM);
  assert.equal(messagesOn(server, 5)[0].flags, Flag.END_STREAM);
  assert.ok(server.of(FrameType.END).some((f) => f.streamId === 3));
  assert.ok(server.of(FrameType.END).some((f) => f.streamId === 7));
  client.close();
});

test("the client waits for send credit and never overruns the server's windows", async () => {
  const { server, client } = await setup({ initial_stream_window: 1000, initial_connection_window: 1500 });
  const call = await client.clientStream("Up/Load");
  const sending = (async () => {
    for (let i = 0; i < 10; i++) await call.send(new Uint8Array(600 - 3)); // 600 bytes encoded (bin16)
  })();
  await server.until(() => messagesOn(server, 1).length === 2, "two messages");
  await tick();
  await tick();
  assert.equal(messagesOn(server, 1).length, 2, "1000-byte window: 600 + an overshooting 600, then wait");
  server.window(1, 700); // stream credit 1000-1200+700 = 500, connection credit 1500-1200 = 300
  await server.until(() => messagesOn(server, 1).length === 3, "third message");
  await tick();
  assert.equal(messagesOn(server, 1).length, 3, "connection credit now -300");
  let extra = 0;
  const finish = setInterval(() => {
    const n = messagesOn(server, 1).length;
    if (n > extra) {
      extra = n;
      server.window(0, 600);
      server.window(1, 600);
    }
  }, 1);
  await sending;
  clearInterval(finish);
  assert.equal(messagesOn(server, 1).length, 10);
  assert.ok(messagesOn(server, 1).every((f) => f.payload.length === 600));
  call.cancel();
  client.close();
});

test("consumed bytes go back as WINDOW only as the application reads them", async () => {
  const { server, client } = await setup({}, { settings: { initial_connection_window: 800000 } });
  const stream = await client.serverStream("Big/Stream", {});
  await server.until(() => opens(server).length === 1, "OPEN");
  const payload = encode({ blob: new Uint8Array(2048 - 9) }); // 2048 bytes each
  assert.equal(payload.length, 2048);
  for (let i = 0; i < 100; i++) server.message(1, payload);
  await tick();
  await tick();
  assert.deepEqual(windows(server, 1), [], "nothing read yet: no credit returned");
  for (let read = 1; read <= 100; read++) {
    const m = await stream.receive();
    assert.equal(m.blob.length, 2039);
    await tick();
    if (read === 31) assert.deepEqual(windows(server, 1), [], "31 x 2048 < 64 KiB");
    if (read === 32) assert.deepEqual(windows(server, 1), [65536], "a quarter of 256 KiB consumed");
  }
  assert.deepEqual(windows(server, 1), [65536, 65536, 65536]);
  assert.deepEqual(windows(server, 0), [98 * 2048], "a quarter of the 800000-byte connection window");
  // after the STATUS, consumed bytes return connection credit only
  for (let i = 0; i < 120; i++) server.message(1, payload);
  server.status(1);
  let rest = 0;
  for await (const _ of stream) rest++;
  assert.equal(rest, 120);
  await tick();
  assert.deepEqual(windows(server, 1), [65536, 65536, 65536]);
  assert.deepEqual(windows(server, 0), [98 * 2048, 98 * 2048]);
  client.close();
});

test("PING gets a PONG; deadline and cancel send RESET; compressed messages are inflated", async () => {
  const { server, client } = await setup();
  server.ping(Uint8Array.of(9, 9, 9, 9, 1, 2, 3, 4));
  await server.until(() => server.of(FrameType.PONG).length === 1, "PONG");
  assert.equal(hex(server.of(FrameType.PONG)[0].payload), "0909090901020304");

  const slow = client.unary("Slow/Call", {}, { timeoutMs: 30 });
  await assert.rejects(slow, (e) => e.status === "DEADLINE_EXCEEDED");
  await server.until(() => server.of(FrameType.RESET).length === 1, "RESET");
  assert.deepEqual(server.of(FrameType.RESET)[0].body[0], Status.DEADLINE_EXCEEDED);

  const stream = await client.serverStream("Room/Sub", {});
  const sid = stream.streamId;
  server.message(sid, deflateSync(Buffer.from(encode({ text: "x".repeat(5000) }))), Flag.COMPRESSED);
  assert.equal((await stream.receive()).text.length, 5000);
  const bomb = deflateSync(Buffer.alloc(5 * 1024 * 1024));
  server.message(sid, Uint8Array.from(bomb), Flag.COMPRESSED);
  await assert.rejects(stream.receive(), (e) => e.status === "RESOURCE_EXHAUSTED");
  await server.until(() => server.of(FrameType.RESET).some((f) => f.streamId === sid), "RESET of the bomb's stream");
  const iter = await client.serverStream("Room/Sub", {});
  const loop = (async () => {
    for await (const _ of iter) break; // leaving the loop cancels the call
  })();
  server.message(iter.streamId, { hello: 1 });
  await loop;
  await server.until(() => server.of(FrameType.RESET).some((f) => f.streamId === iter.streamId), "RESET CANCELLED");
  assert.deepEqual(server.of(FrameType.RESET).find((f) => f.streamId === iter.streamId).body, [Status.CANCELLED, "cancelled by the client"]);
  client.close();
});

test("GOAWAY: streams above last_stream_id fail UNAVAILABLE, others finish, new calls are refused", async () => {
  let seen = null;
  const { server, client } = await setup({}, { onGoaway: (g) => { seen = g; } });
  const first = await client.serverStream("A/Sub", {});
  const second = await client.serverStream("A/Sub", {});
  await server.until(() => opens(server).length === 2, "two OPENs");
  server.goaway(1, Status.OK, "server is shutting down");
  await assert.rejects(second.receive(), (e) => e.status === "UNAVAILABLE" && /safe to retry/.test(e.reason));
  assert.deepEqual(seen, { type: "goaway", lastStreamId: 1, code: 0, message: "server is shutting down" });
  await assert.rejects(client.unary("A/B", {}), (e) => e.status === "UNAVAILABLE");
  server.message(1, { still: "here" });
  server.status(1);
  assert.deepEqual(await first.receive(), { still: "here" });
  assert.equal(await first.receive(), undefined);
  client.close();
});

test("a lost connection fails calls with UNAVAILABLE (or the GOAWAY's code)", async () => {
  const { server, client } = await setup();
  const stream = await client.serverStream("A/Sub", {});
  server.close();
  await assert.rejects(stream.receive(), (e) => e.status === "UNAVAILABLE" && /connection lost/.test(e.reason));
  const err = await client.closed;
  assert.equal(err.status, "UNAVAILABLE");
  await assert.rejects(client.unary("A/B", {}), (e) => e.status === "UNAVAILABLE");

  const b = await setup();
  const s2 = await b.client.serverStream("A/Sub", {});
  b.server.goaway(1, Status.UNAUTHENTICATED, "token expired");
  b.server.close();
  await assert.rejects(s2.receive(), (e) => e.status === "UNAUTHENTICATED" && e.reason === "token expired");
});

test("the client turns a server's protocol violation into GOAWAY and closes", async () => {
  const { server, client } = await setup({}, { settings: { max_message_size: 1000 } });
  const stream = await client.serverStream("A/Sub", {});
  server.message(stream.streamId, new Uint8Array(1001));
  await assert.rejects(stream.receive(), (e) => e.status === "RESOURCE_EXHAUSTED");
  await server.until((_, s) => s.closed, "closed");
  const g = server.of(FrameType.GOAWAY).at(-1).body;
  assert.deepEqual(g.slice(0, 2), [0, Status.RESOURCE_EXHAUSTED]);
  assert.match(g[2], /max_message_size 1000/);
});

test("WebSocket messages stay within max(max_message_size, 64 KiB) + 10 bytes", async () => {
  const { server, client } = await setup({ max_message_size: 100000 });
  const call = await client.clientStream("Up/Load");
  await server.until(() => opens(server).length === 1, "OPEN");
  const before = server.bytes.length;
  await call.send(new Uint8Array(99990));
  await call.send(new Uint8Array(99990));
  await server.until(() => messagesOn(server, 1).length === 2, "two messages");
  const writes = server.bytes.slice(before);
  assert.ok(writes.every((w) => w.length <= 100010), writes.map((w) => w.length).join(","));
  assert.equal(writes.reduce((a, w) => a + w.length, 0), 2 * (99995 + 10));
  call.cancel();
  client.close();
});
