// llmhost's chat page: a plain client of the server's own /v1 API (no build step,
// nothing fetched from elsewhere). Chat streams from /v1/chat/completions; the
// Models panel loads (with progress events) and unloads through /v1/models.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // the conversation sent with each request
let controller = null;       // aborts the running generation (Stop)

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
  for (const m of models.filter((m) => m.status === "loaded" && m.task !== "embed")) {
    select.append(new Option(m.id, m.id, false, m.id === previous));
  }
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

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
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
  $("prompt").value = "";
  addMessage("user", text);
  history.push({ role: "user", content: text });
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
        out.textContent = answer;
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
$("clear").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); $("stats").textContent = ""; });
$("refresh").addEventListener("click", refreshModels);
$("load-form").addEventListener("submit", load);
refreshModels();
