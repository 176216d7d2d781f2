"""The UI's one page: plain HTML, CSS and JavaScript, no build step and nothing fetched from elsewhere.

The script and the style are served as files of their own (``/static/page.js``, ``/static/page.css``)
so that the page's Content-Security-Policy can forbid inline script outright. The server fills in
``__MODEL__``, ``__TAKES__``, ``__MAKES__`` and ``__ACCEPTS__``, HTML-escaped.

Layout: the page is a column as tall as the window (header, the conversation, the composer), and
only the conversation scrolls, so the composer can never cover the newest reply. A reply streams
in (``POST /api/sessions/{id}/stream``, server-sent events read from ``fetch``): its text token by
token, and each medium's denoising steps as a bar, until the finished turn replaces it. Turns
being generated are ``.bubble.pending``; finished ones are ``.bubble.turn``.
"""

PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>anymodal chat</title>
<link rel="icon" href="/favicon.ico">
<link rel="stylesheet" href="/static/page.css">
<script src="/static/page.js" defer></script>
</head>
<body data-accepts="__ACCEPTS__">
<header>
  <div class="title"><span class="app">anymodal</span> <span id="model-name" title="the loaded model">__MODEL__</span></div>
  <div id="model-caps"><span>takes <b id="takes">__TAKES__</b></span> <span>makes <b id="makes">__MAKES__</b></span></div>
  <nav class="actions">
    <button id="new-chat" type="button">New chat</button>
    <button id="chats-button" type="button" aria-expanded="false" aria-controls="chats">Chats</button>
  </nav>
  <div id="chats" hidden>
    <div class="chats-head">Saved chats</div>
    <ul id="chat-list"></ul>
  </div>
</header>
<main id="log" aria-live="polite"><div id="turns"></div></main>
<form id="composer">
  <textarea id="text" name="text" rows="2" placeholder="Message (Enter to send, Shift+Enter for a new line)"></textarea>
  <div class="row">
    <div class="uploads">
      <label class="file" data-kind="image"><input id="image" name="image" type="file" accept="image/*" multiple><span>+ image</span><span class="count"></span></label>
      <label class="file" data-kind="audio"><input id="audio" name="audio" type="file" accept="audio/*" multiple><span>+ audio</span><span class="count"></span></label>
      <label class="file" data-kind="video"><input id="video" name="video" type="file" accept="video/*,image/gif" multiple><span>+ video</span><span class="count"></span></label>
    </div>
    <button id="stop" type="button" hidden>Stop</button>
    <button id="send" type="submit">Send</button>
  </div>
  <div id="status" role="status"></div>
</form>
</body>
</html>
"""

PAGE_CSS = r"""* { box-sizing: border-box; }
[hidden] { display: none !important; }
html, body { height: 100%; }
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f6; color: #1d1d1f;
       display: flex; flex-direction: column; height: 100vh; height: 100dvh; }
button { font: inherit; padding: 0.45rem 1.1rem; border-radius: 0.4rem; border: 1px solid #999; background: #fff;
         cursor: pointer; }
button:disabled { opacity: 0.5; cursor: default; }

header { flex: none; position: relative; display: flex; flex-wrap: wrap; align-items: center; gap: 0.3rem 1rem;
         padding: 0.55rem 1rem; background: #1d1d1f; color: #fff; }
header .title { font-weight: 600; display: flex; align-items: baseline; gap: 0.5rem; min-width: 0; }
#model-name { font-weight: 400; font-size: 0.85rem; padding: 0.1rem 0.45rem; border-radius: 0.3rem;
              background: #3a3a3c; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; max-width: 14rem; }
#model-caps { font-size: 0.75rem; color: #c7c7cc; display: flex; flex-wrap: wrap; gap: 0.2rem 0.9rem; }
#model-caps b { font-weight: 500; color: #fff; }
header .actions { margin-left: auto; display: flex; gap: 0.4rem; }
header .actions button { background: #3a3a3c; color: #fff; border-color: #5a5a5e; padding: 0.3rem 0.75rem;
                         font-size: 0.85rem; }
#chats { position: absolute; right: 0.8rem; top: 100%; z-index: 10; width: min(24rem, calc(100vw - 1.6rem));
         max-height: 60vh; overflow-y: auto; background: #fff; color: #1d1d1f; border: 1px solid #ccc;
         border-radius: 0.5rem; box-shadow: 0 6px 24px rgba(0, 0, 0, 0.18); }
