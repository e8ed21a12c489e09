// The overhead bench's realistic service, Node.js: `http` answering GET /work by calling the
// data service (data.py) for /data/w with the built-in fetch (undici, a keep-alive pool), then
// building, serialising and re-reading a JSON document of 200 items and answering a small JSON
// summary. The bench runs it plain, traced by the agent, and with
// `--require @opentelemetry/auto-instrumentations-node/register` (the OpenTelemetry SDK's
// zero-code instrumentation: http and undici spans exported as OTLP). CommonJS on purpose: the
// SDK patches `http` through require hooks. Usage: node service.cjs PORT DATA_ADDR:PORT
"use strict";
const http = require("node:http");

const [port, data] = process.argv.slice(2);
const items = Array.from({ length: 200 }, (_, i) => ({
  id: i,
  name: `item-${i}`,
  tags: ["red", "green", "blue"],
  price: i * 1.25,
}));

const server = http.createServer(async (req, res) => {
  if (req.url !== "/work") {
    res.writeHead(404).end();
    return;
  }
  try {
    const upstream = await fetch(`http://${data}/data/w`);
    const text = await upstream.text();
    const doc = JSON.parse(JSON.stringify({ items, data: text }));
    const body = JSON.stringify({
      count: doc.items.length,
      total: doc.items.reduce((sum, item) => sum + item.price, 0),
    });
    res
      .writeHead(upstream.status === 200 ? 200 : 502, {
        "content-type": "application/json",
        "content-length": Buffer.byteLength(body),
      })
      .end(body);
  } catch (e) {
    res.writeHead(502).end(`${e}\n`);
  }
});
server.keepAliveTimeout = 120_000;
server.listen({ host: "127.0.0.1", port: Number(port), backlog: 512 });
// On SIGTERM the SDK flushes its last spans but does not end the process: stop serving and let
// the event loop empty (the export in flight is the last thing in it), at most 10 s.
process.on("SIGTERM", () => {
  server.close();
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 10_000).unref();
});
