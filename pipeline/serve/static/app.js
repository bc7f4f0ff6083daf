// comp-serve page: upload a clip (POST /jobs), follow its progress (server-sent events), show the result.
// Plain browser JavaScript, no libraries: the page works without a network connection. Text from the clip or
// the client (file name, transcript, reasons) is only ever set with textContent, never parsed as HTML.
"use strict";

const STEP_NAMES = { decode: "decode", asr: "speech recognition", audio: "audio", text: "text",
                     visual: "faces", model: "model", utterances: "utterances", done: "done" };
const COLOURS = ["#2f6fdf", "#d9480f", "#2b8a3e", "#ae3ec9", "#e8590c", "#1098ad", "#5c940d", "#c2255c",
                 "#495057", "#f08c00"];
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

let labels = [];

async function loadModel() {
  try {
    const res = await fetch("/model");
    const info = await res.json();
    labels = info.labels || [];
    const run = (info.trained_on.metrics && info.trained_on.metrics.run) || "";
    $("model-line").textContent = `${info.task} model ${run}: ${labels.length} classes (${labels.join(", ")}); ` +
      `features ${info.trained_on.features}; checkpoint ${info.checkpoint}`;
    const lim = info.limits;
    $("limits-line").textContent = `Up to ${(lim.max_upload_bytes / 1048576).toFixed(0)} MB and ` +
      `${lim.max_duration_s} s per clip (${lim.max_timeline_duration_s} s with emotion over time).`;
    if (!info.timeline) {
      $("timeline").disabled = true;
      $("timeline").parentElement.title = "not available in this installation";
    }
  } catch (err) {
    $("model-line").textContent = "cannot read /model: " + err;
  }
}

function showError(message) {
  $("error").hidden = false;
  $("error").textContent = message;
}

function resetView(name) {
  $("error").hidden = true;
  $("result").hidden = true;
  $("timeline-result").hidden = true;
  $("status").hidden = false;
  $("filename").textContent = name;
  $("bar").value = 0;
  $("steps").replaceChildren();
}

function setStep(step, done, total) {
  $("bar").value = total ? done / total : 0;
  const list = $("steps");
  for (const li of list.children) { li.classList.remove("active"); li.classList.add("done"); }
  if (step === "done") return;
  let li = list.querySelector(`[data-step="${CSS.escape(step)}"]`);
  if (!li) {
    li = el("li", { "data-step": step }, STEP_NAMES[step] || step);
    list.append(li);
  }
  li.classList.remove("done");
  li.classList.add("active");
}

function upload(file, timeline) {
  // XMLHttpRequest rather than fetch: it reports the upload's own progress
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/jobs" + (timeline ? "?timeline=1" : ""));
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) { setStep("upload", e.loaded, e.total); }
    };
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (_) { body = { error: xhr.responseText }; }
      if (xhr.status === 202) resolve(body);
      else {
        const retry = xhr.getResponseHeader("Retry-After");
        reject(new Error(`${xhr.status}: ${body.error || "refused"}` + (retry ? ` (retry in ${retry} s)` : "")));
      }
    };
    xhr.onerror = () => reject(new Error("the upload failed (connection lost)"));
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

function follow(job) {
  return new Promise((resolve) => {
    const source = new EventSource(job.events);
    source.addEventListener("state", (e) => {
      const data = JSON.parse(e.data);
      if (data.state === "queued" && data.ahead) setStep(`queued (${data.ahead} ahead)`, 0, 1);
    });
    source.addEventListener("progress", (e) => {
      const p = JSON.parse(e.data);
      setStep(p.step, p.done, p.total);
    });
    const finish = () => { source.close(); resolve(); };
    source.addEventListener("done", finish);
    source.onerror = finish;  // the stream ended or broke: the job's own endpoint tells the outcome
  });
}

async function run(file) {
  resetView(file.name);
  const timeline = $("timeline").checked;
  try {
    const job = await upload(file, timeline);
    setStep("queued", 0, 1);
    await follow(job);
    let state = await (await fetch(job.result)).json();
    while (state.state === "queued" || state.state === "running") {  // events broke off early: poll
      await new Promise((r) => setTimeout(r, 500));
      state = await (await fetch(job.result)).json();
    }
    setStep("done", 1, 1);
    $("status-title").firstChild.textContent = "Processed ";
    if (state.result && state.kind === "timeline" && state.status < 400) showTimeline(state.result);
    else if (state.result && state.result.modalities) showClip(state);
    if (state.status >= 400) showError(`${state.status}: ${(state.result && state.result.error) || "failed"}`);
  } catch (err) {
    showError(err.message || String(err));
  }
}

function bars(container, probs, best) {
  container.replaceChildren();
  const names = Object.keys(probs).sort((a, b) => probs[b] - probs[a]);
  for (const name of names) {
    const row = el("div", { class: "row" + (name === best ? " best" : ""), "data-label": name });
    const track = el("div", { class: "track" });
    const fill = el("div", { class: "fill" });
    fill.style.width = (100 * probs[name]).toFixed(1) + "%";
    track.append(fill);
    row.append(el("span", { class: "name" }, name), track, el("span", { class: "p" }, probs[name].toFixed(3)));
    container.append(row);
  }
}

