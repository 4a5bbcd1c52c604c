// Flywheel review page: plain JavaScript, no build step, no network beyond this service.
// Every value from the API is put into the page as text (never as HTML).
"use strict";

const API = "/v1/review";
const SVG = "http://www.w3.org/2000/svg";
const ERROR_TYPES = ["confident", "boundary", "novel", "suspect"];
const COLORS = ["#2456c9", "#c62828", "#1a7f37", "#6a1b9a", "#b26a00", "#00838f", "#5d4037"];
const state = { config: null, versions: [], busy: false };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

const $ = (sel) => document.querySelector(sel);
const num = (v, d = 3) => (v === null || v === undefined ? "—" : Number(v).toFixed(d));
const pct = (v) => (v === null || v === undefined ? "—" : (100 * v).toFixed(1) + " %");
const when = (iso) => (iso ? iso.replace("T", " ").slice(0, 16) : "");

async function getJSON(path) {
  const r = await fetch(path, { headers: { accept: "application/json" } });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.detail || `${r.status} ${r.statusText}`);
  return body;
}

function say(text, kind) {
  const m = $("#message");
  m.textContent = text;
  m.className = kind || "";
}

// ---- admin actions ------------------------------------------------------------------------

function token() { return $("#token").value.trim(); }
function actor() { return $("#actor").value.trim(); }

async function post(path, body) {
  if (!token()) throw new Error("enter the admin token first");
  const payload = { reason: body.reason };
  if (actor()) payload.by = actor();
  const r = await fetch(API + path, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer " + token() },
    body: JSON.stringify(payload),
  });
  const out = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(out.detail || `${r.status} ${r.statusText}`);
  return out;
}

async function act(what, run) {
  if (state.busy) return;
  state.busy = true;
  document.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  say(what + "…");
  try {
    const message = await run();
    say(message, "ok");
    await refresh();
  } catch (err) {
    say(`${what} failed: ${err.message}`, "error");
  } finally {
    state.busy = false;
    applyMode();
  }
}

function decide(version, kind, reasonInput) {
  const reason = reasonInput.value.trim();
  if (!reason) {
    say(`give a reason to ${kind} v${version}: it is recorded on the version`, "error");
    reasonInput.focus();
    return;
  }
  act(`${kind === "approve" ? "approving" : "rejecting"} v${version}`, async () => {
    const out = await post(`/versions/${encodeURIComponent(version)}/${kind}`, { reason });
    return kind === "approve"
      ? `approved v${out.approved}: now champion (was ${out.previous ? "v" + out.previous : "none"}), by ${out.by}`
      : `rejected v${out.rejected}, by ${out.by}; the champion stays`;
  });
}

function rollback() {
  const input = $("#rollback-reason");
  const reason = input.value.trim();
  if (!reason) {
    say("give a reason to roll back: it is recorded on the version", "error");
    input.focus();
    return;
  }
  act("rolling back", async () => {
    const out = await post("/rollback", { reason });
    input.value = "";
    return `rolled back from v${out.rolled_back} to v${out.champion}, by ${out.by}`;
  });
}

function applyMode() {
  const admin = state.config && state.config.admin_enabled;
  $("#admin-off").hidden = !!admin;
  $("#admin-form").hidden = !admin;
  const mode = $("#mode");
  mode.textContent = admin ? "admin actions on (token required)" : "read-only";
  mode.className = "badge " + (admin ? "admin" : "readonly");
  document.querySelectorAll(".admin-only, .admin-only *").forEach((n) => {
    if (n.tagName === "BUTTON" || n.tagName === "INPUT") n.disabled = !admin || state.busy;
  });
  document.querySelectorAll("button.approve, button.reject, input.reason").forEach((n) => {
    n.disabled = !admin || state.busy;
  });
}

// ---- versions -----------------------------------------------------------------------------

