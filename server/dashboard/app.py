"""The dashboard's state: snapshots built on the coordinator's thread, served by
:mod:`server.dashboard.handler` (the package docstring tells the whole)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import socket
import threading
import time
from pathlib import Path
from typing import Any

from hfedmoe.errors import ConfigError, HFedMoEError
from server.config import ingestion_mode
from server.dashboard.handler import DashboardServer, Handler
from server.dashboard.selection import ExpertsTrained

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
        self._experts = ExpertsTrained()  # the "Experts trained" panel, from the round rows
        self._latest: dict[str, dict[str, Any]] = {}  # device -> its latest participation row
        self._part_key: tuple[int, int, int] | None = None
        self._report_lock = threading.Lock()
        self._report_stamp: tuple[int, int] | None = None
        self._httpd: DashboardServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle (coordinator thread) -----------------------------------------------------
    def start(self) -> Dashboard:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_cls = type("_DashboardServer", (DashboardServer,), {"address_family": family})
        try:
            self._httpd = server_cls((self.host.strip("[]"), self.port), Handler)
        except OSError as exc:
            raise ConfigError(f"dashboard: cannot listen on {self.host}:{self.port}: "
                              f"{exc}") from exc
        self._httpd.dashboard = self
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
            "ingestion": ingestion_mode(cfg),
            "counts": {"devices": len(fleet), "online": online, "offline": len(fleet) - online},
            "round": round_state, "devices": fleet, "history": self._history[-HISTORY_ROWS:],
            "last_skipped": last.get("skipped", {}) if last else {},
            "selection": self._experts.state(), "report": "/report"}

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
                self._experts.add(row)
        del self._history[:-HISTORY_ROWS]

    # --- HTTP side (HTTP threads) -----------------------------------------------------------
    def state_bytes(self) -> bytes:
        with self._lock:
            return self._state

    def host_allowed(self, header: str | None) -> bool:
        """Whether a request's ``Host`` header names this dashboard: an IP literal (a browser
        sends one only to the address it connected to), ``localhost``, the bind address or a
        configured ``dashboard_hostnames`` entry. Any other name is a page whose DNS name was
        rebound to this address (DNS rebinding): refused, token or not. No header: refused."""
        name = host_name(header)
        if name is None:
            return False
        allowed = {"localhost", self.host.strip("[]").lower(),
                   *(h.lower() for h in self.coordinator.cfg.dashboard_hostnames)}
        if name in allowed:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

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
    for k in ("time", "accuracy", "loss", "perplexity", "rougeL", "bytes_in", "bytes_out",
              "dense_bytes", "participants", "accepted", "rejected", "late", "round_s"):
        if _num(row.get(k)) is not None:
            out[k] = row[k]
    skipped = row.get("skipped")
    if isinstance(skipped, dict) and skipped:
        out["skipped"] = {_text(k): _strings(v) for k, v in list(skipped.items())[:200]}
    return out


def host_name(header: str | None) -> str | None:
    """The host of a ``Host`` header, lowercased, without port, brackets or a final dot
    (None: absent or malformed)."""
    if not header or any(c.isspace() or c in "/@?#" for c in header.strip()):
        return None
    value = header.strip().lower()
    if value.startswith("["):  # [v6]:port
        end = value.find("]")
        rest = value[end + 1:]
        if end < 0 or (rest and not rest.startswith(":")):
            return None
        return value[1:end] or None
    if value.count(":") > 1:  # an unbracketed v6 literal is not a valid Host
        return None
    name = value.partition(":")[0].rstrip(".")
    return name or None
