// Type declarations for roombus.js, the browser and Node.js client of roombus.

/** A message's place in a room's stream: it names one message for good. */
export interface Position {
  epoch: string;
  seq: number;
}

/** A range of sequence numbers, both ends included. */
export interface Span {
  from: number;
  to: number;
}

/** What the client does after a connection ended. */
export type Policy = "retry" | "prompt" | "final";

/** Close code -> policy; codes not listed are retried. */
export const CLOSE_CODES: Readonly<Record<number, Policy>>;
/** 1008 reason -> policy; other 1008 reasons are final. */
export const POLICY_REASONS: Readonly<Record<string, Policy>>;
/** What to do after a close with `code` (null: no close frame) and `reason`. */
export function closePolicy(code: number | null, reason?: string): Policy;

export interface ClientOptions {
  /** The rooms to join; the first one rides in the URL. */
  rooms?: string[];
  /** Sent in the URL; ignored by a server that authenticates. */
  username?: string;
  /** Asked on every (re)connect; the token is offered as the `bearer.<token>` subprotocol. */
  getToken?: () => string | null | undefined | Promise<string | null | undefined>;
  /** Positions to resume from (as `client.positions()` gave them). */
  positions?: Record<string, Position>;
  /** Keep positions here (e.g. `sessionStorage`) so a page reload resumes too. */
  storage?: Pick<Storage, "getItem" | "setItem" | "removeItem"> | null;
  /** The key in `storage` (default `"roombus:" + url`). */
  storageKey?: string;
  /** More query parameters for the URL. */
  params?: Record<string, string>;
  /** First reconnect delay bound, seconds (0.5); attempt n waits uniform [0, min(max, initial * 2^n)]. */
  backoffInitial?: number;
  /** The delay bound's ceiling, seconds (20). */
  backoffMax?: number;
  /** A connection open this long resets the backoff, seconds (5). */
  stableAfter?: number;
  /** The most a connection attempt may take, seconds (10). */
  connectTimeout?: number;
  /** Seconds without a message before an application ping (10). */
  pingInterval?: number;
  /** Seconds a ping has to be answered before the connection is replaced (5). */
  pingTimeout?: number;
  /** The most unacknowledged publishes kept (256); one more is rejected. */
  outboxSize?: number;
  /** Join with `partial: true` (true): replay what is kept even when not everything is. */
  partial?: boolean;
  /** Seconds a chat's sender id is remembered (300, the server's dedup window): a chat whose (username, id) was handed over is dropped, even in another epoch. */
  dedupWindow?: number;
  /** The WebSocket constructor (default: `globalThis.WebSocket`). */
  WebSocket?: typeof WebSocket;
  /** Listen to `online`/`offline`/`visibilitychange` on this target (default: `globalThis` in a browser). */
  eventTarget?: EventTarget | null;
  /** Source of jitter (default `Math.random`). */
  random?: () => number;
}

export interface ConnectingEvent { attempt: number }
export interface ConnectedEvent {}
export interface DisconnectedEvent {
  /** The close code; null when the connection broke without one. */
  code: number | null;
  reason: string;
  /** True when the client stops here (close(), or a final close code). */
  final: boolean;
  /** Seconds until the next attempt; null when final. */
  reconnectIn: number | null;
}
export interface JoiningEvent { room: string }
export interface JoinedEvent {
  room: string;
  epoch: string;
  seq: number;
  /** true: every missed message follows; false: not all (see reason, lost, skipped); null: no position yet. */
  recovered: boolean | null;
  reason: string | null;
  lost: Span | null;
  skipped: Span | null;
}
export interface LeftEvent { room: string }
export interface JoinRefusedEvent { room: string; code: string; content: string }
export interface MessageEvent {
  room: string;
  username: string;
  content: unknown;
  epoch: string | null;
  seq: number | null;
  timestamp: number | null;
  replayed: boolean;
}
export interface PresenceEvent {
  room: string;
  /** Who is in the room after this event, sorted. */
  users: string[];
  event: "state" | "join" | "leave";
  username: string | null;
}
export interface ResetEvent { room: string; epoch: string; seq: number; reason: string }
export interface GapEvent { room: string; first: number; last: number }
export interface ServerErrorEvent { code: string; content: string; id: string | null }
export interface StateEvent { state: ClientState }

export interface ClientEvents {
  connecting: ConnectingEvent;
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  joining: JoiningEvent;
  joined: JoinedEvent;
  left: LeftEvent;
  joinrefused: JoinRefusedEvent;
  message: MessageEvent;
  presence: PresenceEvent;
  reset: ResetEvent;
  gap: GapEvent;
  error: ServerErrorEvent;
  /** The connection state changed (also sent with every event above that changes it). */
  state: StateEvent;
}

export type ClientState = "idle" | "waiting" | "connecting" | "open" | "closed";

/** A publish the server refused (`code` as in its error envelope), or one that can no longer be sent. */
export class PublishError extends Error {
  code: string;
  content: string;
}
/** `outboxSize` publishes wait for their ack already. */
export class OutboxFullError extends Error {}

export class Client {
  constructor(url: string, options?: ClientOptions);
  /** The connection's state. */
  readonly state: ClientState;
  /** When the next connection attempt is due (ms since the epoch), or null. */
  readonly reconnectAt: number | null;
  /** Chats dropped as already handed over. */
  readonly duplicates: number;
  /** Start connecting (the constructor does not). Returns the client. */
  start(): this;
  on<K extends keyof ClientEvents>(type: K, listener: (event: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(type: K, listener: (event: ClientEvents[K]) => void): void;
  /** Join a room (from its position if the client has one). */
  join(room: string): void;
  /** Leave a room; its unacknowledged publishes reject with code "left". */
  leave(room: string): void;
  /**
   * Publish: resolves with the message's position once the server acknowledged it.
   * Kept in the outbox and resent with the same id across reconnects until then.
   * Rejects with OutboxFullError, PublishError, or TypeError for content that is not JSON.
   */
  publish(room: string, content: unknown): Promise<Position>;
  /** Check the connection now: send a ping (a dead one is replaced within pingTimeout). */
  ping(): void;
  /** Connect now if waiting to reconnect. */
  reconnectNow(): void;
  /** Stop for good; waiting publishes reject with code "closed". */
  close(): void;
  /** The rooms the client is in or joining. */
  readonly rooms: string[];
  /** The users in a room, sorted. */
  presence(room: string): string[];
  /** The last position handed over per room. */
  positions(): Record<string, Position>;
  /** What waits for an ack: ids with their room and content, oldest first. */
  outbox(): Array<{ id: string; room: string; content: unknown }>;
}

/** `new Client(url, options).start()`. */
export function connect(url: string, options?: ClientOptions): Client;
