// tunelab UI: the live training chart, the playground's streaming chat, review shortcuts. No dependencies.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, parent) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

// --- the loss chart: training loss and validation loss by step ------------------------------------------
function drawChart(svg, series) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 900, H = 300, L = 60, R = 20, T = 15, B = 35;
  const all = series.flatMap(s => s.points);
  if (!all.length) {
    const t = el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#777"}, svg);
    t.textContent = "waiting for the first step...";
    return;
  }
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  let x0 = Math.min(...xs, 0), x1 = Math.max(...xs, 1), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const sx = x => L + (x - x0) / (x1 - x0 || 1) * (W - L - R);
  const sy = y => T + (y1 - y) / (y1 - y0) * (H - T - B);
  el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"}, svg);
  el("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"}, svg);
  for (const [v, y] of [[y1, T + 4], [y0, H - B]]) {
    const t = el("text", {x: L - 6, y: y, "text-anchor": "end", "font-size": 12}, svg);
    t.textContent = v.toFixed(3);
  }
  for (const [v, x] of [[x0, L], [x1, W - R]]) {
    const t = el("text", {x: x, y: H - B + 16, "text-anchor": "middle", "font-size": 12}, svg);
    t.textContent = "step " + v;
  }
  for (const s of series) {
    if (!s.points.length) continue;
    el("polyline", {points: s.points.map(p => sx(p[0]) + "," + sy(p[1])).join(" "), fill: "none",
                    stroke: s.color, "stroke-width": 2}, svg);
    for (const p of s.points) {
      const c = el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: s.color, class: "pt " + s.name}, svg);
      el("title", {}, c).textContent = s.name + " step " + p[0] + ": " + p[1];
    }
  }
}

function showJob(s) {
  const status = document.getElementById("job-status");
  status.textContent = s.status;
  status.className = "status " + s.status;
  document.getElementById("job-log").textContent = s.log;
  document.getElementById("stop").disabled = s.status !== "running";
  document.getElementById("resume").disabled = !s.can_resume;
  const svg = document.getElementById("chart");
  if (svg) {
    drawChart(svg, [{name: "loss", color: "#4c78a8", points: s.loss},
                    {name: "val_loss", color: "#f58518", points: s.val_loss}]);
    document.getElementById("points").textContent = s.loss.length + s.val_loss.length;
  }
}

function watchJob() {
  const data = document.getElementById("job-data");
  if (!data) return;
  let s = JSON.parse(data.textContent);
  showJob(s);
  let after = 0;  // one more read after the run stops, so its last rows show
  const tick = async () => {
    try {
      const r = await fetch(`/ui/api/jobs/${encodeURIComponent(s.id)}`, {credentials: "same-origin"});
      if (r.ok) {
        const was = s.status;
        s = await r.json();
        if (was === "running" && s.status !== "running") { location.reload(); return; }  // its results' links
        showJob(s);
      }
    } catch (e) { /* the UI restarted: keep trying */ }
    if (s.status === "running" || after++ < 1) setTimeout(tick, 1000);
  };
  setTimeout(tick, 1000);
}

// --- the playground: one streaming chat per chosen model, side by side -----------------------------------
async function streamInto(pane, body) {
  const out = pane.querySelector("pre"), badge = pane.querySelector(".badge");
  out.textContent = ""; badge.textContent = "generating..."; badge.className = "badge";
  const r = await fetch("/ui/api/chat", {method: "POST", credentials: "same-origin",
                                         headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  if (!r.ok) {
    const err = await r.json().catch(() => ({}));
    badge.textContent = "error"; badge.className = "badge bad";
    out.textContent = (err.error && err.error.message) || err.detail || r.statusText;
    return;
  }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", finish = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const chunk = JSON.parse(line.slice(6));
      if (chunk.error) { out.textContent += "\n[error] " + chunk.error.message; continue; }
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) out.textContent += c.delta.content;
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
  }
  let verdict = "done (" + (finish || "stop") + ")", cls = "badge";
  if (body.response_format) {
    try { JSON.parse(out.textContent); verdict = "valid JSON"; cls = "badge ok"; }
    catch (e) { verdict = "not valid JSON"; cls = "badge bad"; }
  }
  badge.textContent = verdict; badge.className = cls;
  pane.dataset.done = "1";
}

function playground() {
  const form = document.getElementById("chat-form");
  if (!form) return;
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    const f = new FormData(form);
    const models = f.getAll("models");
    const panes = document.getElementById("panes");
    panes.innerHTML = "";
    const messages = [];
    if (f.get("system")) messages.push({role: "system", content: f.get("system")});
    messages.push({role: "user", content: f.get("message")});
    let format = null;
    const schema = (f.get("schema") || "").trim();
    if (schema) {
      try { format = {type: "json_schema", json_schema: {name: "playground", schema: JSON.parse(schema)}}; }
      catch (e) { panes.textContent = "The JSON Schema box does not hold valid JSON: " + e.message; return; }
    }
    const jobs = models.map(m => {
      const pane = document.createElement("section");
      pane.className = "pane"; pane.dataset.model = m;
      pane.innerHTML = "<h3></h3><span class=badge></span><pre aria-live=polite></pre>";
      pane.querySelector("h3").textContent = m;
      panes.appendChild(pane);
      const body = {model: m, messages, stream: true, temperature: parseFloat(f.get("temperature") || "0"),
                    max_tokens: parseInt(f.get("max_tokens") || "128", 10)};
      if (f.get("seed")) body.seed = parseInt(f.get("seed"), 10);
      if (format) body.response_format = format;
      if (f.get("rag_index")) body.rag_index = f.get("rag_index");
      return streamInto(pane, body);
    });
    await Promise.all(jobs);
  });
}

// --- review: a / c / r choose accept, correct, reject on the focused item ---------------------------------
function reviewKeys() {
  document.addEventListener("keydown", ev => {
    const active = document.activeElement;
    if (["TEXTAREA", "SELECT"].includes(active.tagName) || (active.tagName === "INPUT" && active.type !== "radio")) return;
    const map = {a: "accept", c: "correct", r: "reject"};
    const verdict = map[ev.key];
    const form = active.closest("form.review") || document.querySelector("form.review");
    if (!verdict || !form) return;
    const radio = form.querySelector(`input[name=verdict][value=${verdict}]`);
    if (radio) { radio.checked = true; radio.focus(); ev.preventDefault(); }
  });
}

// --- forms keep what was typed across a reload (in this browser's localStorage; files excepted) -------------
function persistForms() {
  for (const form of document.querySelectorAll("form[data-keep]")) {
    const key = "tunelab-ui:" + form.dataset.keep;
    const saved = JSON.parse(localStorage.getItem(key) || "{}");
    for (const el of form.elements) {
      if (!el.name || el.type === "file" || el.type === "hidden" || !(el.name in saved)) continue;
      if (el.type === "checkbox") el.checked = saved[el.name].includes(el.value);
      else el.value = saved[el.name][0];
    }
    form.addEventListener("input", () => {
      const data = {};
      for (const el of form.elements) {
        if (!el.name || el.type === "file" || el.type === "hidden") continue;
        if (el.type === "checkbox") { (data[el.name] = data[el.name] || []); if (el.checked) data[el.name].push(el.value); }
        else data[el.name] = [el.value];
      }
      localStorage.setItem(key, JSON.stringify(data));
    });
  }
}

persistForms();
watchJob();
playground();
reviewKeys();