function showClip(state) {
  const r = state.result;
  $("result").hidden = false;
  const pred = r.prediction;
  if (pred && pred.label !== undefined) {
    $("label").textContent = pred.label;
    $("confidence").textContent = `p = ${pred.probs[pred.label].toFixed(2)}`;
    bars($("probs"), pred.probs, pred.label);
  } else if (pred && pred.value !== undefined) {
    $("label").textContent = pred.value.toFixed(3);
    $("confidence").textContent = "(regression)";
    $("probs").replaceChildren();
  } else {
    $("label").textContent = "not predicted";
    $("confidence").textContent = "";
    $("probs").replaceChildren();
  }
  const body = $("modalities").tBodies[0];
  body.replaceChildren();
  for (const [m, entry] of Object.entries(r.modalities)) {
    const tr = el("tr", { "data-modality": m });
    tr.append(el("td", {}, m), el("td", { class: entry.present ? "yes" : "no" }, entry.present ? "yes" : "no"),
              el("td", { class: "reason" }, entry.present ? "" : (entry.reason || "")));
    body.append(tr);
  }
  $("transcript").textContent = r.transcript || "(no transcript)";
  const faces = $("faces");
  faces.replaceChildren();
  for (const uri of state.faces || []) faces.append(el("img", { src: uri, alt: "face crop" }));
  const found = state.faces_found || 0;
  const visual = r.modalities.visual || {};
  $("faces-note").textContent = found === 0 ? "(no face found)" :
    `(${(state.faces || []).length} of ${found} crops shown` + (visual.present ? ")" : "; too few to be used)");
  const t = r.timings_ms || {};
  $("timings").textContent = `${r.duration_s ? r.duration_s.toFixed(1) + " s clip; " : ""}` +
    Object.entries(t).map(([k, v]) => `${k} ${Math.round(v)} ms`).join(", ");
}

function showTimeline(result) {
  $("timeline-result").hidden = false;
  const utts = result.utterances || [];
  const classes = labels.length ? labels :
    Array.from(new Set(utts.flatMap((u) => Object.keys((u.prediction && u.prediction.probs) || {}))));
  const duration = result.duration_s || (utts.length ? utts[utts.length - 1].end : 1) || 1;
  const context = result.context || {};
  $("timeline-note").textContent = `${utts.length} utterances over ${duration.toFixed(1)} s` +
    (context.used !== undefined ? (context.used ? ", conversation context used" : ", no conversation context") : "");
  const W = 860, H = 220, L = 36, B = 24, T = 8;
  const x = (s) => L + (W - L - 8) * (s / duration);
  const y = (p) => T + (H - T - B) * (1 - p);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "probability per class over time" });
  for (const u of utts) {
    chart.append(svg("rect", { x: x(u.start), y: T, width: Math.max(1, x(u.end) - x(u.start)), height: H - T - B,
                               fill: "#eef0f4" }));
    const missing = Object.entries(u.modalities || {}).filter(([, e]) => !e.present).map(([m]) => m);
    if (missing.length) {
      const mark = svg("text", { x: (x(u.start) + x(u.end)) / 2, y: H - B - 4, "text-anchor": "middle",
                                 "font-size": 11, fill: "#b3261e" });
      mark.textContent = "no " + missing.join("/");
      chart.append(mark);
    }
  }
  classes.forEach((name, k) => {
    const pts = utts.filter((u) => u.prediction && u.prediction.probs)
      .map((u) => `${x((u.start + u.end) / 2).toFixed(1)},${y(u.prediction.probs[name] || 0).toFixed(1)}`);
    if (pts.length) chart.append(svg("polyline", { points: pts.join(" "), fill: "none", "stroke-width": 2,
                                                    stroke: COLOURS[k % COLOURS.length] }));
  });
  for (const p of [0, 0.5, 1]) {
    const tick = svg("text", { x: 4, y: y(p) + 4, "font-size": 11, fill: "#677084" });
    tick.textContent = p.toFixed(1);
    chart.append(tick);
  }
  const axis = svg("text", { x: W - 8, y: H - 6, "text-anchor": "end", "font-size": 11, fill: "#677084" });
  axis.textContent = `${duration.toFixed(1)} s`;
  chart.append(axis);
  $("timeline-chart").replaceChildren(chart);
  $("timeline-legend").replaceChildren(...classes.map((name, k) => {
    const span = el("span", {}, name);
    const swatch = el("i");
    swatch.style.background = COLOURS[k % COLOURS.length];
    span.prepend(swatch);
    return span;
  }));
  const body = $("utterances").tBodies[0];
  body.replaceChildren();
  utts.forEach((u, i) => {
    const pred = u.prediction ? (u.prediction.label || (u.prediction.value ?? "").toString()) : "–";
    const missing = Object.entries(u.modalities || {}).filter(([, e]) => !e.present)
      .map(([m, e]) => `${m}: ${e.reason || "absent"}`).join("; ");
    const tr = el("tr");
    tr.append(el("td", {}, String(i + 1)), el("td", {}, u.start.toFixed(2)), el("td", {}, u.end.toFixed(2)),
              el("td", {}, pred), el("td", {}, missing), el("td", {}, u.transcript || ""));
    body.append(tr);
  });
}

function init() {
  loadModel();
  const drop = $("drop");
  $("file").addEventListener("change", () => { if ($("file").files.length) run($("file").files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) run(e.dataTransfer.files[0]);
  });
}

document.addEventListener("DOMContentLoaded", init);
