// roombus.js against a real roombus server (ROOMBUS_TEST_TRANSPORT picks trio, asyncio or
// the ASGI app under uvicorn). Run: node --experimental-websocket --test test/
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client, OutboxFullError, PublishError, closePolicy, connect } from "../roombus.js";
import { Proxy, jwt, messages, record, startServer, until } from "./helpers.js";

const T = { timeout: 40000 };
const FAST = { backoffInitial: 0.05, backoffMax: 0.2 };
let server;
let counter = 0;
const clients = [];
const room = () => `r${process.pid}-${++counter}`;
const open = (url, options) => {
  const c = connect(url, { ...FAST, ...options });
  clients.push(c);
  return c;
};
const joined = (events, name, n = 1) =>
  until(() => events.filter(([t, e]) => t === "joined" && e.room === name).length >= n, `joined ${name} x${n}`);

before(async () => { server = await startServer(); });
after(async () => {
  for (const c of clients) c.close();
  await server.stop();
});

describe("against a server", () => {
  test("two clients chat and see each other's presence", T, async () => {
    const r = room();
    const ann = open(server.url, { rooms: [r], username: "ann" });
    const annEvents = record(ann);
    await joined(annEvents, r);
    const bob = open(server.url, { rooms: [r], username: "bob" });
    const bobEvents = record(bob);
    await joined(bobEvents, r);
    await until(() => ann.presence(r).includes("bob"), "ann sees bob");
    assert.deepEqual(bob.presence(r), ["ann", "bob"]);
    const pos = await ann.publish(r, { text: "hi" });
    assert.equal(typeof pos.epoch, "string");
    assert.equal(pos.seq, 1);
    await until(() => messages(bobEvents, r).length === 1, "bob gets the chat");
    await until(() => messages(annEvents, r).length === 1, "ann gets her chat");
    assert.deepEqual(messages(bobEvents, r), [[1, { text: "hi" }]]);
    const [[, m]] = bobEvents.filter(([t]) => t === "message");
    assert.equal(m.username, "ann");
    assert.equal(m.epoch, pos.epoch);
    bob.close();
    await until(() => !ann.presence(r).includes("bob"), "bob's leave");
    const leave = annEvents.find(([t, e]) => t === "presence" && e.event === "leave");
    assert.deepEqual(leave[1], { room: r, users: ["ann"], event: "leave", username: "bob" });
  });

  test("a cut connection resumes with every missed message once, in order", T, async () => {
    const r = room();
    const proxy = await new Proxy(server.port).listen();
    const ann = open(proxy.url, { rooms: [r], username: "ann" });
    const events = record(ann);
    await joined(events, r);
    const bob = open(server.url, { rooms: [r], username: "bob" });
    await joined(record(bob), r);
    for (let i = 1; i <= 3; i++) await bob.publish(r, i);
    await until(() => messages(events, r).length === 3, "the first three");
    proxy.mode = "refuse";
    proxy.cut();
    await until(() => ann.state === "waiting", "ann sees the cut");
    for (let i = 4; i <= 8; i++) await bob.publish(r, i);
    proxy.mode = "pass";
    await joined(events, r, 2);
    await until(() => messages(events, r).length === 8, "all eight");
    assert.deepEqual(messages(events, r), [1, 2, 3, 4, 5, 6, 7, 8].map((i) => [i, i]));
    const [, again] = events.filter(([t]) => t === "joined")[1];
    assert.equal(again.recovered, true);
    const replayed = events.filter(([t, e]) => t === "message" && e.replayed).map(([, e]) => e.seq);
    assert.deepEqual(replayed, [4, 5, 6, 7, 8]);
    const down = events.find(([t]) => t === "disconnected")[1];
    assert.equal(down.code, null);
    assert.equal(down.final, false);
    await proxy.close();
  });

  test("what is published offline waits in the outbox and is delivered once", T, async () => {
    const r = room();
    const proxy = await new Proxy(server.port).listen();
    const ann = open(proxy.url, { rooms: [r], username: "ann" });
    await joined(record(ann), r);
    const bob = open(server.url, { rooms: [r], username: "bob" });
    const bobEvents = record(bob);
    await joined(bobEvents, r);
    proxy.mode = "refuse";
    proxy.cut();
    await until(() => ann.state === "waiting", "ann offline");
    const sent = ["one", "two", "three"].map((text) => ann.publish(r, text));
    assert.deepEqual(ann.outbox().map((p) => p.content), ["one", "two", "three"]);
    await new Promise((res) => setTimeout(res, 300));
    assert.deepEqual(messages(bobEvents, r), []);
    proxy.mode = "pass";
    const positions = await Promise.all(sent);
    assert.deepEqual(positions.map((p) => p.seq), [1, 2, 3]);
    await until(() => messages(bobEvents, r).length === 3, "bob gets them");
    await new Promise((res) => setTimeout(res, 200));
    assert.deepEqual(messages(bobEvents, r), [[1, "one"], [2, "two"], [3, "three"]]);
    assert.deepEqual(ann.outbox(), []);
    await proxy.close();
  });

  test("an ack lost with a dead socket: the resend with the same id is published once", T, async () => {
    const r = room();
    const proxy = await new Proxy(server.port).listen();
    const ann = open(proxy.url, { rooms: [r], username: "ann", pingInterval: 0.3, pingTimeout: 0.3 });
    const events = record(ann);
    await joined(events, r);
    const bob = open(server.url, { rooms: [r], username: "bob" });
    const bobEvents = record(bob);
    await joined(bobEvents, r);
    proxy.mode = "deaf"; // the server hears ann, ann hears nothing: her ack is lost
    const published = ann.publish(r, "once");
    await until(() => messages(bobEvents, r).length === 1, "bob gets it");
    await until(() => events.some(([t]) => t === "disconnected"), "the ping finds the dead socket", 5000);
    assert.equal(events.find(([t]) => t === "disconnected")[1].reason, "no reply to ping");
    proxy.cut();
    proxy.mode = "pass";
    const pos = await published;
    assert.equal(pos.seq, 1);
    await new Promise((res) => setTimeout(res, 300));
    assert.deepEqual(messages(bobEvents, r), [[1, "once"]]);
    await proxy.close();
  });

  test("a full outbox rejects instead of growing", T, async () => {
    const r = room();
    const proxy = await new Proxy(server.port).listen();
    const ann = open(proxy.url, { rooms: [r], username: "ann", outboxSize: 2 });
    await joined(record(ann), r);
    proxy.mode = "refuse";
    proxy.cut();
    await until(() => ann.state === "waiting", "offline");
    const a = ann.publish(r, 1);
    const b = ann.publish(r, 2);
    await assert.rejects(ann.publish(r, 3), OutboxFullError);
    assert.equal(ann.outbox().length, 2);
    proxy.mode = "pass";
    assert.deepEqual((await Promise.all([a, b])).map((p) => p.seq), [1, 2]);
    await proxy.close();
  });

  test("a publish to a room the client is not in is refused at once", T, async () => {
    const r = room();
    const ann = open(server.url, { rooms: [r], username: "ann" });
    await joined(record(ann), r);
    await assert.rejects(ann.publish("elsewhere", 1), (err) => err instanceof PublishError && err.code === "not_in_room");
    assert.equal((await ann.publish(r, "still here")).seq, 1);
  });

  test("positions kept in storage resume after a reload", T, async () => {
    const r = room();
    const store = new Map();
    const storage = { getItem: (k) => store.get(k) ?? null, setItem: (k, v) => store.set(k, v), removeItem: (k) => store.delete(k) };
    const bob = open(server.url, { rooms: [r], username: "bob" });
    await joined(record(bob), r);
    const first = open(server.url, { rooms: [r], username: "ann", storage });
    const events1 = record(first);
    await joined(events1, r);
    for (let i = 1; i <= 3; i++) await bob.publish(r, i);
    await until(() => messages(events1, r).length === 3, "three");
    first.close(); // the page goes away
    for (let i = 4; i <= 5; i++) await bob.publish(r, i);
    const second = open(server.url, { rooms: [r], username: "ann", storage });
    const events2 = record(second);
    await joined(events2, r);
    await until(() => messages(events2, r).length === 2, "the two missed");
    assert.deepEqual(messages(events2, r), [[4, 4], [5, 5]]);
    assert.equal(events2.find(([t]) => t === "joined")[1].recovered, true);
  });

  test("several rooms on one connection, each resumed from its own position", T, async () => {
    const [r1, r2] = [room(), room()];
    const proxy = await new Proxy(server.port).listen();
    const ann = open(proxy.url, { rooms: [r1], username: "ann" });
    const events = record(ann);
    ann.join(r2);
    await joined(events, r1);
    await joined(events, r2);
    const bob = open(server.url, { rooms: [r1, r2], username: "bob" });
    await joined(record(bob), r2);
    await bob.publish(r1, "a1");
    await bob.publish(r2, "b1");
    await until(() => messages(events, r2).length === 1, "b1");
    proxy.mode = "refuse";
    proxy.cut();
    await until(() => ann.state === "waiting", "offline");
    await bob.publish(r1, "a2");
    await bob.publish(r2, "b2");
    await bob.publish(r2, "b3");
    proxy.mode = "pass";
    await until(() => messages(events, r2).length === 3 && messages(events, r1).length === 2, "all");
    assert.deepEqual(messages(events, r1), [[1, "a1"], [2, "a2"]]);
    assert.deepEqual(messages(events, r2), [[1, "b1"], [2, "b2"], [3, "b3"]]);
    ann.leave(r2);
    await until(() => events.some(([t]) => t === "left"), "left");
    assert.deepEqual(ann.rooms, [r1]);
    await proxy.close();
  });
});

