// chat.js - the chat page: zrpc over a WebSocket to the broker that served this page.
//
// One connection per session: Chat/SubscribeToRoom (server streaming, with since_id so
// history comes first and a reconnect resumes after the last message shown),
// Chat/ListUsers (presence, refreshed on join/leave) and Chat/SendMessage (unary).
// A dropped connection is retried with backoff (the status counts down, the presence list is
// marked unknown meanwhile); messages are deduplicated by id. A token that expires or is refused
// after the session was live keeps the page as it is and asks for a new one.

import { Client, Status, ZrpcError, backoffDelay, webSocketTransport } from "/zrpc.js";

const MAX_SHOWN = 1000; // messages and notices kept on the page
const BACKOFF_MIN_MS = 250;
const BACKOFF_MAX_MS = 8000;
const FATAL = new Set([Status.UNAUTHENTICATED, Status.PERMISSION_DENIED, Status.INVALID_ARGUMENT]);
/** The chat service's limit on a message's content, in UTF-8 bytes (docs/chat.md). */
export const MAX_CONTENT_BYTES = 16384;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("conn-status"), joinForm: $("join-form"), name: $("name"), room: $("room"), token: $("token"),
  joinError: $("join-error"), chat: $("chat"), roomName: $("room-name"), me: $("me"), leave: $("leave"),
  messages: $("messages"), who: $("who"), whoCount: $("who-count"), sendForm: $("send-form"),
  input: $("message"), send: $("send"), sendError: $("send-error"),
  tokenForm: $("token-form"), newToken: $("new-token"), tokenWhy: $("token-why"),
};

/** The state of the current session (null when not joined). */
let session = null;

/**
 * The idempotency key of the text in the message box: sending the same text again after a
 * failure reuses it, so a message that was stored before the failure is not stored twice
 * (docs/chat.md, "Exactly-once sends"). A new text gets a new key.
 */
let pending = null; // {content, key}

function keyFor(content) {
  if (pending === null || pending.content !== content) {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    pending = { content, key: Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("") };
  }
  return pending.key;
}

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
}

function setCanSend(yes) {
  ui.input.disabled = !yes;
  ui.send.disabled = !yes;
}