#chats .chats-head { padding: 0.5rem 0.8rem; font-size: 0.8rem; color: #666; }
#chat-list { list-style: none; margin: 0; padding: 0; }
#chat-list li.note { padding: 0.5rem 0.8rem; font-size: 0.85rem; color: #666; border-top: 1px solid #eee; }
#chat-list button { display: block; width: 100%; text-align: left; background: none; border: 0;
                    border-top: 1px solid #eee; border-radius: 0; padding: 0.5rem 0.8rem; overflow: hidden;
                    text-overflow: ellipsis; white-space: nowrap; }
#chat-list button:hover, #chat-list button.current { background: #eef2ff; }
#chat-list .when { display: block; font-size: 0.72rem; color: #666; }

#log { flex: 1 1 auto; min-height: 0; overflow-y: auto; padding: 0.4rem 1rem 1rem; }
#turns { max-width: 52rem; margin: 0 auto; }
.bubble { margin: 0.6rem 0; padding: 0.7rem 0.9rem; border-radius: 0.6rem; white-space: pre-wrap;
          overflow-wrap: anywhere; }
.bubble.user { background: #dbeafe; margin-left: 4rem; }
.bubble.assistant { background: #fff; margin-right: 4rem; border: 1px solid #ddd; }
.bubble.pending.user { opacity: 0.75; }
.bubble .who { font-size: 0.75rem; color: #666; display: block; margin-bottom: 0.3rem; }
.bubble img { display: block; max-width: 16rem; min-width: 8rem; image-rendering: pixelated; margin: 0.4rem 0;
              border-radius: 0.3rem; }
.bubble audio, .bubble video, .bubble .file-link { display: block; margin: 0.4rem 0; max-width: 100%; }
.bubble video { max-width: 16rem; }
.bubble .chip { display: inline-block; font-size: 0.8rem; padding: 0 0.4rem; margin: 0 0.1rem; border-radius: 0.6rem;
                background: #eef2ff; color: #3730a3; white-space: nowrap; }
.bubble .empty { color: #888; font-style: italic; }
.bubble .typing::after { content: "▍"; animation: blink 1s steps(1) infinite; color: #888; }
@keyframes blink { 50% { opacity: 0; } }
.progress { display: flex; flex-direction: column; gap: 0.3rem; margin-top: 0.4rem; font-size: 0.8rem; color: #444;
            white-space: normal; }
.progress div { display: flex; align-items: center; gap: 0.5rem; }
.progress progress { flex: 1 1 auto; max-width: 14rem; height: 0.6rem; }

#composer { flex: none; background: #fff; border-top: 1px solid #ccc;
            padding: 0.6rem 0.8rem calc(0.5rem + env(safe-area-inset-bottom, 0px)); }
#composer > * { max-width: 52rem; margin-left: auto; margin-right: auto; }
#text { display: block; width: 100%; min-height: 2.6rem; max-height: 9rem; resize: vertical; font: inherit;
        padding: 0.45rem 0.55rem; border: 1px solid #bbb; border-radius: 0.4rem; }
#composer .row { display: flex; align-items: center; gap: 0.5rem; margin-top: 0.45rem; }
.uploads { display: flex; flex: 1 1 auto; gap: 0.4rem; min-width: 0; }
label.file { position: relative; display: inline-flex; align-items: center; padding: 0.3rem 0.65rem;
             border: 1px solid #bbb; border-radius: 1rem; background: #f7f7f9; font-size: 0.85rem;
             white-space: nowrap; cursor: pointer; }
label.file input { position: absolute; inset: 0; width: 100%; height: 100%; opacity: 0; cursor: pointer; }
label.file.has-files { background: #dbeafe; border-color: #60a5fa; }
label.file .count:not(:empty) { margin-left: 0.35rem; padding: 0 0.4rem; border-radius: 0.6rem; background: #2563eb;
                                color: #fff; font-size: 0.75rem; }
label.file:focus-within { outline: 2px solid #2563eb; outline-offset: 1px; }
#send { background: #1d4ed8; color: #fff; border-color: #1d4ed8; }
#stop { background: #b91c1c; color: #fff; border-color: #b91c1c; }
#status { margin-top: 0.3rem; font-size: 0.8rem; color: #666; min-height: 1em; }
#status.error { color: #b00020; }

@media (max-width: 600px) {
  header { padding: 0.45rem 0.7rem; }
  #model-caps { order: 3; width: 100%; }
  #log { padding: 0.3rem 0.6rem 0.8rem; }
  .bubble.user { margin-left: 1.5rem; }
  .bubble.assistant { margin-right: 1.5rem; }
  .bubble img, .bubble video { max-width: 100%; }
  #composer { padding-left: 0.6rem; padding-right: 0.6rem; }
  .uploads { gap: 0.3rem; }
  label.file { padding: 0.3rem 0.5rem; }
  button { padding: 0.45rem 0.8rem; }
}
"""

PAGE_JS = r""""use strict";
const ACCEPTS = document.body.dataset.accepts.split(",").filter(Boolean);
const scroller = document.getElementById("log");
const log = document.getElementById("turns");
const form = document.getElementById("composer");
const textBox = document.getElementById("text");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const newChatButton = document.getElementById("new-chat");
const chatsButton = document.getElementById("chats-button");
const chatsPanel = document.getElementById("chats");
const chatList = document.getElementById("chat-list");
const statusLine = document.getElementById("status");
const fileInputs = [...document.querySelectorAll("label.file input")];
let sessionId = sessionStorage.getItem("anymodal-session");
let turnCount = 0;  // finished turns of this session on the page
let running = null;  // the turn being generated

for (const label of document.querySelectorAll("label.file")) {
  if (!ACCEPTS.includes(label.dataset.kind)) label.hidden = true;  // the model cannot take this input
}
for (const input of fileInputs) input.addEventListener("change", () => showFiles(input));

function showFiles(input) {
  const label = input.closest("label");
  const n = input.files.length;
  label.classList.toggle("has-files", n > 0);
  label.querySelector(".count").textContent = n ? String(n) : "";
  label.title = [...input.files].map(f => f.name).join(", ");
}

function setStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

// ------------------------------------------------------------------ turns
function mediaElement(item) {
  if (item.kind === "audio") {
    const el = document.createElement("audio");
    el.controls = true;
    el.preload = "metadata";
    el.src = item.url;
    return el;
  }
  if (item.kind === "video" && !/\.gif$/i.test(item.url)) {  // an uploaded MP4 or WebM
    const el = document.createElement("video");
    el.controls = true;
    el.muted = true;
    el.preload = "metadata";
    el.src = item.url;
    return el;
  }
  if (item.kind !== "image" && item.kind !== "video") {  // another registered modality: a download link
    const el = document.createElement("a");
    el.href = item.url;
    el.download = "";
    el.className = "file-link";
    el.textContent = item.kind + " file";
    return el;
  }
  const el = document.createElement("img");  // images, and videos as animated GIFs
  el.src = item.url;
  el.alt = "generated " + item.kind;
  return el;
}

function chip(text) {
  const el = document.createElement("span");
  el.className = "chip";
  el.textContent = text;
  return el;
}

// Fill a bubble: who, then the text with each placeholder (<image>, <audio>, <video>, <depth>...)
// replaced by that kind's next medium, in order (or by a chip while it is being generated).
function fillBubble(div, role, text, media) {
  div.replaceChildren();
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : "anymodal";
  div.appendChild(who);
  const queues = {};
  for (const item of media) (queues[item.kind] = queues[item.kind] || []).push(item);
  for (const part of text.split(/(<[a-z][a-z0-9_]*>)/)) {
    const m = /^<([a-z][a-z0-9_]*)>$/.exec(part);
    if (m && queues[m[1]] && queues[m[1]].length) div.appendChild(mediaElement(queues[m[1]].shift()));
    else if (m && media.length === 0 && div.closest(".pending") !== null) div.appendChild(chip(m[1]));
    else if (part.trim()) div.appendChild(document.createTextNode(part.trim()));
  }
  for (const kind in queues) for (const item of queues[kind]) div.appendChild(mediaElement(item));
  if (div.childNodes.length === 1 && !div.classList.contains("pending")) {
    const empty = document.createElement("span");
    empty.className = "empty";
    empty.textContent = "(an empty reply)";
    div.appendChild(empty);
  }
}

function turnElement(turn) {
  const div = document.createElement("div");
  div.className = "bubble turn " + turn.role;
  fillBubble(div, turn.role, turn.text, turn.media);
  // a medium has no height until it has loaded: scroll again when each one has
  for (const el of div.querySelectorAll("img, audio, video")) {
    for (const type of ["load", "loadedmetadata", "error"]) el.addEventListener(type, () => scrollToEnd(div));
  }
  return div;
}

function renderTurn(turn) {
  const div = turnElement(turn);
  log.appendChild(div);
  scrollToEnd(div);
  return div;
}

function atEnd() {
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 48;
}

function scrollToEnd(el) {
  if (el && el !== log.lastElementChild) return;  // a newer turn has come since; leave the view to it
  scroller.scrollTop = scroller.scrollHeight;
}

function clearLog() {
  log.replaceChildren();
  turnCount = 0;
}

// ------------------------------------------------------------------ the server
async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// Server-sent events from a fetch response: handle(event, data) for each one.
async function readEvents(response, handle) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) handle(event, JSON.parse(data));  // lines starting with ":" keep the connection alive
    }
  }
}

async function startSession() {
  if (sessionId) {
    try {
      await showSession(sessionId);
      return;
    } catch (e) { /* the server restarted on another directory: start over */ }
  }
  await newSession();
}

async function showSession(id) {
  const history = await api("/api/sessions/" + id);
  clearLog();
  sessionId = id;
  sessionStorage.setItem("anymodal-session", id);
  history.turns.forEach(renderTurn);
  turnCount = history.turns.length;
  scrollToEnd();
}

async function newSession() {
  const id = (await api("/api/sessions", {method: "POST"})).id;
  clearLog();
  sessionId = id;
  sessionStorage.setItem("anymodal-session", id);
}

// ------------------------------------------------------------------ sending, streaming, stopping
function pendingBubble(role) {
  const div = document.createElement("div");
  div.className = "bubble pending " + role;
  log.appendChild(div);
  return div;
}

function showPendingReply(turn) {
  const stick = atEnd();
  fillBubble(turn.replyDiv, "assistant", turn.replyText, []);
  turn.replyDiv.dataset.text = turn.replyText;  // the reply so far, as the server sent it
  const last = turn.replyDiv.lastChild;
  if (last && last.nodeType === Node.TEXT_NODE) {  // the cursor after the newest text
    const span = document.createElement("span");
    span.className = "typing";
    span.textContent = last.textContent;
    last.replaceWith(span);
  } else if (!turn.replyText) {
    const span = document.createElement("span");
    span.className = "typing";
    turn.replyDiv.appendChild(span);
  }
  const kinds = Object.keys(turn.progress);
  if (kinds.length) {
    const box = document.createElement("div");
    box.className = "progress";
    for (const kind of kinds) {
      const {step, total} = turn.progress[kind];
      const row = document.createElement("div");
      row.dataset.kind = kind;
      const label = document.createElement("span");
      label.textContent = `${kind}: step ${step} of ${total}`;
      const bar = document.createElement("progress");
      bar.max = total;
      bar.value = step;
      row.append(label, bar);
      box.appendChild(row);
    }
    turn.replyDiv.appendChild(box);
  }
  if (stick) scrollToEnd();
}

function setRunning(on) {
  sendButton.hidden = on;
  stopButton.hidden = !on;
  stopButton.disabled = false;
  newChatButton.disabled = on;
  for (const button of chatList.querySelectorAll("button")) button.disabled = on;
}

function takeComposer() {
  const files = {};
  for (const input of fileInputs) files[input.name] = [...input.files];
  const snapshot = {text: textBox.value, files};
  form.reset();
  fileInputs.forEach(showFiles);
  return snapshot;
}

// Put a message that was not kept back into the composer, unless something new was typed there.
function giveBackComposer(snapshot) {
  if (textBox.value.trim() || fileInputs.some(i => i.files.length)) return;
  textBox.value = snapshot.text;
  for (const input of fileInputs) {
    const dt = new DataTransfer();
    for (const f of snapshot.files[input.name] || []) dt.items.add(f);
    input.files = dt.files;
    showFiles(input);
  }
}

function dropTurn(turn) {
  turn.userDiv.remove();
  turn.replyDiv.remove();
  giveBackComposer(turn.composer);
}

function onEvent(turn, event, data) {
  if (event === "start") {
    setStatus("generating...");
  } else if (event === "text") {
    turn.replyText = data.text !== undefined ? data.text : turn.replyText + data.append;
    showPendingReply(turn);
  } else if (event === "step") {
    turn.progress[data.kind] = {step: data.step, total: data.total};
    setStatus(`generating ${data.kind}: step ${data.step} of ${data.total}`);
    showPendingReply(turn);
  } else if (event === "reply") {
    turn.done = true;
    const user = turnElement(data.user), reply = turnElement(data.reply);
    turn.userDiv.replaceWith(user);
    turn.replyDiv.replaceWith(reply);
    turnCount += 2;
    setStatus("");
    scrollToEnd(reply);
  } else if (event === "cancelled") {
    turn.done = true;
    dropTurn(turn);
    setStatus("stopped: that message was not kept (it is back in the box)");
  } else if (event === "error") {
    turn.done = true;
    dropTurn(turn);
    setStatus(data.error, true);
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (running) return;
  const data = new FormData(form);
  const hasFiles = fileInputs.some(i => i.files.length);
  if (!String(data.get("text") || "").trim() && !hasFiles) return;
  const turn = {sid: sessionId, replyText: "", progress: {}, done: false};
  turn.composer = takeComposer();
  turn.userDiv = pendingBubble("user");
  fillBubble(turn.userDiv, "user", turn.composer.text, []);
  for (const [kind, files] of Object.entries(turn.composer.files)) {  // the uploads, by name, until the turn is kept
    for (const f of files) turn.userDiv.append(chip(kind + ": " + f.name), " ");
  }
  turn.replyDiv = pendingBubble("assistant");
  showPendingReply(turn);
  scrollToEnd();
  running = turn;
  setRunning(true);
  setStatus("sending...");
  try {
    const response = await fetch("/api/sessions/" + turn.sid + "/stream", {method: "POST", body: data});
    if (!response.ok) {
      const body = await response.json().catch(() => ({error: response.statusText}));
      throw new Error(body.error || response.statusText);
    }
    await readEvents(response, (name, payload) => onEvent(turn, name, payload));
    if (!turn.done) throw new Error("the connection to the server was lost; reload the page to see whether the reply was kept");
  } catch (e) {
    if (!turn.done) dropTurn(turn);
    setStatus(e.message, true);
  } finally {
    running = null;
    setRunning(false);
  }
});

stopButton.addEventListener("click", async () => {
  if (!running) return;
  stopButton.disabled = true;
  setStatus("stopping...");
  try {
    await api("/api/sessions/" + running.sid + "/stop", {method: "POST"});
  } catch (e) {
    setStatus("cannot stop: " + e.message, true);
    stopButton.disabled = false;
  }
});

textBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
});

// ------------------------------------------------------------------ chats
newChatButton.addEventListener("click", async () => {
  closeChats();
  if (running) return;
  if (turnCount === 0) { textBox.focus(); return; }  // this one is still empty
  try {
    await newSession();
    setStatus("");
    textBox.focus();
  } catch (e) {
    setStatus("cannot start a new chat: " + e.message, true);
  }
});

function closeChats() {
  chatsPanel.hidden = true;
  chatsButton.setAttribute("aria-expanded", "false");
}

function note(text) {
  const li = document.createElement("li");
  li.className = "note";
  li.textContent = text;
  return li;
}

async function listChats() {
  chatList.replaceChildren(note("loading..."));
  let body;
  try {
    body = await api("/api/sessions");
  } catch (e) {
    chatList.replaceChildren(note("cannot list the chats: " + e.message));
    return;
  }
  if (!body.listed) {
    chatList.replaceChildren(note("This server is reachable from the network, so it does not list its chats; " +
                                  "each tab keeps its own."));
    return;
  }
  chatList.replaceChildren();
  if (!body.sessions.length) chatList.appendChild(note("no saved chats yet"));
  for (const s of body.sessions) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.id = s.id;
    button.className = s.id === sessionId ? "current" : "";
    button.disabled = running !== null;
    button.textContent = s.title || "(media only)";
    const when = document.createElement("span");
    when.className = "when";
    const exchanges = Math.floor(s.turns / 2);
    when.textContent = `${exchanges} ${exchanges === 1 ? "exchange" : "exchanges"} · ` +
                       new Date(s.updated * 1000).toLocaleString();
    button.appendChild(when);
    button.addEventListener("click", async () => {
      closeChats();
      try {
        await showSession(s.id);
        setStatus("");
      } catch (e) {
        setStatus("cannot open that chat: " + e.message, true);
      }
    });
    li.appendChild(button);
    chatList.appendChild(li);
  }
}

chatsButton.addEventListener("click", () => {
  if (!chatsPanel.hidden) { closeChats(); return; }
  chatsPanel.hidden = false;
  chatsButton.setAttribute("aria-expanded", "true");
  listChats();
});
document.addEventListener("click", (event) => {
  if (!chatsPanel.hidden && !chatsPanel.contains(event.target) && event.target !== chatsButton) closeChats();
});
document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeChats(); });

startSession().then(() => setStatus("")).catch(e => setStatus("cannot start a session: " + e.message, true));
"""