describe("credentials", () => {
  let authServer;
  before(async () => { authServer = await startServer({ env: { ROOMBUS_JWT_SECRET: "s3cret-for-tests-only-0123456789" } }); });
  after(async () => { await authServer.stop(); });

  test("getToken is asked on every connect and the token rides in the subprotocol", T, async () => {
    const r = room();
    const seen = [];
    class Spy extends WebSocket {
      constructor(url, protocols) {
        seen.push({ url, protocols });
        super(url, protocols);
      }
    }
    let asked = 0;
    const proxy = await new Proxy(authServer.port).listen();
    const getToken = async () => {
      asked += 1;
      return jwt("s3cret-for-tests-only-0123456789", { sub: "ann", exp: Math.floor(Date.now() / 1000) + 60 });
    };
    const ann = open(proxy.url, { rooms: [r], getToken, WebSocket: Spy });
    const events = record(ann);
    await joined(events, r);
    assert.deepEqual(ann.presence(r), ["ann"]);
    proxy.cut();
    await joined(events, r, 2);
    assert.equal(asked, 2);
    assert.equal(seen.length, 2);
    for (const { url, protocols } of seen) {
      assert.ok(!/token|eyJ/.test(url), url);
      assert.equal(protocols[0], "roombus");
      assert.match(protocols[1], /^bearer\.eyJ/);
    }
    await proxy.close();
  });

  test("a join the credentials do not grant is refused; the connection goes on", T, async () => {
    const r = room();
    const token = jwt("s3cret-for-tests-only-0123456789", { sub: "ann", rooms: [r], exp: Math.floor(Date.now() / 1000) + 60 });
    const ann = open(authServer.url, { rooms: [r], getToken: () => token });
    const events = record(ann);
    await joined(events, r);
    ann.join("not-granted");
    await until(() => events.some(([t]) => t === "joinrefused"), "the refusal");
    const [, refused] = events.find(([t]) => t === "joinrefused");
    assert.equal(refused.room, "not-granted");
    assert.equal(refused.code, "forbidden");
    assert.deepEqual(ann.rooms, [r]);
    assert.equal((await ann.publish(r, "still here")).seq, 1);
  });

  test("refused credentials: the client keeps trying with backoff, never stops on its own", T, async () => {
    const r = room();
    const ann = open(authServer.url, { rooms: [r], getToken: () => "not-a-token", backoffInitial: 0.05, backoffMax: 0.1 });
    const events = record(ann);
    await until(() => events.filter(([t]) => t === "disconnected").length >= 2, "two refusals");
    assert.ok(events.every(([t, e]) => t !== "disconnected" || e.final === false));
    ann.close();
    assert.equal(ann.state, "closed");
  });
});

