// The proxy's chat page. Plaintext never leaves this machine: the page talks
// to the local proxy, which encrypts. The conversation is kept in this
// browser's localStorage, so a reload keeps it.
"use strict";

const STORE = "ee-chat-v1";
// Every element is looked up once, before any answer is on the page: an
// answer's markup must never stand in for a control.
const $ = (id) => document.getElementById(id);
const log = $("log"), form = $("form"), input = $("input"), send = $("send"), stop = $("stop");
const systemBox = $("system"), systemDetails = $("system-box");
const settings = { "temperature": $("temperature"), "max-tokens": $("max-tokens") };
const showWire = $("show-wire"), reset = $("reset");

// One conversation. A turn is {role, content}; an assistant turn also has
// status ("done", "stopped", "cut" or "error"), error, stats and wire.
let state = { system: "", turns: [] };
let running = null; // the AbortController of the answer being written

// A stored conversation of the right shape, or a new one.
function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "null");
    const turnOk = (t) => t && (t.role === "user" || t.role === "assistant") &&
      typeof t.content === "string";
    if (saved && typeof saved.system === "string" && Array.isArray(saved.turns) &&
        saved.turns.every(turnOk)) {
      state = { system: saved.system, turns: saved.turns,
                settings: typeof saved.settings === "object" && saved.settings ? saved.settings : {} };
    }
  } catch (_) { /* a damaged store starts a new chat */ }
}

function save() {
  try { localStorage.setItem(STORE, JSON.stringify(state)); } catch (_) { /* full or disabled */ }
}

// Model output is Markdown; marked renders it and DOMPurify removes anything
// executable, forms and their fields, and ids and names (which could shadow
// the page's own), so the model cannot run script or fake a control. The
// page's Content-Security-Policy would refuse inline script anyway.
const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["form", "input", "button", "textarea", "select", "option", "style"],
  FORBID_ATTR: ["id", "name", "style"],
};
function renderMarkdown(text) {
  const html = marked.parse(text, { gfm: true, breaks: true, async: false });
  return DOMPurify.sanitize(html, PURIFY);
}

function addCopyButtons(root) {
  for (const pre of root.querySelectorAll("pre")) {
    if (pre.querySelector(".copy")) continue;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "copy";
    button.addEventListener("click", async () => {
      const code = pre.querySelector("code") || pre;
      try {
        await navigator.clipboard.writeText(code.textContent);
        button.textContent = "copied";
      } catch (_) {
        button.textContent = "select and copy";
        getSelection().selectAllChildren(code);
      }
      setTimeout(() => { button.textContent = "copy"; }, 1500);
    });
    pre.append(button);
  }
}

function nearBottom() {
  return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
}

function scrollToEnd() {
  window.scrollTo(0, document.body.scrollHeight);
}

// The messages sent for an answer: the system prompt, then every turn but
// failed answers and the questions they failed on (they stay on screen).
function messages(upTo) {
  const out = [];
  if (state.system.trim()) out.push({ role: "system", content: state.system });
  const turns = state.turns.slice(0, upTo);
  turns.forEach((t, i) => {
    if (t.role === "assistant" && t.status === "error") return;
    const next = turns[i + 1];
    if (t.role === "user" && next && next.role === "assistant" && next.status === "error") return;
    if (t.role === "user" && next && next.role === "user") return;
    out.push({ role: t.role, content: t.content });
  });
  return out;
}

function noteText(turn) {
  const parts = [];
  if (turn.stats) {
    const { tokens, seconds } = turn.stats;
    const rate = tokens > 1 && seconds > 0 ? ` · ${((tokens - 1) / seconds).toFixed(1)} tok/s` : "";
    parts.push({ cls: "stats", text: `${tokens} tokens${rate}` });
  }
  if (turn.status === "cut") parts.push({ cls: "warn", text: "cut off at max tokens" });
  if (turn.status === "stopped") parts.push({ cls: "warn", text: "stopped" });
  if (turn.status === "error") parts.push({ cls: "failed", text: "failed: " + turn.error });
  return parts;
}