function gateCell(v) {
  const cls = v.gate_passed === true ? "pass" : v.gate_passed === false ? "fail" : "";
  const word = v.gate_passed === true ? "passed" : v.gate_passed === false ? "rejected" : "";
  const rest = (v.gate || "").replace(/^(passed|rejected):\s*/i, "");
  return el("td", { class: "gate", title: v.gate || "" },
    el("span", { class: cls, text: word }), word && rest ? ": " : "", rest);
}

function reviewText(r) {
  if (!r || !r.state) return "";
  return r.by ? `${r.state} by ${r.by}: ${r.reason || ""}` : r.state;
}

function accuracies(v) {
  const g = v.gate_numbers || {};
  const trusted = g.gate_trusted_candidate ?? v.holdout_accuracy ?? null;
  return { recent: g.gate_recent_candidate ?? null, trusted };
}

function renderVersions(doc) {
  state.versions = doc.versions;
  const body = $("#versions tbody");
  body.replaceChildren();
  for (const v of doc.versions) {
    const a = accuracies(v);
    const cls = v.champion ? "champion" : v.status === "pending review" ? "pending" : "";
    body.append(el("tr", { class: cls, "data-version": v.version },
      el("td", { text: "v" + v.version }),
      el("td", { text: v.champion ? "★ champion" : v.status }),
      el("td", { text: (v.source || "") +
        (v.tags && v.tags.fed_quarantined ? ` · quarantined: ${v.tags.fed_quarantined}` : ""),
        class: v.tags && v.tags.fed_quarantined ? "quarantined" : "" }),
      el("td", { text: v.parent_version ? "v" + v.parent_version : "—" }),
      el("td", { text: v.examples || "" }),
      el("td", { class: "num", text: v.epsilon || "" }),
      el("td", { class: "num", text: v.delta || "" }),
      el("td", { class: "num", text: num(a.recent) }),
      el("td", { class: "num", text: num(a.trusted) }),
      gateCell(v),
      el("td", { text: reviewText(v.review) }),
      el("td", { text: when(v.created_at) })));
  }
  const champ = doc.versions.find((v) => v.champion);
  const line = $("#champion-line");
  line.replaceChildren();
  if (champ) {
    line.append(el("strong", { text: `v${champ.version}` }),
      ` (${champ.source || "?"}, parent ${champ.parent_version ? "v" + champ.parent_version : "none"})`,
      champ.promoted_by ? ` — promoted by ${champ.promoted_by}: ${champ.promotion_reason || ""}` : "");
  } else {
    line.textContent = doc.champion ? `v${doc.champion}` : "no champion yet";
  }
  $("#versions-title").textContent =
    `Versions (${doc.versions.length} newest of ${doc.total}, newest first)`;
  drawTimeline(doc.versions.slice().reverse());
}

function frame(chart, w, h, pad, yMin, yMax, ticks, fmt) {
  chart.replaceChildren();
  chart.setAttribute("viewBox", `0 0 ${w} ${h}`);
  chart.setAttribute("preserveAspectRatio", "xMidYMid meet");
  const y = (v) => pad.t + (h - pad.t - pad.b) * (1 - (v - yMin) / (yMax - yMin || 1));
  for (const t of ticks) {
    chart.append(svg("line", { class: "axis", x1: pad.l, x2: w - pad.r, y1: y(t), y2: y(t) }));
    chart.append(svg("text", { x: 4, y: y(t) + 4 }, fmt(t)));
  }
  return y;
}

