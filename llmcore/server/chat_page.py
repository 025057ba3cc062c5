"""The chat page served at ``/``: one static HTML file with inline CSS and JS, no build step.

It lists models from ``GET /v1/models``, keeps the conversation in the page,
and streams replies from ``POST /v1/chat/completions`` by reading the
response body with ``fetch`` and parsing the Server-Sent Events itself. An API
key typed into the page is kept in ``localStorage`` and sent as a Bearer token.

URL parameters (handy for scripted checks): ``?model=NAME&prompt=TEXT&send=1``
selects a model, fills the prompt and sends it; ``max_tokens``,
``temperature`` and ``key`` preset those fields. ``#status`` reads ``done``
after a reply finished and ``error: ...`` after a failure.
"""

CHAT_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>llmcore chat</title>
<style>
  :root { --bg:#f7f7f8; --fg:#1f2328; --muted:#6e7781; --user:#dbeafe; --bot:#ffffff; --border:#d0d7de; }
  * { box-sizing: border-box; }
  body { margin:0; font:15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--fg);
         display:flex; flex-direction:column; height:100vh; }
  header { display:flex; gap:.6rem; align-items:center; flex-wrap:wrap; padding:.6rem 1rem; border-bottom:1px solid var(--border); background:#fff; }
  header h1 { font-size:1rem; margin:0 .6rem 0 0; }
  header label { color:var(--muted); font-size:.85rem; display:flex; gap:.3rem; align-items:center; }
  header input, header select { font:inherit; padding:.2rem .35rem; border:1px solid var(--border); border-radius:4px; }
  header input[type=number] { width:5.5rem; }
  #log { flex:1; overflow-y:auto; padding:1rem; display:flex; flex-direction:column; gap:.6rem; }
  .msg { max-width:52rem; padding:.55rem .8rem; border-radius:8px; border:1px solid var(--border); white-space:pre-wrap; word-wrap:break-word; }
  .msg.user { background:var(--user); align-self:flex-end; }
  .msg.assistant { background:var(--bot); align-self:flex-start; }
  .msg.error { background:#ffebe9; border-color:#ff8182; align-self:stretch; }
  .meta { color:var(--muted); font-size:.75rem; margin-top:.25rem; }
  form { display:flex; gap:.5rem; padding:.6rem 1rem; border-top:1px solid var(--border); background:#fff; }
  textarea { flex:1; font:inherit; padding:.45rem; border:1px solid var(--border); border-radius:6px; resize:vertical; min-height:2.6rem; }
  button { font:inherit; padding:.4rem .9rem; border-radius:6px; border:1px solid var(--border); background:#1f6feb; color:#fff; cursor:pointer; }
  button.secondary { background:#fff; color:var(--fg); }
  button:disabled { opacity:.5; cursor:default; }
  #status { color:var(--muted); font-size:.8rem; }
</style>
</head>
<body>
<header>
  <h1>llmcore chat</h1>
  <label>model <select id="model"></select></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" value="256"></label>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
  <label>API key <input id="key" type="password" placeholder="(none)" autocomplete="off"></label>
  <button id="clear" class="secondary" type="button">New chat</button>
  <span id="status">loading models…</span>
</header>
<main id="log" aria-live="polite"></main>
<form id="form">
  <textarea id="prompt" placeholder="Type a message; Enter sends, Shift+Enter adds a line" rows="2"></textarea>
  <button id="send" type="submit">Send</button>
  <button id="stop" class="secondary" type="button" disabled>Stop</button>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let history = [];
let controller = null;

function setStatus(text) { $("status").textContent = text; }

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function errorText(resp) {
  try { const j = await resp.json(); return (j.error && j.error.message) || JSON.stringify(j); }
  catch (e) { return resp.status + " " + resp.statusText; }
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { setStatus("error: " + await errorText(resp)); return false; }
    const data = await resp.json();
    const sel = $("model");
    const previous = params.get("model") || sel.value;
    sel.innerHTML = "";
    for (const m of data.data) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      sel.appendChild(opt);
    }
    if (previous && [...sel.options].some((o) => o.value === previous)) sel.value = previous;
    setStatus(data.data.length + " model(s)");
    return true;
  } catch (e) { setStatus("error: " + e); return false; }
}

// Parse a Server-Sent Events body: blocks separated by a blank line, "data:" lines joined.
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

async function send(text) {
  if (!text.trim() || controller) return;
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  const meta = document.createElement("div");
  meta.className = "meta";
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  setStatus("generating…");
  const t0 = performance.now();
  let first = null, tokens = 0, reply = "", finish = null;
  try {
    const body = {
      model: $("model").value,
      messages: history,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: parseInt($("max_tokens").value, 10) || 256,
      temperature: parseFloat($("temperature").value),
    };
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const data of sseEvents(resp.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const c of chunk.choices || []) {
        const piece = (c.delta && c.delta.content) || "";
        if (piece) {
          if (first === null) first = performance.now();
          reply += piece;
          out.textContent = reply;
          $("log").scrollTop = $("log").scrollHeight;
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
    history.push({ role: "assistant", content: reply });
    const secs = (performance.now() - t0) / 1000;
    meta.textContent = `${tokens} tokens · ${secs.toFixed(2)} s` +
      (first !== null ? ` · first token ${((first - t0) / 1000).toFixed(2)} s` : "") +
      (finish ? ` · ${finish}` : "");
    out.appendChild(meta);
    setStatus("done");
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: reply });
      setStatus("stopped");
    } else {
      history.pop();
      out.remove();
      addMessage("error", String(e.message || e));
      setStatus("error: " + (e.message || e));
    }
  } finally {
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => { history = []; $("log").innerHTML = ""; setStatus("new chat"); });
$("key").addEventListener("change", () => { localStorage.setItem("llmcore-key", $("key").value); loadModels(); });

(async () => {
  $("key").value = params.get("key") || localStorage.getItem("llmcore-key") || "";
  if (params.get("max_tokens")) $("max_tokens").value = params.get("max_tokens");
  if (params.get("temperature")) $("temperature").value = params.get("temperature");
  const ok = await loadModels();
  if (ok && params.get("prompt")) {
    $("prompt").value = params.get("prompt");
    if (params.get("send") === "1") { $("prompt").value = ""; await send(params.get("prompt")); }
  }
})();
</script>
</body>
</html>
"""
