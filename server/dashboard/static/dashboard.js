"use strict";
const TOKEN = new URLSearchParams(location.search).get("token");
const HEADERS = TOKEN ? {"Authorization": "Bearer " + TOKEN} : {};
if (TOKEN) document.getElementById("report").href = "report?token=" + encodeURIComponent(TOKEN);
let state = null, fetchedAt = 0, failures = 0;
const $ = (id) => document.getElementById(id);
// Rounds as a person reads them, as server.rounds.round_label (server/rounds.py) numbers them
// for the console and the report: the evaluation before any round (phase "initial", round -1)
// is "initial", and round_idx 0, 1, 2 (rows, the store, api/state) is shown as 1, 2, 3.
function roundLabel(idx, phase) {
  if (idx === null || idx === undefined) return "–";
  return phase === "initial" || idx < 0 ? "initial" : String(idx + 1);
}
function el(tag, text, cls, title) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  if (title) e.title = title;
  return e;
}
function fmtBytes(b, digits) {
  if (b === null || b === undefined) return "–";
  const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  while (Math.abs(b) >= 1000 && i < u.length - 1) { b /= 1000; i++; }
  return (i ? b.toFixed(digits ?? (b < 10 ? 2 : 1)) : Math.round(b)) + " " + u[i];
}
function fmtNum(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
function fmtSecs(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function serverNow() { return state.now + (Date.now() / 1000 - fetchedAt); }
function kv(parent, pairs) {
  parent.replaceChildren();
  for (const [k, v, cls] of pairs) {
    const s = el("span", k + " "); const b = el("b", v, cls); s.appendChild(b); parent.appendChild(s);
  }
}
function ingestionLabel(ing) {
  if (!ing) return "–";
  return ing.mode === "workers" ? ing.workers + " workers (MQTT 5)"
    : "coordinator (MQTT " + ing.protocol + ")";
}
function renderRound() {
  const r = state.round;
  if (!r) {
    $("round-title").textContent = state.phase === "finished" ? "run finished"
      : state.phase === "waiting for devices" ? "waiting for devices" : "between rounds";
    $("round-bar").style.width = "0";
    kv($("round-kv"), [["next round", state.next_round < state.rounds_total ? "round " + roundLabel(state.next_round) : "–"],
      ["rounds", state.rounds_total], ["devices needed", state.min_devices],
      ["online", state.counts.online], ["ingestion", ingestionLabel(state.ingestion)]]);
    return;
  }
  const left = r.deadline === null ? null : r.deadline - serverNow();
  const closing = (left !== null && left <= 0) || r.accepted >= r.expected;
  $("round-title").textContent = "round " + roundLabel(r.index) + " of " + state.rounds_total +
    (closing ? " (closing)" : "");
  $("round-bar").style.width = (r.participants ? 100 * r.answered / r.participants : 0) + "%";
  kv($("round-kv"), [["answered", r.answered + "/" + r.participants],
    ["accepted", r.accepted + " (waits for " + r.expected + ")"],
    ["rejected", r.refused], ["skipped", Object.keys(r.skipped || {}).length],
    ["late", r.late], ["deadline in", left === null ? "–" : fmtSecs(left)]]);
}
function battery(d) {
  if (d.battery_pct === null) return d.charging ? "on power" : "–";
  return Math.round(d.battery_pct) + " %" + (d.charging ? " (charging)" : "");
}
function thermal(d) {
  const td = el("td");
  if (d.temperature_c === null && !d.throttled) { td.textContent = "–"; return td; }
  const hot = d.temperature_c !== null && state.max_temperature_c && d.temperature_c >= state.max_temperature_c;
  const text = (d.temperature_c === null ? "" : d.temperature_c.toFixed(1) + " °C") +
    (d.throttled ? (d.temperature_c === null ? "" : ", ") + "throttled" : "");
  td.textContent = (hot ? "hot: " : "") + text;
  if (hot || d.throttled) td.className = "hot";
  return td;
}
function eligibility(d) {
  if (d.eligible === true) return el("td", "eligible", "eligible");
  if (d.eligible === false) {
    const why = d.reasons.length ? d.reasons.join("; ") : "not eligible";
    return el("td", "skip: " + why, "skip wrap", why);
  }
  const last = (state.last_skipped || {})[d.id];
  return last ? el("td", "skipped last round: " + last.join("; "), "skip wrap") : el("td", "–", "muted");
}
const MAX_ROWS = 300;  // a large fleet: the open round's participants and ineligible devices first
function renderFleet() {
  const body = $("fleet").tBodies[0];
  const rows = [];
  let shown = state.devices;
  if (shown.length > MAX_ROWS) {
    const rank = (d) => (d.this_round ? 0 : d.eligible === false ? 1 : d.status === "online" ? 2 : 3);
    shown = shown.map((d, i) => [rank(d), i, d]).sort((a, b) => a[0] - b[0] || a[1] - b[1])
      .slice(0, MAX_ROWS).map((x) => x[2]);
  }
  for (const d of shown) {
    const tr = el("tr"); if (d.status !== "online") tr.className = "offline";
    tr.dataset.device = d.id;
    tr.appendChild(el("td", d.id));
    tr.appendChild(el("td", d.class || "–", "wrap", d.emulated ? "emulated device profile" : ""));
    const st = el("td"); st.appendChild(el("span", d.status, "pill " + d.status,
      d.last_seen ? "last seen " + fmtSecs(serverNow() - d.last_seen) + " ago" : "")); tr.appendChild(st);
    const tc = el("td"); if (d.this_round) tc.appendChild(el("span", d.this_round, "pill " + d.this_round));
    else tc.textContent = state.round ? "not selected" : "–";
    tr.appendChild(tc);
    tr.appendChild(el("td", battery(d)));
    tr.appendChild(thermal(d));
    tr.appendChild(el("td", (d.budget === null ? "–" : d.budget) + (d.limit ? " (" + d.limit + ")" : ""),
      "", [d.reason, d.plan && d.plan !== d.reason ? "last round: " + d.plan : "",
            d.stopped_by ? "stopped by: " + d.stopped_by : ""].filter(Boolean).join("\n")));
    tr.appendChild(el("td", roundLabel(d.last_round), "num"));
    tr.appendChild(el("td", d.experts_sent === null ? "–" : d.experts_sent, "num"));
    tr.appendChild(el("td", fmtBytes(d.bytes), "num"));
    tr.appendChild(el("td", d.step_ms === null ? "–" : d.step_ms.toFixed(1) + " ms", "num"));
    tr.appendChild(eligibility(d));
    rows.push(tr);
  }
  if (!rows.length) { const tr = el("tr"); const td = el("td", "no device registered yet", "muted"); td.colSpan = 12; tr.appendChild(td); rows.push(tr); }
  if (shown.length < state.devices.length) {
    const tr = el("tr"); const td = el("td", "showing " + shown.length + " of " + state.devices.length +
      " devices (the open round's participants, then ineligible, then online ones); all of them: api/state", "muted");
    td.colSpan = 12; tr.appendChild(td); rows.push(tr);
  }
  body.replaceChildren(...rows);
  kv($("fleet-kv"), [["devices", state.counts.devices], ["online", state.counts.online, "eligible"],
    ["offline", state.counts.offline], ["eligible now", state.devices.filter(d => d.eligible === true).length],
    ["not eligible", state.devices.filter(d => d.eligible === false).length]]);
  const sk = Object.entries(state.last_skipped || {});
  $("skipped").replaceChildren(...(sk.length ? [el("span", "last round skipped: " +
    sk.map(([k, v]) => k + " (" + v.join("; ") + ")").join(", "), "skip")] : []));
}
const SVGNS = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function axes(svg, xs, lo, hi, fmt, pad, right) {
  const W = 440, H = 200, L = 58, R = right ? 44 : 10, T = 10, B = 26;
  svg.replaceChildren();
  const xmin = Math.min(...xs) - (pad || 0), xmax = Math.max(...xs) + (pad || 0);
  const sx = (x) => L + (xmax === xmin ? (W - L - R) / 2 : (x - xmin) / (xmax - xmin) * (W - L - R));
  const sy = (y) => H - B - (hi === lo ? 0.5 : (y - lo) / (hi - lo)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4, y = sy(v);
    svg.appendChild(svgEl("line", {x1: L, x2: W - R, y1: y, y2: y, stroke: "#e3e6ec"}));
    svg.appendChild(svgEl("text", {x: L - 4, y: y + 4, "text-anchor": "end"}, fmt(v)));
    if (right) svg.appendChild(svgEl("text", {x: W - R + 4, y: y + 4, fill: right.color},
                                     right.fmt(right.hi * i / 4)));
  }
  const step = Math.max(1, Math.ceil(xs.length / 10));
  xs.forEach((x, i) => { if (i % step === 0) svg.appendChild(svgEl("text",
    {x: sx(x), y: H - 8, "text-anchor": "middle"}, roundLabel(x))); });
  return {sx, sy, L, R, W, H, B};
}
function renderEval() {
  const rows = state.history.filter(h => h.accuracy !== undefined || h.loss !== undefined);
  const svg = $("eval-chart");
  if (!rows.length) { svg.replaceChildren(svgEl("text", {x: 220, y: 100, "text-anchor": "middle"}, "no evaluation yet")); $("eval-legend").replaceChildren(); return; }
  const xs = rows.map(h => h.round);
  const has = (k) => rows.some(h => h[k] !== undefined);
  const loss = rows.map(h => h.loss).filter(v => v !== undefined);
  const lmax = loss.length ? Math.max(...loss) * 1.05 || 1 : 1;
  // classification: accuracy on [0, 1], loss on the right axis; causal LM: loss on the left,
  // ROUGE-L on [0, 1] on the right. The right-axis series is scaled onto the left axis.
  const [left, right] = has("accuracy") ? ["accuracy", "loss"] : ["loss", "rougeL"];
  const hi = {accuracy: 1, loss: lmax, rougeL: 1};
  const color = {accuracy: "var(--acc)", loss: "var(--loss)", rougeL: "var(--acc)"};
  const twin = has(right) ? {hi: hi[right], fmt: (v) => v.toFixed(2), color: color[right]} : null;
  const a = axes(svg, xs, 0, hi[left], (v) => v.toFixed(2), 0, twin);
  const legend = [];
  for (const k of [left, right].filter(has)) {
    const scale = k === right ? hi[left] / hi[right] : 1;
    const pts = rows.filter(h => h[k] !== undefined).map(h => [a.sx(h.round), a.sy(h[k] * scale)]);
    svg.appendChild(svgEl("polyline", {points: pts.map(p => p.join(",")).join(" "), fill: "none", stroke: color[k], "stroke-width": 2}));
    for (const [x, y] of pts) svg.appendChild(svgEl("circle", {cx: x, cy: y, r: 3, fill: color[k]}));
    const last = rows.filter(h => h[k] !== undefined).slice(-1)[0][k];
    const s = el("span"); const i = el("i"); i.style.background = color[k]; s.appendChild(i);
    s.appendChild(document.createTextNode(k + " " + last.toFixed(4) + (k === right ? " (right axis)" : "")));
    legend.push(s);
  }
  $("eval-legend").replaceChildren(...legend);
}
function renderBytes() {
  const rows = state.history.filter(h => h.phase === "round");
  const svg = $("bytes-chart");
  if (!rows.length) { svg.replaceChildren(svgEl("text", {x: 220, y: 100, "text-anchor": "middle"}, "no round finished yet")); return; }
  const hi = Math.max(1, ...rows.map(h => Math.max(h.bytes_in || 0, h.bytes_out || 0)));
  const xs = rows.map(h => h.round);
  const a = axes(svg, xs, 0, hi * 1.05, (v) => fmtBytes(v, 1), 0.6);
  const bw = Math.max(2, Math.min(24, (a.W - a.L - a.R) / ((Math.max(...xs) - Math.min(...xs) + 1.2) * 2.4)));
  for (const h of rows) {
    const x = a.sx(h.round);
    for (const [k, dx, color] of [["bytes_in", -bw, "var(--in)"], ["bytes_out", 0, "var(--out)"]]) {
      const v = h[k] || 0, y = a.sy(v);
      const r = svgEl("rect", {x: x + dx, y: y, width: bw, height: Math.max(0, a.H - a.B - y), fill: color});
      r.appendChild(svgEl("title", {}, k.replace("_", " ") + " round " + roundLabel(h.round) + ": " + fmtBytes(v)));
      svg.appendChild(r);
    }
  }
}
function renderRounds() {
  const rows = state.history.slice().reverse().map(h => {
    const tr = el("tr");
    const initial = h.phase === "initial";
    tr.appendChild(el("td", roundLabel(h.round, h.phase)));
    tr.appendChild(el("td", fmtNum(h.accuracy, 4), "num"));
    tr.appendChild(el("td", fmtNum(h.loss, 4), "num"));
    tr.appendChild(el("td", fmtNum(h.perplexity, 2), "num"));
    tr.appendChild(el("td", fmtNum(h.rougeL, 4), "num"));
    tr.appendChild(el("td", initial ? "" : (h.accepted ?? "–"), "num"));
    tr.appendChild(el("td", initial ? "" : (h.participants ?? "–"), "num"));
    tr.appendChild(el("td", initial ? "" : fmtBytes(h.bytes_in), "num"));
    tr.appendChild(el("td", initial ? "" : fmtBytes(h.bytes_out), "num"));
    tr.appendChild(el("td", initial ? "" : fmtNum(h.round_s, 1), "num"));
    tr.appendChild(el("td", Object.keys(h.skipped || {}).join(", ")));
    return tr;
  });
  $("rounds").tBodies[0].replaceChildren(...rows);
}
// The "Experts trained" panel (server/dashboard/selection.py): which experts each device trained
// in the last closed round, as a grid (a row per device, a column per expert, grouped by layer),
// its overlap measures, and the recent rounds' measures as a sparkline. Text goes in through
// textContent and attribute values through setAttribute/dataset only.
function layerGroups(experts) {
  const groups = [];
  for (const e of experts) {
    const [layer, idx] = e.split(":");
    const last = groups[groups.length - 1];
    if (last && last.layer === layer) last.experts.push([e, idx]);
    else groups.push({layer, experts: [[e, idx]]});
  }
  return groups;
}
let selKey = null;  // the grid is rebuilt only when its round or its sets change
function renderSelectionGrid(sel) {
  const key = JSON.stringify([sel.round, sel.experts, sel.devices]);
  if (key === selKey) return;
  selKey = key;
  const groups = layerGroups(sel.experts);
  const top = el("tr"), sub = el("tr");
  const corner = el("th", "device"); corner.rowSpan = 2; top.appendChild(corner);
  for (const g of groups) {
    const th = el("th", "layer " + g.layer, "ls"); th.colSpan = g.experts.length; top.appendChild(th);
    g.experts.forEach(([e, idx], i) => sub.appendChild(el("th", idx, i ? "" : "ls", "expert " + e)));
  }
  const rows = Object.entries(sel.devices).map(([dev, ids]) => {
    const trained = new Set(ids);
    const tr = el("tr"); tr.dataset.device = dev;
    tr.appendChild(el("th", dev, "", dev + ": " + ids.length + " expert(s) shown"));
    for (const g of groups) {
      g.experts.forEach(([e], i) => tr.appendChild(el("td", null,
        [i ? "" : "ls", trained.has(e) ? "on" : ""].join(" ").trim(),
        dev + (trained.has(e) ? " trained " : " did not train ") + e)));
    }
    return tr;
  });
  $("sel-grid").tHead.replaceChildren(...(groups.length ? [top, sub] : []));
  $("sel-grid").tBodies[0].replaceChildren(...(groups.length ? rows : []));
}
const SEL_SERIES = [["jaccard", "Jaccard", "var(--acc)", (v) => v.toFixed(3)],
  ["coverage", "coverage", "var(--loss)", (v) => (100 * v).toFixed(1) + " %"],
  ["union", "experts trained", "var(--out)", (v) => String(v)]];
function renderSelectionSeries(series) {
  const svg = $("sel-chart");
  if (!series.length) { svg.replaceChildren(); $("sel-legend").replaceChildren(); return; }
  const W = 440, H = 90, L = 30, R = 10, T = 6, B = 18, n = series.length;
  const sx = (i) => L + (n === 1 ? (W - L - R) / 2 : i / (n - 1) * (W - L - R));
  const sy = (v) => H - B - v * (H - T - B);
  const umax = Math.max(1, ...series.map(p => p.union || 0));
  svg.replaceChildren();
  for (const v of [0, 1]) {
    svg.appendChild(svgEl("line", {x1: L, x2: W - R, y1: sy(v), y2: sy(v), stroke: "#e3e6ec"}));
    svg.appendChild(svgEl("text", {x: L - 4, y: sy(v) + 4, "text-anchor": "end"}, String(v)));
  }
  for (const i of n > 1 ? [0, n - 1] : [0]) {
    svg.appendChild(svgEl("text", {x: sx(i), y: H - 4, "text-anchor": "middle"}, roundLabel(series[i].round)));
  }
  const legend = [];
  for (const [k, name, color, fmt] of SEL_SERIES) {
    const scale = k === "union" ? 1 / umax : 1;
    let seg = [];
    const flush = () => {
      if (seg.length > 1) svg.appendChild(svgEl("polyline", {points: seg.join(" "), fill: "none", stroke: color, "stroke-width": 1.5}));
      seg = [];
    };
    series.forEach((p, i) => {
      if (p[k] === null || p[k] === undefined) { flush(); return; }
      const x = sx(i), y = sy(p[k] * scale); seg.push(x + "," + y);
      const c = svgEl("circle", {cx: x, cy: y, r: 2.5, fill: color});
      c.appendChild(svgEl("title", {}, name + ", round " + roundLabel(p.round) + ": " + fmt(p[k])));
      svg.appendChild(c);
    });
    flush();
    const s = el("span"); const i = el("i"); i.style.background = color; s.appendChild(i);
    s.appendChild(document.createTextNode(name + (k === "union" ? " (max " + umax + " = top)" : "")));
    legend.push(s);
  }
  $("sel-legend").replaceChildren(el("span", "last " + n + " round(s):"), ...legend);
}
function renderSelection() {
  const sel = state.selection;
  if (!sel) return;
  const m = sel.measures || {};
  const pct = (v) => (v === null || v === undefined) ? "–" : (100 * v).toFixed(1) + " %";
  kv($("sel-kv"), [["round", roundLabel(sel.round)], ["devices", m.clients ?? "–"],
    ["Jaccard", fmtNum(m.jaccard, 3)], ["overlap coef.", fmtNum(m.overlap_coef, 3)],
    ["experts trained", m.union ?? "–"], ["coverage", pct(m.coverage)]]);
  const notes = [];
  if (sel.round === null) notes.push("no round closed yet");
  else if (!sel.experts.length) notes.push("no device trained an expert in round " + roundLabel(sel.round));
  if (sel.devices_more) notes.push("showing " + Object.keys(sel.devices).length + " of " + sel.devices_total + " devices");
  if (sel.experts_more) notes.push(sel.experts_more + " more expert(s) not shown");
  $("sel-note").textContent = notes.join("; ");
  renderSelectionGrid(sel);
  renderSelectionSeries(sel.series || []);
}
function render() {
  if (!state) return;
  $("run").textContent = "run " + state.run_id;
  $("phase").textContent = state.phase + " · " + state.strategy;
  renderRound(); renderFleet(); renderSelection(); renderEval(); renderBytes();
  renderRounds();
}
async function poll() {
  try {
    const resp = await fetch("api/state", {headers: HEADERS, cache: "no-store"});
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    state = await resp.json(); fetchedAt = Date.now() / 1000; failures = 0;
    $("conn").textContent = "live"; $("conn").className = "sub";
    render();
  } catch (err) {
    failures++;
    $("conn").textContent = "connection lost (" + err.message + ")" +
      (state ? "; showing the state of " + new Date(fetchedAt * 1000).toLocaleTimeString() : "");
    $("conn").className = "sub lost";
  }
}
poll();
setInterval(poll, 1000);
setInterval(() => { if (state && state.round) renderRound(); }, 250);