function drawTimeline(versions) {
  const chart = $("#timeline-chart");
  const w = 1000, h = 220, pad = { l: 40, r: 10, t: 10, b: 24 };
  const pts = versions.map((v) => ({ v, ...accuracies(v) }));
  const vals = pts.flatMap((p) => [p.recent, p.trusted]).filter((x) => x !== null);
  const lo = vals.length ? Math.max(0, Math.floor((Math.min(...vals) - 0.02) * 10) / 10) : 0;
  const y = frame(chart, w, h, pad, lo, 1, [lo, (lo + 1) / 2, 1], (t) => t.toFixed(2));
  if (!pts.length) return;
  const step = (w - pad.l - pad.r) / Math.max(1, pts.length);
  const x = (i) => pad.l + step * (i + 0.5);
  for (const [key, dash] of [["trusted", ""], ["recent", "4 3"]]) {
    const line = pts.map((p, i) => (p[key] === null ? null : `${x(i)},${y(p[key])}`))
      .filter(Boolean).join(" ");
    if (line) chart.append(svg("polyline", { points: line, fill: "none", stroke: "#98a2b3",
      "stroke-dasharray": dash }));
  }
  pts.forEach((p, i) => {
    const color = p.v.gate_passed === true ? "#1a7f37" : p.v.gate_passed === false ? "#c62828" : "#667085";
    const tip = `v${p.v.version} (${p.v.status}): ${p.v.gate || "no gate"}`;
    if (p.trusted !== null) {
      const dot = svg("circle", { cx: x(i), cy: y(p.trusted), r: 4, fill: color });
      dot.append(svg("title", {}, tip));
      chart.append(dot);
    }
    if (p.recent !== null) {
      const box = svg("rect", { x: x(i) - 3.5, y: y(p.recent) - 3.5, width: 7, height: 7, fill: color });
      box.append(svg("title", {}, tip));
      chart.append(box);
    }
    if (pts.length <= 40 || i % Math.ceil(pts.length / 40) === 0) {
      chart.append(svg("text", { x: x(i) - 8, y: h - 6 }, "v" + p.v.version));
    }
    if (p.v.champion) chart.append(svg("text", { x: x(i) - 5, y: pad.t + 10 }, "★"));
  });
}

// ---- pending ------------------------------------------------------------------------------

function renderPending(doc) {
  const body = $("#pending tbody");
  body.replaceChildren();
  $("#pending-empty").hidden = doc.pending.length > 0;
  $("#pending").hidden = doc.pending.length === 0;
  for (const v of doc.pending) {
    const g = v.gate_numbers || {};
    const reason = el("input", { type: "text", class: "reason", maxlength: 1000,
      placeholder: "reason (required)", "aria-label": `reason for v${v.version}` });
    body.append(el("tr", { class: "pending", "data-version": v.version },
      el("td", { text: "v" + v.version }),
      el("td", { text: v.parent_version ? "v" + v.parent_version : "—" }),
      el("td", { text: v.source || "" }),
      el("td", { text: v.examples || "" }),
      el("td", { class: "num", text: v.epsilon || "" }),
      el("td", { class: "num", text: `${num(g.gate_recent_candidate)} / ${num(g.gate_recent_champion)}` }),
      el("td", { class: "num", text: `${num(g.gate_trusted_candidate)} / ${num(g.gate_trusted_champion)}` }),
      el("td", { class: "gate", title: v.gate || "", text: v.gate || "" }),
      el("td", {}, reason, " ",
        el("button", { type: "button", class: "approve", "data-version": v.version,
          text: "Approve", onclick: () => decide(v.version, "approve", reason) }), " ",
        el("button", { type: "button", class: "reject", "data-version": v.version,
          text: "Reject", onclick: () => decide(v.version, "reject", reason) }))));
  }
}

// ---- feedback errors ----------------------------------------------------------------------

