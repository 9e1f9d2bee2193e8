// llmhost's chat page: a plain client of the server's own /v1 API (no build step,
// nothing fetched from elsewhere). Chat streams from /v1/chat/completions; answers
// render as Markdown (marked + DOMPurify, vendored); conversations are kept in
// localStorage; an image can be attached for models that take them. The Models
// panel loads (with progress events) and unloads through /v1/models.
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];            // the conversation sent with each request (the current one's messages)
let controller = null;       // aborts the running generation (Stop)
let imageModels = new Set(); // ids of the loaded models that take images

// -- Markdown ----------------------------------------------------------------------
// Model output is untrusted: raw HTML inside the Markdown is shown as text, and
// only what DOMPurify returns reaches the page (static/vendor/README.md).

const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
marked.use({ gfm: true, renderer: { html: (token) => escapeHtml(token.text || token.raw || "") } });
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
});

function renderMarkdown(div, text) {
  div.innerHTML = DOMPurify.sanitize(marked.parse(text), { FORBID_TAGS: ["style", "form", "input"] });
}

// -- conversations (localStorage) ------------------------------------------------------

const STORE = "llmhost-conversations";
let conversations = [];      // [{id, title, messages}], newest first
let current = null;

function loadConversations() {
  try { conversations = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch { conversations = []; }
  if (!Array.isArray(conversations)) conversations = [];
  const wanted = localStorage.getItem(STORE + "-current");
  switchTo(conversations.find((c) => c.id === wanted) || conversations[0] || newConversation());
}

function newConversation() {
  const c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat", messages: [] };
  conversations.unshift(c);
  return c;
}

function saveConversations() {
  try {
    localStorage.setItem(STORE, JSON.stringify(conversations));
    localStorage.setItem(STORE + "-current", current.id);
  } catch (err) {            // quota: images are large; keep the page working
    $("stats").textContent = "This conversation is too large to keep in the browser: " + err.message;
  }
  const select = $("conversations");
  select.replaceChildren(...conversations.map((c) => new Option(c.title, c.id, false, c === current)));
}

function switchTo(conversation) {
  if (controller) return;
  current = conversation;
  history = conversation.messages;
  $("log").replaceChildren();
  for (const m of history) addMessage(m.role, m.content);
  saveConversations();
}

function contentText(content) {
  return typeof content === "string" ? content
    : content.filter((p) => p.type === "text").map((p) => p.text).join("\n");
}

// -- talking to the server ----------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(), body: body && JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || `HTTP ${r.status}`);
  return data;
}

// Yields the JSON of each `data:` event of a server-sent event stream until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") return;
        yield JSON.parse(line.slice(6));
      }
    }
  }
}

async function postStream(path, body, signal) {
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!r.ok) {
    const data = await r.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || `HTTP ${r.status}`);
  }
  return events(r);
}

// -- models -----------------------------------------------------------------------

async function refreshModels() {
  let models;
  try {
    models = (await api("GET", "/v1/models")).data;
  } catch (err) {
    $("stats").textContent = "Cannot list models: " + err.message;
    return;
  }
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  imageModels = new Set(models.filter((m) => (m.input_modalities || []).includes("image")).map((m) => m.id));
  for (const m of models.filter((m) => m.status === "loaded" && m.task !== "embed")) {
    select.append(new Option(m.id, m.id, false, m.id === previous));
  }
  showAttach();
  if (!select.options.length) select.append(new Option("(no chat model loaded)", ""));
  const list = $("models");
  list.replaceChildren();
  for (const m of models) {
    const li = document.createElement("li");
    const what = m.status === "loading"
      ? `loading${m.fraction != null ? " " + Math.round(m.fraction * 100) + "%" : ""}`
      : `${m.task}, ${m.device}`;
    li.textContent = `${m.id} (${what})`;
    if (m.status === "loaded") {
      const button = document.createElement("button");
      button.textContent = "Unload";
      button.onclick = () => unload(m.id);
      li.append(button);
    }
    list.append(li);
  }
}

async function unload(id) {
  try {
    await api("DELETE", "/v1/models/" + id);
  } catch (err) {
    $("load-status").textContent = err.message;
  }
  refreshModels();
}

