// The service on Node.js's event loop: `http` answering GET /api/<rid> by calling the data
// service for /data/<rid> with the built-in fetch (undici, a keep-alive pool).
// Answers 200 when the data service did, 502 otherwise.
// Usage: node service_node.mjs ADDR PORT DATA_ADDR:PORT

import http from "node:http";

// The id the data call carries: the rid, or with TOPOLOGY_DOWNSTREAM=opaque a token sharing no
// id with it (first letter kept for the data service, "o", the rest reversed).
const dataId = (rid) =>
  process.env.TOPOLOGY_DOWNSTREAM === "opaque" ? rid[0] + "o" + [...rid.slice(1)].reverse().join("") : rid;

const [addr, port, data] = process.argv.slice(2);

const server = http.createServer(async (req, res) => {
  if (!req.url.startsWith("/api/")) {
    res.writeHead(404, { "content-type": "text/plain" }).end("no such path\n");
    return;
  }
  const rid = req.url.slice("/api/".length);
  try {
    const r = await fetch(`http://${data}/data/${dataId(rid)}`);
    const body = Buffer.from(await r.arrayBuffer());
    res
      .writeHead(r.status === 200 ? 200 : 502, {
        "content-type": "text/plain",
        "content-length": body.length,
      })
      .end(body);
  } catch (e) {
    res.writeHead(502, { "content-type": "text/plain" }).end(`${e}\n`);
  }
});
// nginx keeps idle upstream connections open; Node's 5 s default would close them under it.
server.keepAliveTimeout = 120_000;
server.listen({ host: addr, port: Number(port), backlog: 256 });