function renderErrors(doc) {
  const note = $("#errors-note");
  note.hidden = doc.available;
  note.textContent = doc.available ? "" : `No feedback data: ${doc.note}`;
  const body = $("#errors tbody");
  body.replaceChildren();
  for (const v of doc.versions) {
    const mix = el("div", { class: "mix", title: "" });
    const parts = [];
    for (const t of ERROR_TYPES) {
      const n = (v.error_types || {})[t] || 0;
      if (!n) continue;
      parts.push(`${t} ${n}`);
      const part = el("span", { class: "t-" + t });
      part.style.width = `${(100 * n) / v.corrections}%`;  // CSSOM: allowed by the page's CSP
      mix.append(part);
    }
    mix.title = parts.join(", ") || "no errors";
    body.append(el("tr", { "data-version": v.model_version },
      el("td", { text: "v" + v.model_version }),
      el("td", { class: "num", text: v.corrections }),
      el("td", { class: "num", text: pct(v.accuracy) }),
      el("td", {}, mix, el("span", { class: "muted", text: " " + (parts.join(", ") || "none") })),
      el("td", { text: (v.confusions || []).map((c) => `${c.predicted} → ${c.actual} ${c.count}`).join(", ") })));
  }
  const legend = $("#error-legend");
  legend.replaceChildren(...["correct", ...ERROR_TYPES].map((t) =>
    el("span", {}, el("i", { class: "t-" + t }), t)));
  drawAccuracy(doc.points || []);
}

function drawAccuracy(points) {
  const chart = $("#accuracy-chart");
  const w = 1000, h = 220, pad = { l: 40, r: 90, t: 10, b: 24 };
  const y = frame(chart, w, h, pad, 0, 1, [0, 0.5, 1], (t) => t.toFixed(1));
  const hours = [...new Set(points.map((p) => p.hour))].sort();
  if (!hours.length) {
    chart.append(svg("text", { x: w / 2 - 80, y: h / 2 }, "no corrections in this window"));
    return;
  }
  const step = (w - pad.l - pad.r) / Math.max(1, hours.length - 1 || 1);
  const x = (hour) => pad.l + (hours.length === 1 ? (w - pad.l - pad.r) / 2 : step * hours.indexOf(hour));
  const byVersion = {};
  for (const p of points) (byVersion[p.version] ||= []).push(p);
  Object.keys(byVersion).sort((a, b) => a - b).forEach((version, k) => {
    const color = COLORS[k % COLORS.length];
    const ps = byVersion[version].filter((p) => p.accuracy !== null);
    chart.append(svg("polyline", { points: ps.map((p) => `${x(p.hour)},${y(p.accuracy)}`).join(" "),
      fill: "none", stroke: color, "stroke-width": 2 }));
    for (const p of ps) {
      const dot = svg("circle", { cx: x(p.hour), cy: y(p.accuracy), r: 3, fill: color });
      dot.append(svg("title", {}, `v${version} ${when(p.hour)}: ${pct(p.accuracy)} of ${p.corrections}`));
      chart.append(dot);
    }
    chart.append(svg("text", { x: w - pad.r + 8, y: pad.t + 14 * (k + 1), fill: color }, "v" + version));
  });
  chart.append(svg("text", { x: pad.l, y: h - 6 }, when(hours[0])));
  chart.append(svg("text", { x: w - pad.r - 90, y: h - 6 }, when(hours[hours.length - 1])));
}

// ---- live monitoring ----------------------------------------------------------------------

const secs = (v) => (v === null || v === undefined ? "—"
  : v >= 86400 ? (v / 86400).toFixed(1) + " d" : v >= 3600 ? (v / 3600).toFixed(1) + " h"
  : v >= 60 ? (v / 60).toFixed(1) + " min" : v.toFixed(0) + " s");

