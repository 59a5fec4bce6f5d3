// A Node.js app that alive-switch can deploy in every mode (http, tcp, direct).
//
// What it must do, and why:
// - listen on $HOST:$PORT (the color's own address, from the color unit);
// - on SIGTERM (systemd stopping a retired color) shut down gracefully: stop accepting,
//   answer what is in flight with "Connection: close", close idle keep-alive connections,
//   exit when the last one ends. In direct mode this *is* the drain: the kernel sends no
//   new connection to a retired color, but its keep-alive clients stay with it until it
//   closes them. systemd's TimeoutStopSec (unit.stop_timeout) bounds it;
// - listen with a backlog at least router.backlog: in direct mode the app's accept queue
//   is the public one.
//
//   cd <build> && HOST=127.0.0.1 PORT=9001 node /path/to/server.js
"use strict";

const http = require("node:http");
const path = require("node:path");

const host = process.env.HOST || "127.0.0.1";
const port = Number(process.env.PORT);
const build = path.basename(process.cwd());
const backlog = Number(process.env.BACKLOG || 4096);
let stopping = false;

const atStop = [];  // answers that wait for SIGTERM (GET /slow?until=stop)

const server = http.createServer((req, res) => {
  // GET /slow?ms=N answers N ms (at most 10 s) after it came, or with until=stop N ms after
  // SIGTERM: a request in flight while the color is retired, which its shutdown finishes.
  const [pathname, query = ""] = req.url.split("?", 2); // never throws, unlike new URL()
  if (pathname !== "/slow") {
    answer(res);
    return;
  }
  const params = new URLSearchParams(query);
  const later = () => setTimeout(() => answer(res), Math.min(Number(params.get("ms")) || 0, 10000));
  if (params.get("until") === "stop" && !stopping) {
    atStop.push(later);
  } else {
    later();
  }
});

function answer(res) {
  if (stopping) {
    res.setHeader("Connection", "close"); // the client reconnects, to the live color
  }
  const body = JSON.stringify({ build, color: process.env.COLOR || "", pid: process.pid });
  res.writeHead(200, { "Content-Type": "application/json",
                       "Content-Length": Buffer.byteLength(body) });
  res.end(body);
}
server.keepAliveTimeout = 75000;

process.on("SIGTERM", () => {
  stopping = true;
  atStop.splice(0).forEach((later) => later());
  server.close(() => process.exit(0)); // no new connections; exits once all have ended
  server.closeIdleConnections();       // idle keep-alive connections go now
});

server.listen({ host: host.replace(/^\[|\]$/g, ""), port, backlog }, () => {
  console.log(`${build} listening on ${host}:${port}`);
});