// Draws one turn; returns its element.
function drawTurn(turn, index) {
  const div = document.createElement("div");
  div.className = "msg " + turn.role;
  div.dataset.index = String(index);
  const text = document.createElement("div");
  text.className = "text";
  div.append(text);
  if (turn.role === "user") {
    text.textContent = turn.content;
  } else {
    text.innerHTML = renderMarkdown(turn.content);
    addCopyButtons(text);
    div.dataset.state = turn.status || "done";
    div.dataset.chunks = String(turn.chunks || 0);
    if (turn.status === "error") div.classList.add("error");
    const wire = document.createElement("div");
    wire.className = "wire";
    if (turn.wire) {
      wire.textContent = "server received " + turn.wire.sent.length + " token IDs: [" +
        turn.wire.sent.join(", ") + "] — server sent back: [" + turn.wire.received.join(", ") + "]";
    }
    div.append(wire);
  }
  const last = index === state.turns.length - 1;
  const note = document.createElement("div");
  note.className = "note";
  for (const part of turn.role === "assistant" ? noteText(turn) : []) {
    const span = document.createElement("span");
    span.className = part.cls;
    span.textContent = part.text;
    note.append(span);
  }
  // Retry the last answer, or a question that never got one.
  if (last && !running) {
    const retry = document.createElement("button");
    retry.type = "button";
    retry.className = "retry";
    retry.textContent = turn.role === "user" ? "no answer: retry" : "retry";
    retry.addEventListener("click", () => {
      if (turn.role === "assistant") state.turns.pop();
      save();
      answer();
    });
    note.append(retry);
  }
  if (note.childElementCount) div.append(note);
  return div;
}

function redraw() {
  log.replaceChildren(...state.turns.map(drawTurn));
}

// Reads an OpenAI-style SSE stream, calling onData with each parsed chunk.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

function setRunning(controller) {
  running = controller;
  send.disabled = !!controller;
  stop.hidden = !controller;
}

// Answers the conversation as it stands (its last turn is a question).
async function answer() {
  const request = messages(state.turns.length);
  const turn = { role: "assistant", content: "", status: "streaming",
                 wire: { sent: [], received: [] } };
  state.turns.push(turn);
  const controller = new AbortController();
  setRunning(controller);
  redraw();
  const bubble = log.lastElementChild;
  const text = bubble.querySelector(".text");
  let pending = false, tokens = 0, first = 0, finish = null;
  const paint = () => {
    pending = false;
    const stick = nearBottom();
    text.innerHTML = renderMarkdown(turn.content);
    addCopyButtons(text);
    if (stick) scrollToEnd();
  };
  scrollToEnd();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: controller.signal,
      body: JSON.stringify({
        messages: request,
        stream: true,
        stream_options: { include_usage: true },
        ee_trace: true,
        temperature: Number(settings["temperature"].value),
        max_tokens: Number(settings["max-tokens"].value),
      }),
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || response.statusText);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.encrypted_prompt_ids) turn.wire.sent.push(...chunk.encrypted_prompt_ids.flat());
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices || []) {
        const delta = (choice.delta && choice.delta.content) || "";
        if (delta && !first) first = performance.now();
        turn.content += delta;
        turn.wire.received.push(...(choice.encrypted_token_ids || []));
        if (choice.finish_reason) finish = choice.finish_reason;
        turn.chunks = (turn.chunks || 0) + 1;
        bubble.dataset.chunks = String(turn.chunks);
      }
      if (!pending) { pending = true; requestAnimationFrame(paint); }
    });
    turn.status = finish === "length" ? "cut" : "done";
  } catch (e) {
    if (e.name === "AbortError") {
      turn.status = "stopped";
    } else {
      turn.status = "error";
      turn.error = e.message;
    }
  }
  if (tokens) turn.stats = { tokens, seconds: first ? (performance.now() - first) / 1000 : 0 };
  setRunning(null);
  save();
  const stick = nearBottom();
  redraw();
  if (stick) scrollToEnd();
}

function ask(text) {
  state.turns.push({ role: "user", content: text });
  save();
  answer();
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || running) return;
  input.value = "";
  ask(text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    form.requestSubmit();
  }
});
stop.addEventListener("click", () => running && running.abort());
showWire.addEventListener("change", (e) => {
  document.body.classList.toggle("show-wire", e.target.checked);
});
reset.addEventListener("click", () => {
  if (running) running.abort();
  state = { system: state.system, settings: state.settings, turns: [] };
  save();
  redraw();
});
systemBox.addEventListener("input", () => {
  state.system = systemBox.value;
  save();
});
// The settings are kept with the conversation.
for (const [id, field] of Object.entries(settings)) {
  field.addEventListener("input", () => {
    state.settings = { ...(state.settings || {}), [id]: field.value };
    save();
  });
}

load();
systemBox.value = state.system;
for (const [id, value] of Object.entries(state.settings || {})) {
  if (settings[id] && typeof value === "string") settings[id].value = value;
}
if (state.system) systemDetails.open = true;
redraw();
scrollToEnd();

// For tests and the console: the renderer the page uses.
window.eeChat = { renderMarkdown };

// ?prompt=... fills the box (a shareable link); it is never sent by itself,
// since any site could link here, and the address is cleaned so that a
// reload does not fill it again.
const params = new URLSearchParams(location.search);
if (params.has("prompt")) {
  input.value = params.get("prompt");
  history.replaceState(null, "", "/");
}