function renderLive(doc) {
  const note = $("#live-note");
  note.hidden = doc.available;
  note.textContent = doc.available ? "" : `No live data: ${doc.note}`;
  const body = $("#live tbody");
  body.replaceChildren();
  const versions = doc.report ? doc.report.versions : [];
  for (const v of versions) {
    const ci = v.accuracy === null ? "—"
      : `${pct(v.accuracy)} [${pct(v.accuracy_low)}, ${pct(v.accuracy_high)}]`;
    const d = v.drift;
    const psi = d.max_psi === null ? "—" : `${num(d.max_psi)} ${d.max_feature} (${d.level})`;
    const roles = (v.served_as || []).filter((r) => r !== "answered");
    body.append(el("tr", { "data-version": v.version },
      el("td", { text: "v" + v.version + (roles.length ? ` (${roles.join(", ")})` : "") }),
      el("td", { class: "num", text: v.labelled }),
      el("td", { class: "num", text: ci }),
      el("td", { class: "num", text: num(v.cbpe_labelled) }),
      el("td", { class: "num", text: `${secs(v.label_delay.p50_s)} / ${secs(v.label_delay.p90_s)}` }),
      el("td", { class: "num", text: pct(v.unlabelled_share) }),
      el("td", { class: "num", text: pct(v.missing_share) }),
      el("td", { class: "num", text: num(v.cbpe_unlabelled) }),
      el("td", { text: psi })));
  }
  drawLive(doc.timeline ? doc.timeline.points : []);
}

function drawLive(points) {
  const chart = $("#live-chart");
  const w = 1000, h = 220, pad = { l: 40, r: 90, t: 10, b: 24 };
  const y = frame(chart, w, h, pad, 0, 1, [0, 0.5, 1], (t) => t.toFixed(1));
  const spans = [...new Set(points.map((p) => p.start))].sort();
  if (!spans.length) {
    chart.append(svg("text", { x: w / 2 - 80, y: h / 2 }, "no labels in this window"));
    return;
  }
  const step = (w - pad.l - pad.r) / Math.max(1, spans.length - 1);
  const x = (s) => pad.l + (spans.length === 1 ? (w - pad.l - pad.r) / 2 : step * spans.indexOf(s));
  const byVersion = {};
  for (const p of points) (byVersion[p.version] ||= []).push(p);
  Object.keys(byVersion).sort((a, b) => a - b).forEach((version, k) => {
    const color = COLORS[k % COLORS.length];
    const ps = byVersion[version];
    const band = ps.map((p) => `${x(p.start)},${y(p.accuracy_high)}`)
      .concat(ps.slice().reverse().map((p) => `${x(p.start)},${y(p.accuracy_low)}`));
    chart.append(svg("polygon", { points: band.join(" "), fill: color, opacity: 0.12 }));
    chart.append(svg("polyline", { points: ps.map((p) => `${x(p.start)},${y(p.accuracy)}`).join(" "),
      fill: "none", stroke: color, "stroke-width": 2 }));
    chart.append(svg("polyline", { points: ps.map((p) => `${x(p.start)},${y(p.cbpe)}`).join(" "),
      fill: "none", stroke: color, "stroke-width": 1.5, "stroke-dasharray": "5 4" }));
    for (const p of ps) {
      const dot = svg("circle", { cx: x(p.start), cy: y(p.accuracy), r: 3, fill: color });
      dot.append(svg("title", {}, `v${version} ${when(p.start)}: ${pct(p.accuracy)} ` +
        `[${pct(p.accuracy_low)}, ${pct(p.accuracy_high)}] of ${p.labelled}, CBPE ${num(p.cbpe)}`));
      chart.append(dot);
    }
    chart.append(svg("text", { x: w - pad.r + 8, y: pad.t + 14 * (k + 1), fill: color }, "v" + version));
  });
  chart.append(svg("text", { x: pad.l, y: h - 6 }, when(spans[0])));
  chart.append(svg("text", { x: w - pad.r - 90, y: h - 6 }, when(spans[spans.length - 1])));
}

// ---- privacy ------------------------------------------------------------------------------

