// node-transport.js - zrpc transports that only exist in Node: TLS 1.3 with ALPN "zrpc/1"
// straight to the broker's main listener (docs/protocol.md section 1).
//
//   import { Client } from "./zrpc.js";
//   import { tlsTransport } from "./node-transport.js";
//   const client = await Client.connect(await tlsTransport({ host: "localhost", port: 8443, ca }));

import { readFileSync } from "node:fs";
import tls from "node:tls";

import { Status, ZrpcError } from "./zrpc.js";

export const ALPN_PROTOCOL = "zrpc/1";

/**
 * Connect with TLS 1.3 and ALPN zrpc/1, verifying the server certificate
 * (`ca`: PEM text or a file path; default: Node's trust store).
 */
export function tlsTransport({ host = "localhost", port = 8443, ca = undefined, servername = undefined } = {}) {
  const caPem = typeof ca === "string" && !ca.includes("-----BEGIN") ? readFileSync(ca) : ca;
  return new Promise((resolve, reject) => {
    let ready = false;
    let ended = false;
    const socket = tls.connect({
      host, port, ca: caPem, servername: servername ?? host, ALPNProtocols: [ALPN_PROTOCOL],
      minVersion: "TLSv1.3",
    });
    const transport = {
      onbytes: null,
      onclose: null,
      send(bytes) {
        socket.write(bytes);
      },
      close() {
        socket.end();
        setTimeout(() => socket.destroy(), 2000).unref();
      },
    };
    const end = (err) => {
      if (ended) return;
      ended = true;
      if (!ready) reject(new ZrpcError(Status.UNAVAILABLE, `cannot connect to ${host}:${port}: ${err ? err.message : "closed"}`));
      else if (transport.onclose) transport.onclose(err ?? null);
    };
    socket.once("secureConnect", () => {
      if (socket.alpnProtocol !== ALPN_PROTOCOL) {
        socket.destroy();
        end(new Error(`${host}:${port} does not speak ${ALPN_PROTOCOL}`));
        return;
      }
      ready = true;
      resolve(transport);
    });
    socket.on("data", (buf) => {
      if (transport.onbytes) transport.onbytes(new Uint8Array(buf.buffer, buf.byteOffset, buf.length));
    });
    socket.on("error", (err) => end(err));
    socket.on("close", () => end(null));
  });
}
