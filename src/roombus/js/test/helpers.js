// Test helpers: a real roombus server in a child process, and a loopback TCP proxy
// in front of it that a test can cut, refuse or turn into a black hole.
//
// Environment: ROOMBUS_TEST_PYTHON (the interpreter with roombus installed; default
// python3), ROOMBUS_TEST_TRANSPORT (trio, asyncio or asgi: the ASGI app under uvicorn).

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import net from "node:net";

const PYTHON = process.env.ROOMBUS_TEST_PYTHON || "python3";
export const TRANSPORT = process.env.ROOMBUS_TEST_TRANSPORT || "trio";
const LISTENING = /listening on ws:\/\/127\.0\.0\.1:(\d+)\/ws|Uvicorn running on http:\/\/127\.0\.0\.1:(\d+)/;

/**
 * Start a server on `port` (0: any) with these ROOMBUS_* settings; resolves once it
 * listens. `stop(signal)` ends it (SIGTERM drains: clients get 1001) and waits.
 */
export async function startServer({ port = 0, env = {} } = {}) {
  const args = TRANSPORT === "asgi"
    ? ["-m", "uvicorn", "--factory", "roombus.asgi:create_app", "--host", "127.0.0.1", "--port", String(port), "--log-level", "info"]
    : ["-m", "roombus", "serve", "--transport", TRANSPORT, "--host", "127.0.0.1", "--port", String(port)];
  const proc = spawn(PYTHON, args, {
    env: { ...process.env, ROOMBUS_HISTORY_SIZE: "1000", ROOMBUS_DRAIN_SECONDS: "0", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  const exited = new Promise((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
  const listening = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start in 20 s:\n${output}`)), 20000);
    const onData = (chunk) => {
      output += chunk;
      const m = LISTENING.exec(output);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1] || m[2]));
      }
    };
    proc.stdout.on("data", onData);
    proc.stderr.on("data", onData);
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`server exited (${code ?? signal}) before listening:\n${output}`));
    });
  });
  return {
    port: listening,
    url: `ws://127.0.0.1:${listening}/ws`,
    get output() { return output; },
    async stop(signal = "SIGTERM") {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const timer = setTimeout(() => proc.kill("SIGKILL"), 10000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/**
 * A TCP proxy on loopback to 127.0.0.1:`targetPort`. `mode`: "pass"; "refuse" (new
 * connections are closed at once, open ones go on); "deaf" (the server hears the
 * client, the client hears nothing); "blackhole" (nothing goes either way).
 */
export class Proxy {
  constructor(targetPort) {
    this.targetPort = targetPort;
    this.mode = "pass";
    this.pairs = new Set();
    this.server = net.createServer((client) => this._accept(client));
  }

  async listen() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = this.server.address().port;
    this.url = `ws://127.0.0.1:${this.port}/ws`;
    return this;
  }

  _accept(client) {
    if (this.mode === "refuse") {
      client.destroy();
      return;
    }
    const upstream = net.connect(this.targetPort, "127.0.0.1");
    const pair = { client, upstream };
    this.pairs.add(pair);
    const end = () => {
      client.destroy();
      upstream.destroy();
      this.pairs.delete(pair);
    };
    client.on("data", (d) => { if (this.mode !== "blackhole") upstream.write(d); });
    upstream.on("data", (d) => { if (this.mode === "pass" || this.mode === "refuse") client.write(d); });
    client.on("close", end);
    upstream.on("close", end);
    client.on("error", end);
    upstream.on("error", end);
  }

  /** Break every connection now (no close frame: as a network failure). */
  cut() {
    for (const { client, upstream } of this.pairs) {
      client.destroy();
      upstream.destroy();
    }
    this.pairs.clear();
  }

  async close() {
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/** An HS256 JWT signed with `secret`. */
export function jwt(secret, claims) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/** Resolve when `predicate()` holds (polled), or reject after `ms` with `what`. */
export async function until(predicate, what, ms = 10000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Record every event of `client`, in order, as [type, event]. */
export function record(client) {
  const events = [];
  for (const type of ["connecting", "connected", "disconnected", "joining", "joined", "left",
    "joinrefused", "message", "presence", "reset", "gap", "error"]) {
    client.on(type, (e) => events.push([type, e]));
  }
  return events;
}

/** The messages of `room` among recorded `events`, as [seq, content]. */
export function messages(events, room) {
  return events.filter(([t, e]) => t === "message" && e.room === room).map(([, e]) => [e.seq, e.content]);
}
