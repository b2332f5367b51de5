"""The live dashboard of a running server: one self-contained page and a JSON state endpoint.

``dashboard_port`` in the server config turns it on (:class:`server.config.ServerConfig`). It
runs a stdlib :class:`http.server.ThreadingHTTPServer` in a daemon thread, so it needs nothing
beyond the server itself and the page works offline (inline CSS and JavaScript, no CDN):

* ``/``: the page; it polls ``/api/state`` every second and shows the fleet (device class,
  online/offline, battery, temperature, budget and what limited it, the last round it trained,
  experts and bytes it sent, its median step time, whether it is eligible or why it sits out),
  the open round's progress and deadline, and accuracy, loss and bytes per round.
* ``/api/state``: the latest snapshot as JSON.
* ``/report``: the full HTML report (:func:`server.report.write_report`), written on demand and
  again only when a round finished since.

Thread safety: the HTTP threads never touch the coordinator. The coordinator's own thread
builds a snapshot (plain data, serialized to JSON there) from its hooks -- between pumps while
it waits, at most every 0.5 s (less often when a large fleet makes a snapshot costly), and
always when a round opens or closes -- and the HTTP threads serve the last one under a lock.

With a token (required off loopback, see the config), every request must carry it, as
``?token=...`` or ``Authorization: Bearer ...``; the page passes it on to its own requests.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from hfedmoe.errors import ConfigError, HFedMoEError

log = logging.getLogger("hfedmoe.server")

MIN_INTERVAL_S = 0.5  # snapshots are built at most this often (round open/close: always)
MAX_SHARE = 0.05  # a costly snapshot is built less often: at most this share of the thread
HISTORY_ROWS = 1000  # metrics rows the page gets (the latest)


class Dashboard:
    """Serves the dashboard of ``coordinator``; :meth:`start` it on the coordinator's thread.

    Args:
        coordinator: the running :class:`server.coordinator.Coordinator`.
        host, port, token: override the config's ``dashboard_host``, ``dashboard_port`` and
            token (tests).
    """

    def __init__(self, coordinator: Any, host: str | None = None, port: int | None = None,
                 token: str | None = None) -> None:
        cfg = coordinator.cfg
        self.coordinator = coordinator
        self.host = cfg.dashboard_host if host is None else host
        self.port = cfg.dashboard_port if port is None else port
        self.token = cfg.dashboard_secret if token is None else token
        self.run_dir = Path(cfg.run_dir)
        self._lock = threading.Lock()
        self._state = b"{}"
        self._built = -math.inf
        self._interval = MIN_INTERVAL_S
        self._failures = 0
        self._history: list[dict[str, Any]] = []
        self._metrics_offset = 0
        self._latest: dict[str, dict[str, Any]] = {}  # device -> its latest participation row
        self._part_key: tuple[int, int, int] | None = None
        self._report_lock = threading.Lock()
        self._report_stamp: tuple[int, int] | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle (coordinator thread) -----------------------------------------------------
    def start(self) -> Dashboard:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_cls = type("_DashboardServer", (_Server,), {"address_family": family})
        try:
            self._httpd = server_cls((self.host.strip("[]"), self.port), _Handler)
        except OSError as exc:
            raise ConfigError(f"dashboard: cannot listen on {self.host}:{self.port}: "
                              f"{exc}") from exc
        self._httpd.dashboard = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        self.hook("start")
        self.coordinator.hooks.append(self.hook)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.25},
                                        name="hfedmoe-dashboard", daemon=True)
        self._thread.start()
        log.info("dashboard on %s%s", self.url, " (token required)" if self.token else "")
        print(f"dashboard: {self.url}", flush=True)
        return self

    @property
    def url(self) -> str:
        """The page's address (without the token)."""
        host = self.host.strip("[]")
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self.hook in self.coordinator.hooks:
            self.coordinator.hooks.remove(self.hook)
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # --- snapshots (coordinator thread) -----------------------------------------------------
    def hook(self, event: str) -> None:
        """The coordinator's hook: "tick" builds a snapshot when the last one is old enough;
        "start" and a round's "open" and "close" always build one."""
        if event not in ("start", "open", "close") \
                and time.monotonic() - self._built < self._interval:
            return
        try:
            if event == "start":
                for row in self.coordinator.store.participation():  # ordered by round
                    self._latest[row["client"]] = row
            elif event == "close":
                self._load_participation(self.coordinator.next_round - 1)
            self._build()
            self._failures = 0
        except Exception:  # noqa: BLE001 - the dashboard never stops a round
            self._failures += 1
            self._built = time.monotonic()
            if self._failures == 1:
                log.exception("dashboard: snapshot failed (the run goes on)")

    def _load_participation(self, round_idx: int) -> None:
        if round_idx >= 0:
            for row in self.coordinator.store.participation(round_idx):
                self._latest[row["client"]] = row

    def _build(self) -> None:
        t0 = time.perf_counter()
        state = self.snapshot()
        body = json.dumps(state, default=str, allow_nan=False).encode()
        with self._lock:
            self._state = body
        cost = time.perf_counter() - t0
        self._built = time.monotonic()
        self._interval = max(MIN_INTERVAL_S, cost / MAX_SHARE)

    def snapshot(self) -> dict[str, Any]:
        """The dashboard's state, JSON-ready (call on the coordinator's thread)."""
        c = self.coordinator
        cfg = c.cfg
        r = c.round
        if r is not None:
            key = (r.round_idx, len(r.accepted), len(r.refused))
            if key != self._part_key:  # updates came in: their participation rows too
                self._load_participation(r.round_idx)
                self._part_key = key
        self._read_metrics()
        eligibility = getattr(c, "eligibility", None)
        eligibility = eligibility if isinstance(eligibility, dict) else {}
        elig_cfg = getattr(cfg, "eligibility", None)
        max_temp = _num(getattr(elig_cfg, "max_temperature_c", None))
        skipped = {str(k): _strings(v) for k, v in (getattr(r, "skipped", None) or {}).items()}
        devices = c.store.devices()
        fleet = [self._device(name, info, eligibility.get(name), r, skipped)
                 for name, info in sorted(devices.items())]
        online = sum(d["status"] == "online" for d in fleet)
        total = cfg.rounds.rounds
        if r is not None:
            answered = (set(r.accepted) | set(r.refused)) & set(r.participants)
            round_state = {
                "index": r.round_idx, "participants": len(r.participants),
                "answered": len(answered), "accepted": len(r.accepted),
                "refused": len(set(r.refused) - set(r.accepted) - set(skipped)),
                "expected": r.expected,
                "rejected": r.rejected, "late": r.late, "deadline": _num(r.deadline),
                "started": _num(r.started), "skipped": skipped}
            phase = "round open"
        else:
            round_state = None
            phase = "finished" if c.next_round >= total else (
                "waiting for devices" if c.next_round == 0 else "between rounds")
        last = next((h for h in reversed(self._history) if h.get("phase") == "round"), None)
        return {
            "run_id": cfg.run_id, "now": _num(c.clock()), "phase": phase,
            "rounds_total": total, "next_round": c.next_round, "strategy": c.strategy.name,
            "min_devices": cfg.rounds.min_devices, "max_temperature_c": max_temp or None,
            "counts": {"devices": len(fleet), "online": online, "offline": len(fleet) - online},
            "round": round_state, "devices": fleet, "history": self._history[-HISTORY_ROWS:],
            "last_skipped": last.get("skipped", {}) if last else {},
            "report": "/report"}

    def _device(self, name: str, info: dict[str, Any], elig: Any, r: Any,
                skipped: dict[str, list[str]]) -> dict[str, Any]:
        rep = info.get("report") if isinstance(info.get("report"), dict) else {}
        el = elig if isinstance(elig, dict) else {}
        cond = el.get("conditions") if isinstance(el.get("conditions"), dict) else {}
        budget = rep.get("budget") if isinstance(rep.get("budget"), dict) else {}
        part = self._latest.get(name, {})
        lat = part.get("latency") if isinstance(part.get("latency"), dict) else {}
        step = lat.get("step") if isinstance(lat.get("step"), dict) else {}
        median = _num(step.get("median"))
        if rep.get("emulated"):
            device_class = _text(rep.get("source"))
        else:
            device_class = _text(rep.get("board")) or " ".join(
                _text(rep.get(k)) for k in ("platform", "cpu_model") if rep.get(k))

        def condition(key: str, fallback: str) -> Any:
            v = cond.get(key)
            return v if v is not None else rep.get(fallback)

        this_round = None
        if r is not None and name in r.participants:
            this_round = ("accepted" if name in r.accepted else "skipped" if name in skipped
                          else "rejected" if name in r.refused else "waiting")
        return {
            "id": name, "class": device_class or None, "emulated": bool(rep.get("emulated")),
            "status": _text(info.get("status")) or "unknown",
            "last_seen": _num(info.get("last_seen")),
            "battery_pct": _num(condition("battery_pct", "battery_percent")),
            "charging": _bool(condition("charging", "battery_plugged")),
            "temperature_c": _num(condition("temperature_c", "temperature_c")),
            "throttled": _bool(rep.get("throttled")),
            "metered": _bool(cond.get("metered")), "idle": _bool(cond.get("idle")),
            "budget": _num(info.get("budget")),
            # what limited the budget (memory, time, quota): the latest round's, else the
            # registration's; and how the round's plan used it
            "limit": _text(part.get("budget_limit") or budget.get("limit")
                           or part.get("limit")) or None,
            "reason": _text(budget.get("reason") or part.get("reason")) or None,
            "plan": _text(part.get("reason")) or None,
            "stopped_by": _text(part.get("stopped_by")) or None,
            "last_round": _num(part.get("round")),
            "experts_sent": _num(part.get("experts_sent")),
            "bytes": _num(part.get("bytes")), "steps": _num(part.get("steps")),
            "step_ms": None if median is None else round(1000 * median, 3),
            "eligible": _bool(el.get("eligible")), "reasons": _strings(el.get("reasons")),
            "eligibility_at": _num(el.get("at")),
            "this_round": this_round,
        }

    def _read_metrics(self) -> None:
        """New complete lines of metrics.jsonl, compacted for the charts."""
        path = self.run_dir / "metrics.jsonl"
        try:
            if path.stat().st_size <= self._metrics_offset:
                return
            with open(path, "rb") as fh:
                fh.seek(self._metrics_offset)
                data = fh.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self._metrics_offset += end
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                self._history.append(_compact(row))
        del self._history[:-HISTORY_ROWS]

    # --- HTTP side (HTTP threads) -----------------------------------------------------------
    def state_bytes(self) -> bytes:
        with self._lock:
            return self._state

    def authorized(self, header: str, query_tokens: list[str]) -> bool:
        """No token configured, or one of the request's tokens matches (constant time)."""
        if not self.token:
            return True
        want = self.token.encode()
        given = list(query_tokens)
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            given.append(value.strip())
        ok = False
        for candidate in given:
            ok |= hmac.compare_digest(candidate.encode(), want)
        return ok

    def report(self) -> tuple[int, bytes, str]:
        """(status, body, content type) of ``/report``: written when a round finished since
        the last one."""
        from server.report import write_report

        with self._report_lock:
            metrics = self.run_dir / "metrics.jsonl"
            out = self.run_dir / "report.html"
            try:
                st = metrics.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp != self._report_stamp or not out.exists():
                    write_report(self.run_dir)
                    self._report_stamp = stamp
                return 200, out.read_bytes(), "text/html; charset=utf-8"
            except FileNotFoundError:
                return 404, b"no report yet: no evaluation has finished", "text/plain"
            except (HFedMoEError, OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("dashboard: report failed: %s", exc)
                return 503, f"report failed: {type(exc).__name__}: {exc}".encode(), "text/plain"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: Dashboard


class _Handler(BaseHTTPRequestHandler):
    server_version = "hfedmoe-dashboard"
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        d = self.server.dashboard
        url = urlsplit(self.path)
        tokens = parse_qs(url.query).get("token", [])
        if not d.authorized(self.headers.get("Authorization", ""), tokens):
            self._send(401, b"401: this dashboard needs its token (?token=... or "
                            b"Authorization: Bearer ...)\n", "text/plain", head,
                       {"WWW-Authenticate": 'Bearer realm="hfedmoe"'})
            return
        if url.path in ("/", "/index.html"):
            self._send(200, PAGE.encode(), "text/html; charset=utf-8", head)
        elif url.path == "/api/state":
            self._send(200, d.state_bytes(), "application/json", head)
        elif url.path == "/report":
            self._send(*d.report(), head)
        else:
            self._send(404, b"not found\n", "text/plain", head)

    def _send(self, code: int, body: bytes, ctype: str, head: bool,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; img-src 'self' data:")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        # the path only: a query may carry the token
        log.debug("dashboard: %s %s %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("dashboard: " + format, *args)


# --- plain values ------------------------------------------------------------------------------
def _num(v: Any) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if math.isfinite(v) else None


def _bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def _text(v: Any, limit: int = 200) -> str:
    return "" if v is None else str(v)[:limit]


def _strings(v: Any) -> list[str]:
    return [_text(x) for x in v[:10]] if isinstance(v, (list, tuple)) else []


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"round": _num(row.get("round")), "phase": _text(row.get("phase"))}
    for k in ("time", "accuracy", "loss", "perplexity", "bytes_in", "bytes_out",
              "dense_bytes", "participants", "accepted", "rejected", "late", "round_s"):
        if _num(row.get(k)) is not None:
            out[k] = row[k]
    skipped = row.get("skipped")
    if isinstance(skipped, dict) and skipped:
        out["skipped"] = {_text(k): _strings(v) for k, v in list(skipped.items())[:200]}
    return out


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>HFedMoE live dashboard</title>
<style>
:root{--fg:#1d2330;--muted:#667085;--line:#e3e6ec;--bg:#f6f7f9;--card:#fff;--ok:#1a7f37;
--warn:#b54708;--bad:#c0262d;--acc:#2f6fd6;--loss:#d9480f;--in:#2f6fd6;--out:#8e9aaf}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg)}
header{display:flex;gap:16px;align-items:baseline;flex-wrap:wrap;padding:14px 22px;
background:#16202f;color:#fff}
header h1{font-size:18px;margin:0}
header .sub{color:#b9c3d3}
header a{color:#9cc3ff;margin-left:auto}
main{padding:16px 22px;display:grid;gap:16px;grid-template-columns:repeat(auto-fit,minmax(420px,1fr))}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 16px}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 10px}
.big{font-size:26px;font-weight:600}
.bar{height:10px;background:var(--line);border-radius:5px;overflow:hidden;margin:8px 0}
.bar>div{height:100%;background:var(--ok);width:0}
.kv{display:flex;gap:18px;flex-wrap:wrap;color:var(--muted)}
.kv b{color:var(--fg)}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 7px;border-bottom:1px solid var(--line);white-space:nowrap}
th{font-size:12px;color:var(--muted);font-weight:600}
td.num{font-variant-numeric:tabular-nums}
td.wrap{white-space:normal;min-width:110px;max-width:260px}
tr.offline td{color:#98a2b3}
.pill{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;background:#eef1f5}
.online{background:#dcfae6;color:var(--ok)}.offline{background:#f2f4f7;color:var(--muted)}
.eligible{color:var(--ok)}.skip{color:var(--warn)}.hot{color:var(--bad);font-weight:600}
.accepted{background:#dcfae6;color:var(--ok)}.waiting{background:#fef0c7;color:var(--warn)}
.rejected,.skipped{background:#fee4e2;color:var(--bad)}
.scroll{overflow-x:auto}
svg text{font-size:11px;fill:var(--muted)}
.legend span{margin-right:12px;color:var(--muted)}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
#conn.lost{color:#ffb4a8}
.muted{color:var(--muted)}
</style></head>
<body>
<header><h1>HFedMoE <span id="run">run</span></h1><span class="sub" id="phase">connecting…</span>
<span class="sub" id="conn"></span><a id="report" href="report">full report</a></header>
<main>
<section id="round-card"><h2>Current round</h2>
<div class="big" id="round-title">no round open</div>
<div class="bar"><div id="round-bar"></div></div>
<div class="kv" id="round-kv"></div></section>
<section><h2>Fleet</h2><div class="kv" id="fleet-kv"></div>
<div class="kv" id="skipped" style="margin-top:8px"></div></section>
<section class="wide"><h2>Devices</h2><div class="scroll"><table id="fleet">
<thead><tr><th>device</th><th>class</th><th>status</th><th>this round</th><th>battery</th>
<th>thermal</th><th>budget (limited by)</th><th>last round</th><th>experts sent</th>
<th>bytes</th><th>step median</th><th>eligibility</th></tr></thead>
<tbody></tbody></table></div></section>
<section><h2>Accuracy and loss per round</h2><div class="legend" id="eval-legend"></div>
<svg id="eval-chart" viewBox="0 0 440 200" width="100%" height="200"></svg></section>
<section><h2>Bytes per round</h2><div class="legend"><span><i style="background:var(--in)"></i>
updates in</span><span><i style="background:var(--out)"></i>model out</span></div>
<svg id="bytes-chart" viewBox="0 0 440 200" width="100%" height="200"></svg></section>
<section class="wide"><h2>Rounds</h2><div class="scroll"><table id="rounds">
<thead><tr><th>round</th><th>accuracy</th><th>loss</th><th>accepted</th><th>participants</th>
<th>bytes in</th><th>bytes out</th><th>seconds</th><th>skipped</th></tr></thead><tbody></tbody>
</table></div></section>
</main>
<script>
"use strict";
const TOKEN = new URLSearchParams(location.search).get("token");
const HEADERS = TOKEN ? {"Authorization": "Bearer " + TOKEN} : {};
if (TOKEN) document.getElementById("report").href = "report?token=" + encodeURIComponent(TOKEN);
let state = null, fetchedAt = 0, failures = 0;
const $ = (id) => document.getElementById(id);
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
function renderRound() {
  const r = state.round;
  if (!r) {
    $("round-title").textContent = state.phase === "finished" ? "run finished"
      : state.phase === "waiting for devices" ? "waiting for devices" : "between rounds";
    $("round-bar").style.width = "0";
    kv($("round-kv"), [["next round", state.next_round < state.rounds_total ? "round " + state.next_round : "–"],
      ["rounds", state.rounds_total], ["devices needed", state.min_devices],
      ["online", state.counts.online]]);
    return;
  }
  const left = r.deadline === null ? null : r.deadline - serverNow();
  const closing = (left !== null && left <= 0) || r.accepted >= r.expected;
  $("round-title").textContent = "round " + r.index + (closing ? " (closing)" : "");
  $("round-bar").style.width = (r.participants ? 100 * r.answered / r.participants : 0) + "%";
  kv($("round-kv"), [["answered", r.answered + "/" + r.participants],
    ["accepted", r.accepted + " (waits for " + r.expected + ")"],
    ["rejected", r.refused], ["skipped", Object.keys(r.skipped || {}).length],
    ["late", r.late], ["deadline in", left === null ? "–" : fmtSecs(left)],
    ["rounds in the run", state.rounds_total + " (0–" + (state.rounds_total - 1) + ")"]]);
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
    tr.appendChild(el("td", d.last_round === null ? "–" : d.last_round, "num"));
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
    {x: sx(x), y: H - 8, "text-anchor": "middle"}, x < 0 ? "init" : String(x))); });
  return {sx, sy, L, R, W, H, B};
}
function renderEval() {
  const rows = state.history.filter(h => h.accuracy !== undefined || h.loss !== undefined);
  const svg = $("eval-chart");
  if (!rows.length) { svg.replaceChildren(svgEl("text", {x: 220, y: 100, "text-anchor": "middle"}, "no evaluation yet")); $("eval-legend").replaceChildren(); return; }
  const xs = rows.map(h => h.round);
  const series = [["accuracy", "var(--acc)"], ["loss", "var(--loss)"]].filter(([k]) => rows.some(h => h[k] !== undefined));
  // accuracy on [0, 1]; loss scaled onto the same axis, its range in the legend
  const loss = rows.map(h => h.loss).filter(v => v !== undefined);
  const lmax = loss.length ? Math.max(...loss) * 1.05 || 1 : 1;
  const hasAcc = series.some(([k]) => k === "accuracy");
  const twin = hasAcc && loss.length ? {hi: lmax, fmt: (v) => v.toFixed(2), color: "var(--loss)"} : null;
  const a = axes(svg, xs, 0, hasAcc ? 1 : lmax, (v) => v.toFixed(2), 0, twin);
  const legend = [];
  for (const [k, color] of series) {
    const scale = (k === "loss" && hasAcc) ? 1 / lmax : 1;
    const pts = rows.filter(h => h[k] !== undefined).map(h => [a.sx(h.round), a.sy(h[k] * scale)]);
    svg.appendChild(svgEl("polyline", {points: pts.map(p => p.join(",")).join(" "), fill: "none", stroke: color, "stroke-width": 2}));
    for (const [x, y] of pts) svg.appendChild(svgEl("circle", {cx: x, cy: y, r: 3, fill: color}));
    const last = rows.filter(h => h[k] !== undefined).slice(-1)[0][k];
    const s = el("span"); const i = el("i"); i.style.background = color; s.appendChild(i);
    s.appendChild(document.createTextNode(k + " " + last.toFixed(4) + ((k === "loss" && hasAcc) ? " (right axis)" : "")));
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
      r.appendChild(svgEl("title", {}, k.replace("_", " ") + " round " + h.round + ": " + fmtBytes(v)));
      svg.appendChild(r);
    }
  }
}
function renderRounds() {
  const rows = state.history.slice().reverse().map(h => {
    const tr = el("tr");
    const initial = h.phase === "initial";
    tr.appendChild(el("td", initial ? "initial" : h.round));
    tr.appendChild(el("td", fmtNum(h.accuracy, 4), "num"));
    tr.appendChild(el("td", fmtNum(h.loss, 4), "num"));
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
function render() {
  if (!state) return;
  $("run").textContent = "run " + state.run_id;
  $("phase").textContent = state.phase + " · " + state.strategy;
  renderRound(); renderFleet(); renderEval(); renderBytes(); renderRounds();
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
</script>
</body></html>
"""

__all__ = ["Dashboard"]