function wsUrl() {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/zrpc`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function describe(err) {
  return err instanceof ZrpcError ? `${err.status}${err.reason ? `: ${err.reason}` : ""}` : String(err?.message ?? err);
}

/** Why joining failed, in this page's terms (the server's text may address command-line users). */
export function joinRefusal(err, hadToken) {
  if (err instanceof ZrpcError && err.code === Status.UNAUTHENTICATED) {
    return hadToken ? "The server did not accept the token: check it, or ask for a new one."
      : "This server requires a token: paste it in the Token field and join again.";
  }
  if (err instanceof ZrpcError && err.code === Status.PERMISSION_DENIED) {
    return `Your token does not allow this room${err.reason ? ` (${err.reason})` : ""}.`;
  }
  return `Cannot join: ${describe(err)}`;
}

// ------------------------------------------------------------------ rendering

/** A message's time: hours and minutes today, with the date before (and the year in other years). */
export function timeOf(ms, now = new Date()) {
  const t = new Date(ms);
  const hm = { hour: "2-digit", minute: "2-digit" };
  if (t.toDateString() === now.toDateString()) return t.toLocaleTimeString([], hm);
  const date = t.getFullYear() === now.getFullYear() ? { month: "short", day: "numeric" }
    : { year: "numeric", month: "short", day: "numeric" };
  return t.toLocaleString([], { ...date, ...hm });
}

function nearBottom() {
  const el = ui.messages;
  return el.scrollHeight - el.scrollTop - el.clientHeight < 40;
}

function append(li) {
  const stick = nearBottom();
  ui.messages.append(li);
  while (ui.messages.children.length > MAX_SHOWN) ui.messages.firstElementChild.remove();
  if (stick) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function showMessage(m) {
  const li = document.createElement("li");
  li.className = m.user === session.user ? "msg mine" : "msg";
  li.dataset.id = String(m.id);
  li.dataset.user = m.user;
  const head = document.createElement("div");
  head.className = "meta";
  const who = document.createElement("strong");
  who.textContent = m.user;
  const when = document.createElement("time");
  when.dateTime = new Date(m.timestamp).toISOString();
  when.textContent = timeOf(m.timestamp);
  when.title = new Date(m.timestamp).toLocaleString();
  head.append(who, " ", when);
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = m.content;
  li.append(head, text);
  append(li);
}

function showNotice(kind, text) {
  const li = document.createElement("li");
  li.className = `notice ${kind}`;
  li.dataset.kind = kind;
  li.textContent = text;
  append(li);
}

/** While disconnected, who is here is unknown: say so instead of showing a stale list. */
function usersUnknown() {
  const li = document.createElement("li");
  li.className = "unknown";
  li.textContent = "unknown while reconnecting";
  ui.who.replaceChildren(li);
  ui.who.dataset.stale = "true";
  ui.whoCount.textContent = "?";
}

function showUsers(users) {
  delete ui.who.dataset.stale;
  ui.who.replaceChildren(...users.map((u) => {
    const li = document.createElement("li");
    li.textContent = u.name === session.user ? `${u.name} (you)` : u.name;
    li.dataset.user = u.name;
    return li;
  }));
  ui.whoCount.textContent = String(users.length);
}

// ------------------------------------------------------------------- session

/** Join: run the connection loop until leave() (or a fatal error). */
function join(user, room, token) {
  const s = {
    user, room, token: token || null, client: null, sub: null, lastId: 0, seen: new Set(),
    running: true, attempt: 0, whoTimer: null, wasLive: false, tokenWait: null,
  };
  session = s;
  ui.roomName.textContent = room;
  ui.me.textContent = user;
  ui.messages.replaceChildren();
  ui.who.replaceChildren();
  ui.whoCount.textContent = "0";
  ui.joinForm.hidden = true;
  ui.chat.hidden = false;
  ui.sendError.textContent = "";
  ui.tokenForm.hidden = true;
  ui.input.focus();
  run(s);
}

function leave(message = "") {
  const s = session;
  if (!s) return;
  s.running = false;
  session = null;
  clearTimeout(s.whoTimer);
  if (s.tokenWait) s.tokenWait(null);
  ui.tokenForm.hidden = true;
  if (s.sub) s.sub.cancel("left the room");
  if (s.client) s.client.close("left the room");
  setCanSend(false);
  ui.chat.hidden = true;
  ui.joinForm.hidden = false;
  ui.joinError.textContent = message;
  setStatus("idle", "Not connected");
}

async function run(s) {
  while (s.running) {
    let client = null;
    try {
      setStatus("connecting", s.attempt ? "Reconnecting…" : "Connecting…");
      const transport = await webSocketTransport(wsUrl());
      client = await Client.connect(transport, {
        token: s.token, userAgent: "zrpc-web-chat",
        // the server is going away (restart, shutdown): end the subscription now, resume elsewhere
        onGoaway: () => { if (s.sub) s.sub.cancel("server sent GOAWAY"); },
      });
      if (!s.running) {
        client.close();
        break;
      }
      s.client = client;
      const sub = await client.serverStream("Chat/SubscribeToRoom", { room: s.room, user: s.user, since_id: s.lastId });
      s.sub = sub;
      await refreshWho(s);
      setStatus("live", "Connected");
      s.wasLive = true;
      setCanSend(true);
      for await (const ev of sub) {
        s.attempt = 0;
        onEvent(s, ev);
      }
      if (s.running) throw new ZrpcError(Status.UNAVAILABLE, "the server ended the subscription");
    } catch (err) {
      if (!s.running) break;
      if (err instanceof ZrpcError && err.code === Status.UNAUTHENTICATED && s.wasLive) {
        // the token expired (or was refused on a reconnect): keep the page, ask for a new one
        if (client) client.close();
        s.sub = null;
        s.client = null;
        setCanSend(false);
        usersUnknown();
        const token = await askToken(s, err);
        if (token === null || !s.running) break;
        s.token = token;
        s.attempt = 0;
        continue;
      }
      if (err instanceof ZrpcError && FATAL.has(err.code)) {
        if (client) client.close();
        leave(joinRefusal(err, Boolean(s.token)));
        return;
      }
      console.warn("chat connection:", describe(err));
    }
    setCanSend(false);
    s.sub = null;
    s.client = null;
    if (client) client.close();
    if (!s.running) break;
    usersUnknown();
    const delay = backoffDelay(s.attempt + 1, { initial: BACKOFF_MIN_MS, maximum: BACKOFF_MAX_MS, jitter: 0.25 });
    s.attempt = Math.min(s.attempt + 1, 10);
    await countdown(s, delay);
  }
}

/** Wait ``delay`` ms, showing the seconds left in the status line. */
async function countdown(s, delay) {
  const until = Date.now() + delay;
  for (let left = delay; left > 0 && s.running; left = until - Date.now()) {
    setStatus("retrying", `Reconnecting in ${Math.ceil(left / 1000)} s`);
    await sleep(Math.min(left, left % 1000 || 1000));
  }
}

/** Show the token prompt; resolves with the new token (null when the user leaves). */
function askToken(s, err) {
  setStatus("auth", "Token needed");
  const expired = /expired/i.test(err.reason ?? "");
  ui.tokenWhy.textContent = expired ? "Your token expired." : "The server refused your token.";
  ui.newToken.value = "";
  ui.tokenForm.hidden = false;
  ui.newToken.focus();
  return new Promise((resolve) => {
    s.tokenWait = (token) => {
      s.tokenWait = null;
      ui.tokenForm.hidden = true;
      resolve(token);
    };
  });
}

function onEvent(s, ev) {
  if (ev.type === "message" && ev.message) {
    const m = ev.message;
    // ids are per room, 1, 2, 3... in order: anything at or below the last shown is a repeat
    if (m.id <= s.lastId || s.seen.has(m.id)) return;
    s.lastId = m.id;
    s.seen.add(m.id);
    if (s.seen.size > 4 * MAX_SHOWN) s.seen = new Set([...s.seen].slice(-MAX_SHOWN));
    showMessage(m);
  } else if (ev.type === "user_joined" && ev.user_joined) {
    if (ev.user_joined !== s.user) showNotice("join", `${ev.user_joined} joined`);
    scheduleWho(s);
  } else if (ev.type === "user_left" && ev.user_left) {
    showNotice("leave", `${ev.user_left} left`);
    scheduleWho(s);
  } else if (ev.type === "error" && ev.error_message) {
    showNotice("error", ev.error_message);
  }
}

function scheduleWho(s) {
  clearTimeout(s.whoTimer);
  s.whoTimer = setTimeout(() => refreshWho(s).catch(() => {}), 100);
}

async function refreshWho(s) {
  const client = s.client;
  if (!client || !s.running) return;
  const reply = await client.unary("Chat/ListUsers", { room: s.room }, { timeoutMs: 10000 });
  if (session === s && s.client === client) showUsers(reply.users ?? []);
}

async function send(s, content) {
  const client = s.client;
  if (!client) throw new ZrpcError(Status.UNAVAILABLE, "not connected");
  const request = { room: s.room, user: s.user, content, idempotency_key: keyFor(content) };
  const ack = await client.unary("Chat/SendMessage", request, { timeoutMs: 10000 });
  pending = null;
  return ack;
}

// ---------------------------------------------------------------- page wiring

function init() {
  const params = new URLSearchParams(location.search);
  ui.name.value = params.get("name") ?? localStorage.getItem("zrpc-chat-name") ?? "";
  ui.room.value = params.get("room") ?? localStorage.getItem("zrpc-chat-room") ?? "general";

  ui.joinForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const user = ui.name.value.trim();
    const room = ui.room.value.trim();
    if (!user || !room) return;
    localStorage.setItem("zrpc-chat-name", user);
    localStorage.setItem("zrpc-chat-room", room);
    ui.joinError.textContent = "";
    join(user, room, ui.token.value.trim());
  });

  ui.leave.addEventListener("click", () => leave());

  ui.tokenForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const token = ui.newToken.value.trim();
    if (token && session?.tokenWait) session.tokenWait(token);
  });

  ui.sendForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const s = session;
    const content = ui.input.value;
    if (!s || !content.trim()) return;
    const size = new TextEncoder().encode(content).length;
    if (size > MAX_CONTENT_BYTES) {
      ui.sendError.textContent = `Too long: ${size} bytes; a message may have ${MAX_CONTENT_BYTES}.`;
      return;
    }
    ui.send.disabled = true;
    ui.sendError.textContent = "";
    try {
      const ack = await send(s, content);
      if (ui.input.value === content) ui.input.value = "";
      // with authentication the server stores messages under the caller's identity
      const stored = ack?.message?.user;
      if (stored && stored !== s.user && session === s) {
        s.user = stored;
        ui.me.textContent = stored;
      }
    } catch (err) {
      // the text stays in the box with its idempotency key: if the connection dropped the
      // message may have been stored, and sending it again returns that message, not a copy
      const maybe = err instanceof ZrpcError
        && (err.code === Status.UNAVAILABLE || err.code === Status.DEADLINE_EXCEEDED);
      ui.sendError.textContent = maybe
        ? `Maybe not sent (${describe(err)}). Send again: it will not appear twice.`
        : `Not sent (${describe(err)}). Try again.`;
    } finally {
      ui.send.disabled = ui.input.disabled;
      ui.input.focus();
    }
  });
  document.body.dataset.ready = "true";
}

init();
