// The JS client against a real broker (tests/test_web_js.py starts one with the echo app and
// sets ZRPC_TEST_TLS=host:port, ZRPC_TEST_WS=wss://.../zrpc, ZRPC_TEST_CA=<dev CA file>).
// Skipped when those are not set.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Client, Status, webSocketTransport } from "../zrpc.js";
import { tlsTransport } from "../node-transport.js";

const TLS = process.env.ZRPC_TEST_TLS;
const WS = process.env.ZRPC_TEST_WS;
const CA = process.env.ZRPC_TEST_CA;

const transports = {
  "TLS (main listener)": async () => {
    const [host, port] = TLS.split(":");
    return tlsTransport({ host: "localhost", port: Number(port), ca: CA, servername: host === "127.0.0.1" ? "localhost" : host });
  },
  "WebSocket (--web-port)": async () => webSocketTransport(WS),
};

for (const [name, connect] of Object.entries(transports)) {
  describe(`against a real broker over ${name}`, { skip: !TLS || !WS ? "no broker (run tests/test_web_js.py)" : false }, () => {
    test("the four call patterns, statuses, deadlines", async () => {
      const client = await Client.connect(await connect(), { userAgent: "zrpc-js-test" });
      try {
        assert.deepEqual(await client.unary("Health/Check", {}), { status: "SERVING" });
        const said = await client.unary("Echo/Say", { key: "k1", text: "hi" });
        assert.equal(said.text, "hi");
        assert.ok(Number.isInteger(said.pid));

        const sum = await client.clientStream("Echo/Sum", { metadata: { "zrpc-shard-key": "k2" } });
        for (let n = 1; n <= 100; n++) await sum.send({ key: "k2", n });
        assert.equal((await sum.closeAndReceive()).sum, 5050);

        const count = await client.serverStream("Echo/Count", { key: "k3", n: 50 });
        const seen = [];
        for await (const m of count) seen.push(m.i);
        assert.deepEqual(seen, [...Array(50).keys()]);

        const chat = await client.bidi("Echo/Chat", { metadata: { "zrpc-shard-key": "k4" } });
        for (const word of ["a", "b", "c"]) {
          await chat.send({ key: "k4", word });
          assert.equal((await chat.receive()).word, word);
        }
        chat.closeSend();
        assert.equal(await chat.receive(), undefined);

        await assert.rejects(client.unary("Echo/Nope", { key: "x" }), (e) => e.status === "UNIMPLEMENTED");
        await assert.rejects(client.unary("Echo/Sleep", { key: "k5", seconds: 5 }, { timeoutMs: 100 }),
          (e) => e.status === "DEADLINE_EXCEEDED");
        await assert.rejects(client.unary("Echo/Say", {}), (e) => e.status === "INVALID_ARGUMENT");
      } finally {
        client.close();
      }
    });

    test("megabytes both ways through every flow-control window", async () => {
      const client = await Client.connect(await connect());
      try {
        // client -> server: 8 MiB in 64 KiB messages (32 x the broker's 256 KiB stream window)
        const blob = new Uint8Array(64 * 1024).fill(7);
        const sum = await client.clientStream("Echo/Sum", { metadata: { "zrpc-shard-key": "big" } });
        for (let i = 0; i < 128; i++) await sum.send({ key: "big", n: 1, blob });
        assert.equal((await sum.closeAndReceive()).sum, 128);
        // both ways at once: 200 echoes of 100 KB, sender running ahead of the reader
        const chat = await client.bidi("Echo/Chat", { metadata: { "zrpc-shard-key": "big" } });
        const big = new Uint8Array(100_000).fill(1);
        const sending = (async () => {
          for (let i = 0; i < 200; i++) await chat.send({ key: "big", i, big });
          chat.closeSend();
        })();
        let got = 0;
        for await (const m of chat) {
          assert.equal(m.i, got);
          assert.equal(m.big.length, 100_000);
          got++;
        }
        await sending;
        assert.equal(got, 200);
      } finally {
        client.close();
      }
    });

    test("many calls at once on one connection", async () => {
      const client = await Client.connect(await connect());
      try {
        const answers = await Promise.all([...Array(200).keys()].map((i) => client.unary("Echo/Say", { key: `k${i % 7}`, i })));
        assert.deepEqual(answers.map((a) => a.i), [...Array(200).keys()]);
        const cancelled = await client.serverStream("Echo/Listen", { key: "cancel-me" });
        assert.deepEqual(await cancelled.receive(), { attached: true });
        cancelled.cancel();
        await assert.rejects(cancelled.receive(), (e) => e.code === Status.CANCELLED);
        assert.deepEqual(await client.unary("Health/Check", {}), { status: "SERVING" });
      } finally {
        client.close();
      }
    });
  });
}
