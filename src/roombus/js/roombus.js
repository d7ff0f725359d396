// roombus.js: the browser and Node.js client of roombus. An ES module with no
// dependencies and no build step; the types are in roombus.d.ts.
//
//   import { connect } from "/roombus.js";
//   const client = connect("/ws", { rooms: ["lobby"], username: "ann" });
//   client.on("message", (m) => console.log(m.room, m.seq, m.username, m.content));
//   const position = await client.publish("lobby", "hello");  // after the server's ack
//
// The client reconnects by itself (exponential backoff with full jitter), joins every
// room again from the last message it handed over (the server replays what was
// missed, or says what it cannot), never hands over a message twice, and keeps
// unacknowledged publishes in a bounded outbox, resent with the same ids after a
// reconnect so that the server publishes each once.

const ROOM = /^[A-Za-z0-9_.:-]{1,64}$/;
const EPOCH = /^[A-Za-z0-9_-]{1,32}$/;

// -- what to do when a connection ends ---------------------------------------------

/** Close code -> policy ("retry", "prompt" or "final"); codes not listed are retried. */
export const CLOSE_CODES = Object.freeze({
  1001: "prompt", // the server shuts down or drains: another node takes us
  1002: "final", // we broke the WebSocket protocol
  1003: "final", // we sent binary data
  1007: "final", // we sent text that is not UTF-8
  1009: "final", // we sent a message over the server's limit (it would be resent)
  1010: "final", // an extension we require was not negotiated
  1012: "prompt", // the service restarts
});

/** 1008 (policy violation) reason -> policy; other 1008 reasons are final. */
export const POLICY_REASONS = Object.freeze({
  "credentials expired": "prompt", // a fresh token is asked for on reconnect
  "send queue full": "retry", // we fell behind: resume from our positions
  "server send queues full": "retry",
  "rate limit exceeded": "retry",
});

/** What to do after a close with `code` (null: no close frame) and `reason`. */
export function closePolicy(code, reason = "") {
  if (code === 1008) return Object.hasOwn(POLICY_REASONS, reason) ? POLICY_REASONS[reason] : "final";
  if (code === null || code === undefined) return "retry";
  return Object.hasOwn(CLOSE_CODES, code) ? CLOSE_CODES[code] : "retry";
}

// -- errors ----------------------------------------------------------------------------

/** A publish the server refused (`code` as in its error envelope), or one that can no longer be sent. */
export class PublishError extends Error {
  constructor(code, content) {
    super(`${code}: ${content}`);
    this.name = "PublishError";
    this.code = code;
    this.content = content;
  }
}

/** `outboxSize` publishes wait for their ack already. */
export class OutboxFullError extends Error {
  constructor(size) {
    super(`${size} publishes wait for their ack`);
    this.name = "OutboxFullError";
  }
}

// -- the client --------------------------------------------------------------------------

const DEFAULTS = Object.freeze({
  backoffInitial: 0.5,
  backoffMax: 20,
  stableAfter: 5,
  connectTimeout: 10,
  pingInterval: 10,
  pingTimeout: 5,
  outboxSize: 256,
  partial: true,
  dedupWindow: 300,
});

const EVENTS = [
  "connecting", "connected", "disconnected", "joining", "joined", "left", "joinrefused",
  "message", "presence", "reset", "gap", "error", "state",
];

const NORMAL = 1000;
const monotonic = () => (globalThis.performance ? performance.now() : Date.now());

function validPosition(pos) {
  return pos !== null && typeof pos === "object" && typeof pos.epoch === "string" &&
    EPOCH.test(pos.epoch) && Number.isSafeInteger(pos.seq) && pos.seq >= 0;
}

function span(value) {
  if (value !== null && typeof value === "object" && Number.isSafeInteger(value.from) &&
      Number.isSafeInteger(value.to) && value.from <= value.to) {
    return { from: value.from, to: value.to };
  }
  return null;
}