describe("a server that goes away", () => {
  test("a drain (1001, 1012) reconnects promptly; a restart's new epoch is told", T, async () => {
    const own = await startServer({ env: { ROOMBUS_DRAIN_SECONDS: "1" } });
    const r = room();
    const ann = open(own.url, { rooms: [r], username: "ann", backoffInitial: 0.3, backoffMax: 5 });
    const events = record(ann);
    await joined(events, r);
    const before = (await ann.publish(r, "before")).epoch;
    await own.stop("SIGTERM");
    await until(() => events.some(([t]) => t === "disconnected"), "the drain");
    const down = events.find(([t]) => t === "disconnected")[1];
    // roombus's own servers drain with 1001; uvicorn closes an app's sockets with 1012.
    assert.ok([1001, 1012].includes(down.code), `code ${down.code}`);
    if (down.code === 1001) assert.equal(down.reason, "server draining");
    assert.equal(closePolicy(down.code), "prompt");
    assert.ok(down.reconnectIn <= 0.3, `reconnectIn ${down.reconnectIn}`);
    const again = await startServer({ port: own.port });
    try {
      await joined(events, r, 2);
      const [, j] = events.filter(([t]) => t === "joined")[1];
      assert.equal(j.recovered, false);
      assert.equal(j.reason, "epoch_changed");
      assert.notEqual(j.epoch, before);
      const pos = await ann.publish(r, "after");
      assert.equal(pos.epoch, j.epoch);
      await until(() => messages(events, r).length === 2, "after");
      assert.deepEqual(messages(events, r), [[1, "before"], [1, "after"]]);
    } finally {
      ann.close();
      await again.stop();
    }
  });
});

