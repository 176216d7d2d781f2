"""The UI's one page: plain HTML, CSS and JavaScript, no build step and nothing fetched from elsewhere.

The script and the style are served as files of their own (``/static/page.js``, ``/static/page.css``)
so that the page's Content-Security-Policy can forbid inline script outright.
"""

PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>anymodal chat</title>
<link rel="stylesheet" href="/static/page.css">
<script src="/static/page.js" defer></script>
</head>
<body data-accepts="__ACCEPTS__">
<header>anymodal chat</header>
<main id="log" aria-live="polite"></main>
<form id="composer">
  <div class="row">
    <textarea id="text" name="text" placeholder="Message (Enter to send, Shift+Enter for a new line)"></textarea>
    <label class="file" data-kind="image">image <input id="image" name="image" type="file" accept="image/*" multiple></label>
    <label class="file" data-kind="audio">audio <input id="audio" name="audio" type="file" accept="audio/*" multiple></label>
    <label class="file" data-kind="video">video <input id="video" name="video" type="file" accept="video/*,image/gif" multiple></label>
    <button id="send" type="submit">Send</button>
  </div>
  <div id="status"></div>
</form>
</body>
</html>
"""

PAGE_CSS = r"""  body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f6; color: #1d1d1f; }
  header { padding: 0.8rem 1.2rem; background: #1d1d1f; color: #fff; font-weight: 600; }
  #log { max-width: 52rem; margin: 1rem auto; padding: 0 1rem 12rem; }
  .turn { margin: 0.6rem 0; padding: 0.7rem 0.9rem; border-radius: 0.6rem; white-space: pre-wrap; }
  .turn.user { background: #dbeafe; margin-left: 4rem; }
  .turn.assistant { background: #fff; margin-right: 4rem; border: 1px solid #ddd; }
  .turn .who { font-size: 0.75rem; color: #666; display: block; margin-bottom: 0.3rem; }
  .turn img { display: block; max-width: 16rem; min-width: 8rem; image-rendering: pixelated; margin: 0.4rem 0;
              border-radius: 0.3rem; }
  .turn audio, .turn video, .turn .file-link { display: block; margin: 0.4rem 0; }
  .turn video { max-width: 16rem; }
  #composer { position: fixed; bottom: 0; left: 0; right: 0; background: #fff; border-top: 1px solid #ccc;
              padding: 0.7rem; }
  #composer .row { max-width: 52rem; margin: 0 auto; display: flex; gap: 0.5rem; align-items: flex-end; flex-wrap: wrap; }
  #text { flex: 1 1 20rem; min-height: 2.6rem; font: inherit; padding: 0.4rem; }
  label.file { font-size: 0.8rem; }
  #status { max-width: 52rem; margin: 0.3rem auto 0; font-size: 0.8rem; color: #666; min-height: 1em; }
  #status.error { color: #b00020; }
  button { font: inherit; padding: 0.5rem 1.2rem; }
"""

PAGE_JS = r""""use strict";
const ACCEPTS = document.body.dataset.accepts.split(",").filter(Boolean);
const log = document.getElementById("log");
const form = document.getElementById("composer");
const statusLine = document.getElementById("status");
let sessionId = sessionStorage.getItem("anymodal-session");

for (const label of document.querySelectorAll("label.file")) {
  if (!ACCEPTS.includes(label.dataset.kind)) label.hidden = true;  // the model cannot take this input
}

function setStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

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

function renderTurn(turn) {
  const div = document.createElement("div");
  div.className = "turn " + turn.role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = turn.role === "user" ? "you" : "anymodal";
  div.appendChild(who);
  // each placeholder (<image>, <audio>, <video>, <depth>...) in the text is replaced by that kind's
  // next medium, in order
  const queues = {};
  for (const item of turn.media) (queues[item.kind] = queues[item.kind] || []).push(item);
  for (const part of turn.text.split(/(<[a-z][a-z0-9_]*>)/)) {
    const m = /^<([a-z][a-z0-9_]*)>$/.exec(part);
    if (m && queues[m[1]] && queues[m[1]].length) div.appendChild(mediaElement(queues[m[1]].shift()));
    else if (part.trim()) div.appendChild(document.createTextNode(part.trim()));
  }
  for (const kind in queues) for (const item of queues[kind]) div.appendChild(mediaElement(item));
  log.appendChild(div);
  // a medium has no height until it has loaded: scroll again when each one has
  for (const el of div.querySelectorAll("img, audio, video")) {
    for (const type of ["load", "loadedmetadata", "error"]) el.addEventListener(type, () => scrollToEnd(div));
  }
  scrollToEnd(div);
}

function scrollToEnd(turn) {
  if (turn !== log.lastElementChild) return;  // a newer turn has come since; leave the view to it
  // the composer is fixed over the bottom of the page: keep room for it under the last turn
  log.style.paddingBottom = (form.offsetHeight + 16) + "px";
  window.scrollTo(0, document.documentElement.scrollHeight);
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function startSession() {
  if (sessionId) {
    try {
      const history = await api("/api/sessions/" + sessionId);
      history.turns.forEach(renderTurn);
      return;
    } catch (e) { /* the server restarted: start over */ }
  }
  sessionId = (await api("/api/sessions", {method: "POST"})).id;
  sessionStorage.setItem("anymodal-session", sessionId);
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(form);
  const hasFiles = [...data.values()].some(v => v instanceof File && v.name);
  if (!String(data.get("text") || "").trim() && !hasFiles) return;
  const button = document.getElementById("send");
  button.disabled = true;
  setStatus("generating...");
  try {
    const result = await api("/api/sessions/" + sessionId + "/send", {method: "POST", body: data});
    renderTurn(result.user);
    renderTurn(result.reply);
    form.reset();
    setStatus("");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    button.disabled = false;
  }
});

document.getElementById("text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
});

startSession().then(() => setStatus("")).catch(e => setStatus("cannot start a session: " + e.message, true));
"""
