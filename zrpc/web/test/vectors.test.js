// The protocol conformance vectors (tests/vectors/protocol.json) against the client Connection.
// The Python reference runs the same file (tests/test_protocol_vectors.py), both roles; this
// client implements only the client role, so it runs the client cases.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { decode } from "../vendor/msgpack.mjs";

import { Connection, FrameDecoder, FrameType } from "../zrpc.js";

const VECTORS = JSON.parse(readFileSync(new URL("../../../tests/vectors/protocol.json", import.meta.url), "utf8"));
const TYPE_NAMES = Object.fromEntries(Object.entries(FrameType).map(([k, v]) => [v, k]));
const fromHex = (h) => Uint8Array.from(h.match(/../g) ?? [], (b) => parseInt(b, 16));
const toHex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

function start(c) {
  const conn = new Connection();
  if (c.start === "fresh") return conn;
  conn.sendHello();
  if (c.start === "ready") conn.receiveData(fromHex(VECTORS.peer_hello.client));
  conn.dataToSend();
  return conn;
}

function framesOut(conn) {
  return new FrameDecoder(2 ** 32 - 1).feed(conn.dataToSend()).map(({ type, streamId, payload }) => {
    const f = { type: TYPE_NAMES[type], stream: streamId };
    if (f.type === "RESET" || f.type === "STATUS") f.code = decode(payload)[0];
    else if (f.type === "GOAWAY") [f.last_stream_id, f.code] = decode(payload);
    else if (f.type === "PING" || f.type === "PONG") f.payload = toHex(payload);
    return f;
  });
}

const clientCases = VECTORS.cases.filter((c) => c.role === "client");

test("the vectors hold client cases", () => {
  assert.ok(clientCases.length >= 5);
});

for (const c of clientCases) {
  test(`vector: ${c.name} (section ${c.section})`, () => {
    const conn = start(c);
    c.steps.forEach((step, i) => {
      if (step.in !== undefined) conn.receiveData(fromHex(step.in));
      else if (step.do === "open") conn.openStream(step.method);
      else if (step.do === "close") conn.close(step.code, "closing");
      else throw new Error(`unknown step ${JSON.stringify(step)}`);
      const got = framesOut(conn);
      const ok = got.length === step.out.length
        && step.out.every((want, k) => Object.entries(want).every(([key, v]) => got[k][key] === v));
      assert.ok(ok, `step ${i} (${step.note}): sent ${JSON.stringify(got)}, expected ${JSON.stringify(step.out)}`);
      if (step.closed !== undefined && step.closed !== null) assert.equal(conn.closed, step.closed, `step ${i}: closed`);
    });
  });
}