function checkRoom(room) {
  if (typeof room !== "string" || !ROOM.test(room)) {
    throw new TypeError(`invalid room name ${JSON.stringify(room)}: 1-64 characters of A-Z a-z 0-9 _ . : -`);
  }
}

function wsUrl(url) {
  const base = globalThis.location ? globalThis.location.href : undefined;
  const u = new URL(url, base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (u.protocol !== "ws:" && u.protocol !== "wss:") {
    throw new TypeError(`not a WebSocket URL: ${url}`);
  }
  return u;
}

/** One client: its rooms and positions, the connection, the outbox. */
export class Client {
  constructor(url, options = {}) {
    const o = { ...DEFAULTS, ...options };
    for (const key of ["backoffInitial", "backoffMax", "stableAfter", "connectTimeout", "pingInterval", "pingTimeout", "outboxSize", "dedupWindow"]) {
      if (!(typeof o[key] === "number" && o[key] > 0)) {
        throw new RangeError(`${key} must be a number > 0, not ${o[key]}`);
      }
    }
    this._url = wsUrl(url);
    this._o = o;
    this._WebSocket = o.WebSocket || globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket: pass options.WebSocket (Node.js 20: run with --experimental-websocket)");
    }
    this._random = o.random || Math.random;
    this._storage = o.storage || null;
    this._storageKey = o.storageKey || `roombus:${this._url.href}`;
    this._listeners = new Map(EVENTS.map((t) => [t, new Set()]));
    this._rooms = new Map();
    for (const room of o.rooms || []) {
      checkRoom(room);
      if (!this._rooms.has(room)) this._rooms.set(room, newRoom(room));
    }
    const positions = { ...this._loadPositions(), ...(o.positions || {}) };
    for (const [room, pos] of Object.entries(positions)) {
      const r = this._rooms.get(room);
      if (r && validPosition(pos)) r.position = { epoch: pos.epoch, seq: pos.seq };
    }
    this._state = "idle";
    this._gen = 0;
    this._ws = null;
    this._attempt = 0;
    this._reconnectAt = null; // monotonic ms
    this._connectDeadline = null;
    this._openedAt = null;
    this._lastHeard = 0;
    this._pingSent = null;
    this._urlRoom = null;
    this._joins = []; // joins sent and not yet answered, in order
    this._outbox = new Map(); // id -> {room, content, text, resolve, reject}
    this._nextId = 0;
    this._idPrefix = randomHex(12);
    this._timer = null;
    this._saveTimer = null;
    this.duplicates = 0;
    this._seenIds = new Map(); // JSON [room, username, id] -> when handed over (oldest first)
    this._wakeTarget = null;
    this._onWake = () => this._wake();
    this._onHide = () => this._savePositions();
    this._onVisible = () => {
      if (globalThis.document && globalThis.document.visibilityState === "visible") this._wake();
    };
  }

  // -- what the application does ---------------------------------------------------

  get state() { return this._state; }

  get reconnectAt() {
    if (this._state !== "waiting" || this._reconnectAt === null) return null;
    return Date.now() + Math.max(0, this._reconnectAt - monotonic());
  }

  get rooms() {
    return [...this._rooms.values()].filter((r) => !r.leaving).map((r) => r.name);
  }

  on(type, listener) {
    this._set(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this._set(type).delete(listener);
  }

  /** Start connecting. */
  start() {
    if (this._state === "idle") {
      const target = this._o.eventTarget !== undefined ? this._o.eventTarget
        : (globalThis.window && typeof globalThis.window.addEventListener === "function" ? globalThis.window : null);
      this._wakeTarget = target;
      if (target) {
        target.addEventListener("online", this._onWake);
        target.addEventListener("offline", this._onWake);
        target.addEventListener("pagehide", this._onHide);
      }
      if (target && globalThis.document && typeof globalThis.document.addEventListener === "function") {
        globalThis.document.addEventListener("visibilitychange", this._onVisible);
      }
      this._setState("waiting");
      this._reconnectAt = monotonic();
      this._tick();
    }
    return this;
  }

  join(room) {
    checkRoom(room);
    this._alive();
    const existing = this._rooms.get(room);
    if (existing) {
      existing.leaving = false;
      return;
    }
    const r = newRoom(room);
    this._rooms.set(room, r);
    if (this._state === "open") this._sendJoin(r);
    else if (this._state === "waiting" && this._rooms.size === 1) this._tick();
  }

  leave(room) {
    const r = this._rooms.get(room);
    if (!r) return;
    if (this._state === "open" && r.phase === "joining") {
      r.leaving = true; // a leave before the answer could be refused unattributably
      return;
    }
    this._dropRoom(r);
  }

  publish(room, content) {
    if (this._state === "closed") return Promise.reject(new PublishError("closed", "the client is closed"));
    const r = this._rooms.get(room);
    if (!r || r.leaving) return Promise.reject(new PublishError("not_in_room", `not in room ${JSON.stringify(room)}`));
    if (this._outbox.size >= this._o.outboxSize) return Promise.reject(new OutboxFullError(this._outbox.size));
    if (content === undefined) return Promise.reject(new TypeError("content must be JSON, not undefined"));
    this._nextId += 1;
    const id = `${this._idPrefix}-${this._nextId}`;
    let text;
    try {
      text = JSON.stringify({ type: "chat", room, content, id }, notJSON);
    } catch (err) {
      return Promise.reject(new TypeError(`content is not JSON: ${err.message}`));
    }
    return new Promise((resolve, reject) => {
      this._outbox.set(id, { room, content, text, resolve, reject });
      if (this._state === "open" && r.phase !== "pending") this._send(text);
    });
  }

  ping() {
    if (this._state === "open" && this._pingSent === null) {
      this._send('{"type":"ping"}');
      this._pingSent = monotonic();
      this._schedule();
    }
  }

  reconnectNow() {
    if (this._state === "waiting" && this._rooms.size > 0) {
      this._reconnectAt = monotonic();
      this._tick();
    }
  }

  close() {
    if (this._state === "closed") return;
    this._closeSocket(NORMAL, "client closed");
    this._end({ code: null, reason: "client closed", policy: "final" });
    if (this._wakeTarget) {
      this._wakeTarget.removeEventListener("online", this._onWake);
      this._wakeTarget.removeEventListener("offline", this._onWake);
      this._wakeTarget.removeEventListener("pagehide", this._onHide);
    }
    if (globalThis.document && typeof globalThis.document.removeEventListener === "function") {
      globalThis.document.removeEventListener("visibilitychange", this._onVisible);
    }
    this._savePositions();
  }

  presence(room) {
    const r = this._rooms.get(room);
    return r ? [...r.users].sort() : [];
  }

  positions() {
    const out = {};
    for (const r of this._rooms.values()) if (r.position) out[r.name] = { ...r.position };
    return out;
  }

  outbox() {
    return [...this._outbox].map(([id, p]) => ({ id, room: p.room, content: p.content }));
  }

  // -- the connection ----------------------------------------------------------------

  _connect() {
    this._gen += 1;
    const gen = this._gen;
    this._setState("connecting");
    this._reconnectAt = null;
    this._connectDeadline = monotonic() + this._o.connectTimeout * 1000;
    this._joins = [];
    this._emit("connecting", { attempt: this._attempt + 1 });
    const url = this._target();
    this._schedule();
    const open = (token) => {
      if (gen !== this._gen || this._state !== "connecting") return;
      const protocols = ["roombus"];
      if (token) protocols.push(`bearer.${token}`);
      let ws;
      try {
        ws = new this._WebSocket(url, protocols);
      } catch (err) {
        this._end({ code: null, reason: String(err && err.message || err), policy: "final" });
        return;
      }
      this._ws = ws;
      ws.onopen = () => this._opened(gen);
      ws.onmessage = (e) => this._received(gen, e.data);
      ws.onclose = (e) => this._closed(gen, e.code, e.reason);
      ws.onerror = () => {
        // A close event follows in browsers; some implementations (Node.js 20) leave a
        // refused handshake CONNECTING with no close event: the attempt failed.
        if (gen === this._gen && this._state === "connecting") {
          this._closeSocket(NORMAL, "connection failed");
          this._end({ code: null, reason: "connection failed" });
        }
      };
    };
    if (this._o.getToken) {
      Promise.resolve()
        .then(() => this._o.getToken())
        .then(open, (err) => {
          if (gen === this._gen && this._state === "connecting") {
            this._end({ code: null, reason: `getToken failed: ${err && err.message || err}` });
          }
        });
    } else {
      open(null);
    }
  }

  _target() {
    const room = this._rooms.values().next().value;
    const params = new Map(Object.entries(this._o.params || {}));
    params.set("room", room.name);
    if (this._o.username !== undefined && this._o.username !== null) params.set("username", this._o.username);
    params.set("since", room.position ? `${room.position.epoch}:${room.position.seq}` : "");
    if (this._o.partial) params.set("partial", "1");
    this._urlRoom = room.name;
    const u = new URL(this._url.href);
    u.search = [...params].map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`).join("&");
    return u.href;
  }

  _opened(gen) {
    if (gen !== this._gen || this._state !== "connecting") return;
    const now = monotonic();
    this._setState("open");
    this._openedAt = now;
    this._connectDeadline = null;
    this._lastHeard = now;
    this._pingSent = null;
    this._emit("connected", {});
    for (const r of this._rooms.values()) {
      r.phase = "pending";
      r.retryAt = null;
    }
    const urlRoom = this._urlRoom !== null ? this._rooms.get(this._urlRoom) : undefined;
    if (urlRoom) {
      urlRoom.phase = "joining";
      this._joins.push(urlRoom.name);
      this._emit("joining", { room: urlRoom.name });
    }
    for (const r of [...this._rooms.values()]) if (r.phase === "pending") this._sendJoin(r);
    for (const p of this._outbox.values()) this._send(p.text);
    this._schedule();
  }

  _closed(gen, code, reason) {
    if (gen !== this._gen || (this._state !== "connecting" && this._state !== "open")) return;
    this._ws = null;
    // 1006 is what a browser reports when there was no close frame (or no WebSocket).
    this._end({ code: code === 1006 || code === undefined ? null : code, reason: reason || "" });
  }

  _received(gen, data) {
    if (gen !== this._gen || this._state !== "open") return;
    this._lastHeard = monotonic();
    this._pingSent = null;
    if (typeof data !== "string") return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg === null || typeof msg !== "object" || Array.isArray(msg)) return;
    const r = typeof msg.room === "string" ? this._rooms.get(msg.room) : undefined;
    switch (msg.type) {
      case "chat": if (r) this._onChat(r, msg); break;
      case "presence": if (r) this._onPresence(r, msg); break;
      case "presence_state":
        if (r && Array.isArray(msg.users)) {
          r.users = new Set(msg.users.filter((u) => typeof u === "string"));
          this._emit("presence", { room: r.name, users: [...r.users].sort(), event: "state", username: null });
        }
        break;
      case "joined": if (r) this._onJoined(r, msg); break;
      case "reset": if (r) this._onReset(r, msg); break;
      case "ack": this._onAck(msg); break;
      case "error": this._onError(msg); break;
      default: break;
    }
    this._schedule();
  }

  _tick() {
    this._timer = null;
    const now = monotonic();
    const o = this._o;
    if (this._state === "waiting") {
      if (this._reconnectAt !== null && now >= this._reconnectAt && this._rooms.size > 0) this._connect();
    } else if (this._state === "connecting") {
      if (this._connectDeadline !== null && now >= this._connectDeadline) {
        this._closeSocket(NORMAL, "connect timeout");
        this._end({ code: null, reason: "connect timeout" });
      }
    } else if (this._state === "open") {
      if (this._openedAt !== null && now - this._openedAt >= o.stableAfter * 1000) {
        this._attempt = 0;
        this._openedAt = null;
      }
      if (this._pingSent !== null && now >= this._pingSent + o.pingTimeout * 1000) {
        this._closeSocket(NORMAL, "no reply to ping");
        this._end({ code: null, reason: "no reply to ping" });
        return;
      }
      if (this._pingSent === null && now >= this._lastHeard + o.pingInterval * 1000) this.ping();
      for (const r of [...this._rooms.values()]) {
        if (r.retryAt !== null && now >= r.retryAt) {
          r.retryAt = null;
          this._sendJoin(r);
          for (const p of this._outbox.values()) if (p.room === r.name) this._send(p.text); // held while it waited
        }
      }
    }
    this._schedule();
  }

  _deadline() {
    const o = this._o;
    if (this._state === "waiting") return this._rooms.size > 0 ? this._reconnectAt : null;
    if (this._state === "connecting") return this._connectDeadline;
    if (this._state !== "open") return null;
    const times = [this._pingSent === null ? this._lastHeard + o.pingInterval * 1000 : this._pingSent + o.pingTimeout * 1000];
    if (this._openedAt !== null) times.push(this._openedAt + o.stableAfter * 1000);
    for (const r of this._rooms.values()) if (r.retryAt !== null) times.push(r.retryAt);
    return Math.min(...times);
  }

  _schedule() {
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
    const due = this._deadline();
    if (due === null) return;
    this._timer = setTimeout(() => this._tick(), Math.max(0, due - monotonic()));
  }

  _wake() {
    // The network came back, went away, or the page became visible: a socket that
    // died meanwhile is found within pingTimeout, and a waiting client tries now.
    if (this._state === "open") this.ping();
    else if (this._state === "waiting" && (!globalThis.navigator || globalThis.navigator.onLine !== false)) {
      this.reconnectNow();
    }
  }

  _closeSocket(code, reason) {
    const ws = this._ws;
    this._ws = null;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      ws.close(code, reason);
    } catch {
      // closing a socket that never opened may throw in some implementations
    }
  }

  _end({ code, reason, policy }) {
    const p = policy || closePolicy(code, reason);
    this._ws = null;
    for (const r of [...this._rooms.values()]) if (r.leaving) this._dropRoom(r);
    for (const r of this._rooms.values()) {
      r.phase = "pending";
      r.retryAt = null;
    }
    this._joins = [];
    this._openedAt = null;
    this._connectDeadline = null;
    this._pingSent = null;
    if (p === "final") {
      this._setState("closed");
      this._reconnectAt = null;
      if (this._timer !== null) clearTimeout(this._timer);
      this._timer = null;
      this._emit("disconnected", { code, reason, final: true, reconnectIn: null });
      const err = new PublishError("closed", reason || "connection closed");
      const waiting = [...this._outbox.values()];
      this._outbox.clear();
      for (const pending of waiting) pending.reject(err);
      return;
    }
    let delay;
    if (p === "prompt") {
      delay = this._random() * this._o.backoffInitial;
    } else {
      const bound = Math.min(this._o.backoffMax, this._o.backoffInitial * 2 ** Math.min(this._attempt, 62));
      delay = this._random() * bound;
      this._attempt += 1;
    }
    this._setState("waiting");
    this._reconnectAt = monotonic() + delay * 1000;
    this._emit("disconnected", { code, reason, final: false, reconnectIn: delay });
    this._schedule();
  }

  // -- rooms -----------------------------------------------------------------------------

  _sendJoin(r) {
    r.phase = "joining";
    const message = { type: "join", room: r.name, since: r.position ? { epoch: r.position.epoch, seq: r.position.seq } : null };
    if (this._o.partial) message.partial = true;
    this._joins.push(r.name);
    this._send(JSON.stringify(message));
    this._emit("joining", { room: r.name });
  }

  _dropRoom(r) {
    if (this._state === "open" && r.phase === "joined") this._send(JSON.stringify({ type: "leave", room: r.name }));
    this._rooms.delete(r.name);
    this._failRoom(r.name, new PublishError("left", `left room ${JSON.stringify(r.name)}`));
    this._emit("left", { room: r.name });
    this._saveSoon();
  }

  _failRoom(room, err) {
    for (const [id, pending] of [...this._outbox]) {
      if (pending.room === room) {
        this._outbox.delete(id);
        pending.reject(err);
      }
    }
  }

  _onChat(r, msg) {
    if (r.phase !== "joined") return; // before the join's answer: the replay brings it
    const seq = msg.seq;
    const pos = r.position;
    if (Number.isSafeInteger(seq) && pos) {
      if (seq <= pos.seq) {
        this.duplicates += 1;
        return;
      }
      if (seq > pos.seq + 1) this._emit("gap", { room: r.name, first: pos.seq + 1, last: seq - 1 });
      r.position = { epoch: pos.epoch, seq };
      this._saveSoon();
    }
    if (typeof msg.id === "string" && typeof msg.username === "string" && !this._firstId(r.name, msg.username, msg.id)) {
      // A resend whose ack was lost across an epoch change is numbered again: the
      // sender's id says it is a message already handed over.
      this.duplicates += 1;
      return;
    }
    this._emit("message", {
      room: r.name,
      username: typeof msg.username === "string" ? msg.username : "",
      content: msg.content,
      epoch: pos ? pos.epoch : null,
      seq: Number.isSafeInteger(seq) ? seq : null,
      timestamp: Number.isSafeInteger(msg.timestamp) ? msg.timestamp : null,
      replayed: msg.replayed === true,
    });
  }

  _firstId(room, username, id) {
    const now = monotonic();
    const seen = this._seenIds;
    for (const [key, at] of seen) {
      if (at > now - this._o.dedupWindow * 1000 && seen.size < 65536) break;
      seen.delete(key);
    }
    const key = JSON.stringify([room, username, id]);
    if (seen.has(key)) return false;
    seen.set(key, now);
    return true;
  }

  _onPresence(r, msg) {
    const user = msg.username;
    const what = msg.event;
    if (typeof user !== "string" || (what !== "join" && what !== "leave")) return;
    if (what === "join") r.users.add(user);
    else r.users.delete(user);
    this._emit("presence", { room: r.name, users: [...r.users].sort(), event: what, username: user });
  }

  _onJoined(r, msg) {
    const { epoch, seq, recovered } = msg;
    if (!validPosition({ epoch, seq })) return;
    const i = this._joins.indexOf(r.name);
    if (i >= 0) this._joins.splice(i, 1);
    const lost = span(msg.lost);
    const skipped = span(msg.skipped);
    if (!(recovered === true && r.position && r.position.epoch === epoch)) {
      // Replayed chats (a partial join) start after what is lost or skipped.
      const ends = [lost, skipped].filter((s) => s !== null).map((s) => s.to);
      const floor = ends.length ? Math.max(...ends) : seq;
      r.position = { epoch, seq: Math.min(floor, seq) };
      this._saveSoon();
    }
    r.phase = "joined";
    this._emit("joined", {
      room: r.name,
      epoch,
      seq,
      recovered: typeof recovered === "boolean" ? recovered : null,
      reason: typeof msg.reason === "string" ? msg.reason : null,
      lost,
      skipped,
    });
    if (r.leaving) {
      r.leaving = false;
      this._dropRoom(r);
    }
  }

  _onReset(r, msg) {
    const { epoch, seq, reason } = msg;
    if (!validPosition({ epoch, seq })) return;
    r.position = { epoch, seq };
    this._saveSoon();
    this._emit("reset", { room: r.name, epoch, seq, reason: typeof reason === "string" ? reason : "" });
  }

  _onAck(msg) {
    const pending = typeof msg.id === "string" ? this._outbox.get(msg.id) : undefined;
    if (!pending || typeof msg.epoch !== "string" || !Number.isSafeInteger(msg.seq)) return;
    this._outbox.delete(msg.id);
    pending.resolve({ epoch: msg.epoch, seq: msg.seq });
  }

  _onError(msg) {
    const code = typeof msg.code === "string" ? msg.code : "error";
    const content = typeof msg.content === "string" ? msg.content : "";
    const id = typeof msg.id === "string" ? msg.id : null;
    if (id !== null && this._outbox.has(id)) {
      const pending = this._outbox.get(id);
      this._outbox.delete(id);
      pending.reject(new PublishError(code, content));
      return;
    }
    if (id === null && this._joins.length) {
      // Joins are answered in order and the client sends nothing else without an id
      // that the server could refuse: this refuses the oldest join.
      const room = this._joins.shift();
      const r = this._rooms.get(room);
      if (!r) return;
      if (code === "rate_limited") {
        r.phase = "pending";
        r.retryAt = monotonic() + 2 * this._o.backoffInitial * 1000;
        return;
      }
      this._rooms.delete(room);
      this._failRoom(room, new PublishError(code, content));
      this._emit("joinrefused", { room, code, content });
      return;
    }
    this._emit("error", { code, content, id });
  }

  // -- inside ----------------------------------------------------------------------------

  _set(type) {
    const set = this._listeners.get(type);
    if (!set) throw new TypeError(`unknown event ${JSON.stringify(type)}; one of ${EVENTS.join(", ")}`);
    return set;
  }

  _emit(type, event) {
    for (const listener of [...this._listeners.get(type)]) {
      try {
        listener(event);
      } catch (err) {
        // A listener's error must not break the client: report it as uncaught.
        setTimeout(() => { throw err; }, 0);
      }
    }
  }

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit("state", { state });
  }

  _alive() {
    if (this._state === "closed") throw new PublishError("closed", "the client is closed");
  }

  _send(text) {
    const ws = this._ws;
    if (ws && ws.readyState === 1) ws.send(text);
  }

  _loadPositions() {
    if (!this._storage) return {};
    try {
      const saved = JSON.parse(this._storage.getItem(this._storageKey) || "{}");
      return saved !== null && typeof saved === "object" ? saved : {};
    } catch {
      return {};
    }
  }

  _saveSoon() {
    if (!this._storage || this._saveTimer !== null) return;
    this._saveTimer = setTimeout(() => this._savePositions(), 100);
  }

  _savePositions() {
    if (this._saveTimer !== null) clearTimeout(this._saveTimer);
    this._saveTimer = null;
    if (!this._storage) return;
    try {
      this._storage.setItem(this._storageKey, JSON.stringify(this.positions()));
    } catch {
      // storage full or denied: positions stay in memory
    }
  }
}

// JSON.stringify drops functions and symbols and writes NaN as null: refuse them instead.
function notJSON(key, value) {
  if (typeof value === "function" || typeof value === "symbol" || (typeof value === "number" && !Number.isFinite(value))) {
    throw new TypeError(`${key || "content"} is a ${typeof value === "number" ? String(value) : typeof value}`);
  }
  if (value === undefined && key !== "") throw new TypeError(`${key} is undefined`);
  return value;
}

function newRoom(name) {
  return { name, position: null, phase: "pending", users: new Set(), leaving: false, retryAt: null };
}

function randomHex(n) {
  const bytes = new Uint8Array(Math.ceil(n / 2));
  if (globalThis.crypto && globalThis.crypto.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("").slice(0, n);
}

/** `new Client(url, options).start()`. */
export function connect(url, options = {}) {
  return new Client(url, options).start();
}