function renderPrivacy(doc) {
  const chart = $("#privacy-chart");
  const w = 1000, h = 160, pad = { l: 40, r: 10, t: 10, b: 24 };
  const vs = doc.versions;
  const eps = vs.map((v) => v.epsilon_value).filter((e) => e !== null);
  const top = eps.length ? Math.max(...eps) : 1;
  const y = frame(chart, w, h, pad, 0, top, [0, top], (t) => t.toFixed(2));
  const step = (w - pad.l - pad.r) / Math.max(1, vs.length);
  vs.forEach((v, i) => {
    const x0 = pad.l + step * i + step * 0.15;
    if (v.epsilon_value !== null) {
      const bar = svg("rect", { x: x0, y: y(v.epsilon_value), width: step * 0.7,
        height: y(0) - y(v.epsilon_value), fill: "#6a1b9a", opacity: 0.6 });
      bar.append(svg("title", {}, `v${v.version}: ε=${v.epsilon}, δ=${v.delta}`));
      chart.append(bar);
    }
    if (vs.length <= 40 || i % Math.ceil(vs.length / 40) === 0) {
      chart.append(svg("text", { x: x0, y: h - 6 }, "v" + v.version));
    }
  });
  if (!eps.length) chart.append(svg("text", { x: w / 2 - 140, y: h / 2 }, "no version reports an ε (all trained on platform data)"));
  const ledger = $("#ledger");
  ledger.replaceChildren();
  const l = doc.ledger;
  const x = l.excluded;
  if (x && x.incoming_examples) {
    ledger.append(el("p", { id: "ledger-excluded", text: `Incoming data the privacy budget ` +
      `keeps out: ${x.excluded_examples} of ${x.incoming_examples} trainable examples ` +
      `(${(100 * x.excluded_share).toFixed(1)} %) — their privacy unit's budget is spent.` }));
  }
  if (!l.available || !(l.sources || []).length) {
    ledger.append(el("p", { class: "note", id: "ledger-missing",
      text: (l.available ? "" : "Per-source ε not available: ") + (l.note || "") }));
    return;
  }
  const rows = l.sources.map((s) => el("tr", {},
    el("td", { text: s.source }), el("td", { class: "num", text: num(s.epsilon) }),
    el("td", { class: "num", text: s.updates }), el("td", { class: "num", text: s.examples }),
    el("td", { text: (s.versions || []).map((v) => "v" + v).join(", ") })));
  ledger.append(el("table", { id: "ledger-sources" },
    el("thead", {}, el("tr", {}, ...["source", "ε spent (cumulative)", "updates", "examples",
      "versions"].map((t) => el("th", { text: t })))),
    el("tbody", {}, ...rows)));
}

// ---- loading ------------------------------------------------------------------------------

async function refresh() {
  const hours = $("#hours").value;
  const jobs = [
    getJSON(API + "/versions").then(renderVersions),
    getJSON(API + "/pending").then(renderPending),
    getJSON(API + "/errors?hours=" + encodeURIComponent(hours)).then(renderErrors),
    getJSON(API + "/privacy").then(renderPrivacy),
    getJSON(API + "/monitor?hours=" + encodeURIComponent(hours)).then(renderLive),
    getJSON("/v1/model").then((m) => {
      $("#serving").textContent = `serving v${m.version} (loaded ${when(m.loaded_at)})`;
    }).catch(() => { $("#serving").textContent = "no model loaded yet"; }),
  ];
  const results = await Promise.allSettled(jobs);
  const failed = results.filter((r) => r.status === "rejected");
  if (failed.length) say("could not load: " + failed.map((r) => r.reason.message).join("; "), "error");
  applyMode();
  document.body.dataset.loaded = "true";
}

async function start() {
  try {
    state.config = await getJSON(API + "/config");
  } catch (err) {
    say("could not reach the review API: " + err.message, "error");
    return;
  }
  $("#model-name").textContent = state.config.model_name;
  for (const id of ["token", "actor"]) {
    const input = document.getElementById(id);
    input.value = sessionStorage.getItem("flywheel." + id) || "";
    input.addEventListener("input", () => sessionStorage.setItem("flywheel." + id, input.value));
  }
  $("#admin-form").addEventListener("submit", (e) => e.preventDefault());
  $("#rollback").addEventListener("click", rollback);
  $("#hours").addEventListener("change", () => refresh());
  applyMode();
  await refresh();
}

document.addEventListener("DOMContentLoaded", start);