async function load(event) {
  event.preventDefault();
  const body = { model: $("load-source").value.trim(), stream: true };
  if ($("load-id").value.trim()) body.id = $("load-id").value.trim();
  const status = $("load-status"), bar = $("load-progress");
  status.textContent = "Loading " + body.model + "…";
  bar.hidden = false;
  bar.removeAttribute("value");
  try {
    for await (const e of await postStream("/v1/models", body)) {
      if (e.error) throw new Error(e.error.message);
      if (e.object === "model.load.progress") {
        status.textContent = `${e.phase}${e.step ? ": " + e.step : ""} (${e.elapsed_seconds.toFixed(0)} s)`;
        if (e.fraction != null) bar.value = e.fraction; else bar.removeAttribute("value");
      } else {
        status.textContent = `Loaded ${e.id} in ${e.load_seconds} s.`;
      }
    }
  } catch (err) {
    status.textContent = "Load failed: " + err.message;
  }
  bar.hidden = true;
  refreshModels();
}

// -- chat -------------------------------------------------------------------------

function showAttach() {
  const takesImages = imageModels.has($("model").value);
  $("attach").hidden = !takesImages;
  if (!takesImages) $("image").value = "";
}

function readImage() {
  const file = $("image").files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// A message: assistant answers as sanitized Markdown, the rest as text (a user's
// content parts: their text, and their images as thumbnails).
function addMessage(role, content) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "assistant") renderMarkdown(div, contentText(content));
  else div.textContent = contentText(content);
  if (Array.isArray(content)) {
    for (const part of content.filter((p) => p.type === "image_url")) {
      const img = document.createElement("img");
      img.className = "thumb";
      img.alt = "attached image";
      if (part.image_url.url.startsWith("data:image/")) img.src = part.image_url.url;
      div.append(img);
    }
  }
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function settings() {
  const stop = $("stop-seqs").value.split("\n").filter((s) => s.length);
  const body = {
    temperature: parseFloat($("temperature").value),
    max_tokens: parseInt($("max-tokens").value, 10),
    top_p: parseFloat($("top-p").value),
  };
  if (stop.length) body.stop = stop.slice(0, 4);
  return body;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  const model = $("model").value;
  if (!text || controller) return;
  if (!model) { addMessage("error", "Load a chat model first (Models panel)."); return; }
  let image = null;
  try { image = imageModels.has(model) ? await readImage() : null; }
  catch (err) { addMessage("error", "Cannot read the image: " + err.message); return; }
  $("prompt").value = "";
  $("image").value = "";
  const content = image ? [{ type: "image_url", image_url: { url: image } }, { type: "text", text }] : text;
  addMessage("user", content);
  history.push({ role: "user", content });
  if (current.title === "New chat") current.title = text.slice(0, 40);
  saveConversations();
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : [...history];

  const out = addMessage("assistant", "");
  out.dataset.state = "streaming";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let first = null, answer = "", usage = null, finish = null;
  try {
    const body = { model, messages, stream: true, stream_options: { include_usage: true }, ...settings() };
    for await (const chunk of await postStream("/v1/chat/completions", body, controller.signal)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        if (first === null) first = performance.now();
        answer += choice.delta.content;
        renderMarkdown(out, answer);
        out.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else { out.className = "msg error"; out.textContent = answer + (answer ? "\n" : "") + err.message; }
  }
  const ended = performance.now();
  out.dataset.state = finish || "error";
  history.push({ role: "assistant", content: answer });
  saveConversations();
  const tokens = usage ? usage.completion_tokens : null;
  const parts = [];
  if (first !== null) parts.push(`TTFT ${((first - started) / 1000).toFixed(2)} s`);
  if (tokens && first !== null && ended > first) parts.push(`${(tokens / ((ended - first) / 1000)).toFixed(1)} tokens/s`);
  if (tokens) parts.push(`${tokens} tokens`);
  if (finish) parts.push(finish);
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = parts.join(" · ");
  out.append(meta);
  $("stats").textContent = parts.join(" · ");
  controller = null;
  $("send").disabled = false;
  $("stop").disabled = true;
}

// -- wiring -------------------------------------------------------------------------

$("api-key").value = localStorage.getItem("llmhost-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("llmhost-api-key", $("api-key").value.trim());
  refreshModels();
});
$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  history.length = 0; $("log").replaceChildren(); $("stats").textContent = "";
  current.title = "New chat"; saveConversations();
});
$("new-chat").addEventListener("click", () => { if (!controller) switchTo(newConversation()); });
$("conversations").addEventListener("change", (e) => switchTo(conversations.find((c) => c.id === e.target.value)));
$("model").addEventListener("change", showAttach);
loadConversations();
$("refresh").addEventListener("click", refreshModels);
$("load-form").addEventListener("submit", load);
refreshModels();