describe("the client alone", () => {
  class FakeSocket {
    static last = null;
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      FakeSocket.last = this;
      setTimeout(() => { this.readyState = 1; this.onopen?.(); }, 0);
    }
    send(text) { this.sent.push(JSON.parse(text)); }
    close() { this.readyState = 3; }
    deliver(msg) { this.onmessage?.({ data: JSON.stringify(msg) }); }
  }

  test("a chat already handed over is never handed over again", T, async () => {
    const c = new Client("ws://127.0.0.1:1/ws", { rooms: ["lobby"], username: "ann", WebSocket: FakeSocket, eventTarget: null }).start();
    clients.push(c);
    const events = record(c);
    await until(() => c.state === "open", "open");
    const ws = FakeSocket.last;
    assert.match(ws.url, /\?room=lobby&username=ann&since=&partial=1$/);
    ws.deliver({ type: "joined", room: "lobby", epoch: "E1", seq: 4 });
    for (const seq of [5, 6, 5, 4, 7, 6]) ws.deliver({ type: "chat", room: "lobby", username: "bob", content: seq, seq });
    ws.deliver({ type: "chat", room: "lobby", username: "bob", content: 10, seq: 10 });
    assert.deepEqual(messages(events, "lobby"), [[5, 5], [6, 6], [7, 7], [10, 10]]);
    assert.equal(c.duplicates, 3);
    assert.deepEqual(events.find(([t]) => t === "gap")[1], { room: "lobby", first: 8, last: 9 });
    assert.deepEqual(c.positions(), { lobby: { epoch: "E1", seq: 10 } });
    ws.deliver({ type: "reset", room: "lobby", epoch: "E2", seq: 3, reason: "unavailable" });
    ws.deliver({ type: "chat", room: "lobby", username: "bob", content: "x", seq: 3 });
    ws.deliver({ type: "chat", room: "lobby", username: "bob", content: "y", seq: 4 });
    assert.deepEqual(messages(events, "lobby").slice(4), [[4, "y"]]);
    assert.deepEqual(c.positions(), { lobby: { epoch: "E2", seq: 4 } });
  });

  test("a chat whose sender id was handed over is dropped even in another epoch", T, async () => {
    const c = new Client("ws://127.0.0.1:1/ws", { rooms: ["lobby"], WebSocket: FakeSocket, eventTarget: null }).start();
    clients.push(c);
    const events = record(c);
    await until(() => c.state === "open", "open");
    const ws = FakeSocket.last;
    ws.deliver({ type: "joined", room: "lobby", epoch: "E1", seq: 4 });
    ws.deliver({ type: "chat", room: "lobby", username: "bob", content: "hi", id: "m-1", seq: 5 });
    ws.deliver({ type: "chat", room: "lobby", username: "cat", content: "same id, other user", id: "m-1", seq: 6 });
    ws.deliver({ type: "reset", room: "lobby", epoch: "E2", seq: 0, reason: "epoch_changed" });
    ws.deliver({ type: "chat", room: "lobby", username: "bob", content: "hi", id: "m-1", seq: 1 });
    ws.deliver({ type: "chat", room: "lobby", username: "bob", content: "next", seq: 2 });
    assert.deepEqual(messages(events, "lobby"), [[5, "hi"], [6, "same id, other user"], [2, "next"]]);
    assert.equal(c.duplicates, 1);
    assert.ok(!events.some(([t]) => t === "gap"));
    assert.deepEqual(c.positions(), { lobby: { epoch: "E2", seq: 2 } });
  });

  test("a reconnect names the last position in the URL and resends the outbox with the same ids", T, async () => {
    const c = new Client("ws://127.0.0.1:1/ws", { rooms: ["lobby", "news"], username: "ann", WebSocket: FakeSocket, eventTarget: null, backoffInitial: 0.01 }).start();
    clients.push(c);
    await until(() => c.state === "open", "open");
    let ws = FakeSocket.last;
    assert.deepEqual(ws.sent, [{ type: "join", room: "news", since: null, partial: true }]);
    ws.deliver({ type: "joined", room: "lobby", epoch: "E1", seq: 7 });
    ws.deliver({ type: "joined", room: "news", epoch: "N1", seq: 2 });
    const p = c.publish("lobby", "hi");
    const [chat] = ws.sent.slice(1);
    assert.equal(chat.type, "chat");
    ws.onclose({ code: 1006, reason: "" });
    await until(() => FakeSocket.last !== ws && c.state === "open", "reconnected");
    ws = FakeSocket.last;
    assert.match(ws.url, /since=E1%3A7&partial=1$/);
    assert.deepEqual(ws.sent[0], { type: "join", room: "news", since: { epoch: "N1", seq: 2 }, partial: true });
    assert.deepEqual(ws.sent[1], chat);
    ws.deliver({ type: "ack", id: chat.id, room: "lobby", epoch: "E1", seq: 8 });
    assert.deepEqual(await p, { epoch: "E1", seq: 8 });
  });

  test("final close codes stop the client and fail the outbox", T, async () => {
    assert.equal(closePolicy(1001), "prompt");
    assert.equal(closePolicy(1003), "final");
    assert.equal(closePolicy(1008, "credentials expired"), "prompt");
    assert.equal(closePolicy(1008, "send queue full"), "retry");
    assert.equal(closePolicy(1008, "origin not allowed"), "final");
    assert.equal(closePolicy(null), "retry");
    assert.equal(closePolicy(1011), "retry");
    const c = new Client("ws://127.0.0.1:1/ws", { rooms: ["lobby"], WebSocket: FakeSocket, eventTarget: null }).start();
    const events = record(c);
    await until(() => c.state === "open", "open");
    const p = c.publish("lobby", 1);
    FakeSocket.last.onclose({ code: 1003, reason: "binary" });
    await assert.rejects(p, (err) => err instanceof PublishError && err.code === "closed");
    assert.equal(c.state, "closed");
    assert.deepEqual(events.at(-1), ["disconnected", { code: 1003, reason: "binary", final: true, reconnectIn: null }]);
  });

  test("bad arguments are refused at once", async () => {
    assert.throws(() => new Client("http://x/ws", { rooms: ["no spaces"], WebSocket: FakeSocket }), TypeError);
    assert.throws(() => new Client("ftp://x/ws", { WebSocket: FakeSocket }), TypeError);
    assert.throws(() => new Client("ws://x/ws", { backoffInitial: 0, WebSocket: FakeSocket }), RangeError);
    const c = new Client("ws://x/ws", { rooms: ["a"], WebSocket: FakeSocket, eventTarget: null });
    assert.throws(() => c.on("nope", () => {}), TypeError);
    for (const bad of [undefined, NaN, { f() {} }, [1, Symbol("s")], { n: Infinity }, 10n]) {
      await assert.rejects(c.publish("a", bad), TypeError, String(typeof bad));
    }
    assert.deepEqual(c.outbox(), []);
  });
});
