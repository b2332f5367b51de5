"""Durable server state: SQLite (WAL) plus spooled update blobs and global checkpoints.

Layout of a run directory::

    run.db                         runs, rounds, devices, updates, rejections, checkpoints
    updates/r{round}/{client}.bin  accepted update blobs exactly as received (wire format)
    checkpoints/global_r{round}.safetensors

Write order is what makes a SIGKILL at any point harmless:

- an update blob is written to a temporary file, fsynced and renamed, *then* its row is
  committed, *then* the device is acknowledged; a device never resends an acknowledged update,
  and a row always points at a complete file;
- a checkpoint is written and renamed before the round is marked done, so the global model is
  either the previous checkpoint or the new one, never half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hfedmoe.errors import DiskFullError, StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, report TEXT NOT NULL, budget INTEGER NOT NULL,
    status TEXT NOT NULL, registered_at REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round_idx INTEGER PRIMARY KEY, state TEXT NOT NULL, started_at REAL NOT NULL,
    deadline REAL NOT NULL, participants TEXT NOT NULL, base_hash TEXT NOT NULL,
    new_hash TEXT, metrics TEXT);
CREATE TABLE IF NOT EXISTS updates (
    round_idx INTEGER NOT NULL, client_id TEXT NOT NULL, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, num_bytes INTEGER NOT NULL, num_examples INTEGER NOT NULL,
    late INTEGER NOT NULL DEFAULT 0, accepted_at REAL NOT NULL,
    PRIMARY KEY (round_idx, client_id));
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round_idx INTEGER, client_id TEXT NOT NULL,
    error TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS participation (
    round_idx INTEGER NOT NULL, client_id TEXT NOT NULL, budget INTEGER NOT NULL,
    experts_sent INTEGER NOT NULL, optimizer_experts INTEGER NOT NULL, info TEXT NOT NULL,
    PRIMARY KEY (round_idx, client_id));
CREATE TABLE IF NOT EXISTS skips (
    round_idx INTEGER, client_id TEXT NOT NULL, reasons TEXT NOT NULL,
    conditions TEXT NOT NULL, during_round INTEGER NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (round_idx, client_id));
CREATE TABLE IF NOT EXISTS checkpoints (
    round_idx INTEGER PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT NOT NULL,
    created_at REAL NOT NULL);
"""


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def state_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                ) -> bytes:
    """A canonical state as safetensors bytes (sorted keys, contiguous CPU tensors)."""
    tensors = {k: state[k].detach().contiguous().cpu() for k in sorted(state)}
    return st_save(tensors, metadata=dict(metadata or {}))


@dataclass(frozen=True)
class StoredUpdate:
    round_idx: int
    client_id: str
    path: Path
    sha256: str
    num_bytes: int
    num_examples: int
    late: bool


class Store:
    """The run directory's durable state; one writer (the coordinator) at a time."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        (self.run_dir / "updates").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        try:
            # ingest workers write to the same database: wait for each other's locks
            self.db = sqlite3.connect(self.run_dir / "run.db", isolation_level=None,
                                      check_same_thread=False, timeout=60.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            rows = self.db.execute("SELECT device_id, report, budget, status, last_seen "
                                   "FROM devices").fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.run_dir / 'run.db'}: {exc}") from exc
        # the device registry, mirrored in memory: the coordinator reads it on every message,
        # and parsing thousands of reports per read does not scale (writes go to both)
        self._devices: dict[str, dict[str, Any]] = {
            r[0]: {"report": json.loads(r[1]), "budget": r[2], "status": r[3], "last_seen": r[4]}
            for r in rows}

    def close(self) -> None:
        self.db.close()

    # --- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # --- devices ---------------------------------------------------------------------------
    def upsert_device(self, device_id: str, report: Mapping[str, Any], budget: int,
                      status: str = "online", now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.db.execute(
            "INSERT INTO devices(device_id, report, budget, status, registered_at, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
            "report=excluded.report, budget=excluded.budget, status=excluded.status, "
            "last_seen=excluded.last_seen",
            (device_id, json.dumps(report), budget, status, now, now))
        self._devices[device_id] = {"report": json.loads(json.dumps(report)), "budget": budget,
                                    "status": status, "last_seen": now}

    def upsert_devices(self, rows: Sequence[tuple[str, Mapping[str, Any], int]],
                       status: str = "online", now: float | None = None) -> None:
        """:meth:`upsert_device` for many devices in one transaction (one fsync): how the
        coordinator takes a burst of registrations."""
        with self.transaction():
            for device_id, report, budget in rows:
                self.upsert_device(device_id, report, budget, status, now)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Statements inside commit together (or not at all)."""
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            self._devices = {}  # re-read below: the rolled-back writes reached the mirror
            self._reload_devices()
            raise
        self.db.execute("COMMIT")

    def _reload_devices(self) -> None:
        rows = self.db.execute("SELECT device_id, report, budget, status, last_seen FROM devices")
        self._devices = {r[0]: {"report": json.loads(r[1]), "budget": r[2], "status": r[3],
                                "last_seen": r[4]} for r in rows}

    def refresh_device(self, device_id: str) -> None:
        """Re-read one device's row (another process, the coordinator, writes the registry)."""
        row = self.db.execute("SELECT report, budget, status, last_seen FROM devices "
                              "WHERE device_id=?", (device_id,)).fetchone()
        if row is None:
            self._devices.pop(device_id, None)
        else:
            self._devices[device_id] = {"report": json.loads(row[0]), "budget": row[1],
                                        "status": row[2], "last_seen": row[3]}

    def set_device_status(self, device_id: str, status: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.db.execute("UPDATE devices SET status=?, last_seen=? WHERE device_id=?",
                        (status, now, device_id))
        info = self._devices.get(device_id)
        if info is not None:
            info["status"], info["last_seen"] = status, now

    def devices(self) -> Mapping[str, dict[str, Any]]:
        """device id -> report, budget, status, last_seen (read-only; from memory)."""
        return MappingProxyType(self._devices)

    # --- rounds ----------------------------------------------------------------------------
    def open_round(self, round_idx: int, deadline: float, participants: list[str],
                   base_hash: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO rounds(round_idx, state, started_at, deadline, "
                        "participants, base_hash) VALUES (?, 'open', ?, ?, ?, ?)",
                        (round_idx, time.time(), deadline, json.dumps(participants), base_hash))

    def set_round_state(self, round_idx: int, state: str) -> None:
        self.db.execute("UPDATE rounds SET state=? WHERE round_idx=?", (state, round_idx))

    def round_info(self, round_idx: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT state, started_at, deadline, participants, base_hash, "
                              "new_hash, metrics FROM rounds WHERE round_idx=?",
                              (round_idx,)).fetchone()
        if row is None:
            return None
        return {"state": row[0], "started_at": row[1], "deadline": row[2],
                "participants": json.loads(row[3]), "base_hash": row[4], "new_hash": row[5],
                "metrics": json.loads(row[6]) if row[6] else None}

    def last_round(self) -> int | None:
        row = self.db.execute("SELECT MAX(round_idx) FROM rounds").fetchone()
        return row[0]

    # --- updates ---------------------------------------------------------------------------
    def spool_update(self, round_idx: int, client_id: str, blob: bytes, num_examples: int,
                     late: bool = False) -> StoredUpdate:
        """Persist an accepted update (file, then row); idempotent per (round, client)."""
        existing = self.update(round_idx, client_id)
        if existing is not None:
            return existing
        folder = self.run_dir / "updates" / f"r{round_idx}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{client_id}.bin"
        _fsync_write(path, blob)
        digest = hashlib.sha256(blob).hexdigest()
        self.db.execute("INSERT INTO updates(round_idx, client_id, path, sha256, num_bytes, "
                        "num_examples, late, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (round_idx, client_id, str(path.relative_to(self.run_dir)), digest,
                         len(blob), num_examples, int(late), time.time()))
        return StoredUpdate(round_idx, client_id, path, digest, len(blob), num_examples, late)

    def update(self, round_idx: int, client_id: str) -> StoredUpdate | None:
        row = self.db.execute("SELECT path, sha256, num_bytes, num_examples, late FROM updates "
                              "WHERE round_idx=? AND client_id=?",
                              (round_idx, client_id)).fetchone()
        if row is None:
            return None
        return StoredUpdate(round_idx, client_id, self.run_dir / row[0], row[1], row[2], row[3],
                            bool(row[4]))

    def updates(self, round_idx: int) -> list[StoredUpdate]:
        rows = self.db.execute("SELECT client_id FROM updates WHERE round_idx=? "
                               "ORDER BY accepted_at, client_id", (round_idx,)).fetchall()
        return [u for (c,) in rows if (u := self.update(round_idx, c)) is not None]

    def read_update(self, stored: StoredUpdate) -> bytes:
        data = stored.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != stored.sha256:
            raise StoreError(f"{stored.path}: content does not match its recorded sha256")
        return data

    def record_participation(self, round_idx: int, client_id: str, budget: int,
                             experts_sent: int, optimizer_experts: int,
                             info: dict[str, Any]) -> None:
        """Per device and round: its registered budget, the experts it sent and the experts
        that held optimizer state (as the device reports), plus the plan's facts."""
        self.db.execute("INSERT OR REPLACE INTO participation VALUES (?, ?, ?, ?, ?, ?)",
                        (round_idx, client_id, budget, experts_sent, optimizer_experts,
                         json.dumps(info, default=str)))

    def participation(self, round_idx: int | None = None) -> list[dict[str, Any]]:
        q = ("SELECT round_idx, client_id, budget, experts_sent, optimizer_experts, info "
             "FROM participation")
        rows = (self.db.execute(q + " WHERE round_idx=? ORDER BY client_id", (round_idx,))
                if round_idx is not None else self.db.execute(q + " ORDER BY round_idx, client_id"))
        return [{"round": r[0], "client": r[1], "budget": r[2], "experts_sent": r[3],
                 "optimizer_experts": r[4], **json.loads(r[5])} for r in rows]

    def reject(self, round_idx: int | None, client_id: str, error: str, reason: str) -> None:
        self.db.execute("INSERT INTO rejections(round_idx, client_id, error, reason, at) "
                        "VALUES (?, ?, ?, ?, ?)", (round_idx, client_id, error, reason,
                                                   time.time()))

    def record_skip(self, round_idx: int | None, client_id: str, reasons: list[str],
                    conditions: Mapping[str, Any], during_round: bool = False) -> None:
        """A device sat a round out (its conditions broke the eligibility rules)."""
        self.db.execute("INSERT OR REPLACE INTO skips VALUES (?, ?, ?, ?, ?, ?)",
                        (round_idx, client_id, json.dumps(reasons), json.dumps(conditions),
                         int(during_round), time.time()))

    def skips(self, round_idx: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT round_idx, client_id, reasons, conditions, during_round FROM skips"
        rows = (self.db.execute(q + " WHERE round_idx=? ORDER BY client_id", (round_idx,))
                if round_idx is not None else self.db.execute(q + " ORDER BY round_idx, client_id"))
        return [{"round": r[0], "client": r[1], "reasons": json.loads(r[2]),
                 "conditions": json.loads(r[3]), "during_round": bool(r[4])} for r in rows]

    def rejections(self, round_idx: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT round_idx, client_id, error, reason FROM rejections"
        rows = (self.db.execute(q + " WHERE round_idx=?", (round_idx,)) if round_idx is not None
                else self.db.execute(q))
        return [{"round": r[0], "client": r[1], "error": r[2], "reason": r[3]} for r in rows]

    # --- retention -------------------------------------------------------------------------
    def size_bytes(self) -> int:
        """Bytes the run directory holds on disk."""
        return sum(p.stat().st_size for p in self.run_dir.rglob("*") if p.is_file())

    def check_room(self, nbytes: int, min_free_bytes: int, max_run_dir_bytes: int) -> None:
        """Raise :class:`DiskFullError` unless ``nbytes`` more leave ``min_free_bytes`` free
        on the disk and keep the run directory within ``max_run_dir_bytes`` (0: no quota)."""
        free = shutil.disk_usage(self.run_dir).free
        if free - nbytes < min_free_bytes:
            raise DiskFullError(f"{self.run_dir}: {free / 2**20:.0f} MiB free; storing "
                                f"{nbytes / 2**20:.1f} MiB more would leave less than "
                                f"{min_free_bytes / 2**20:.0f} MiB")
        if max_run_dir_bytes:
            used = self.size_bytes()
            if used + nbytes > max_run_dir_bytes:
                raise DiskFullError(f"{self.run_dir}: {used / 2**20:.1f} MiB used; storing "
                                    f"{nbytes / 2**20:.1f} MiB more would pass the run "
                                    f"directory's quota of {max_run_dir_bytes / 2**20:.0f} MiB")

    def prune(self, done_round: int, keep_updates: bool, keep_checkpoints: int,
              keep_best: bool) -> int:
        """Free what a durable round no longer needs; returns the bytes freed.

        Call after :meth:`save_checkpoint` of ``done_round``: the spooled updates of rounds up
        to it are folded into that checkpoint (resume only reads an interrupted round's
        updates), so their files go unless ``keep_updates``; checkpoints other than the last
        ``keep_checkpoints`` and (``keep_best``) the one with the best held-out accuracy (or
        lowest loss) go with their rows.
        """
        freed = 0
        if not keep_updates:
            for folder in (self.run_dir / "updates").glob("r*"):
                if folder.name[1:].isdigit() and int(folder.name[1:]) <= done_round:
                    freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                    shutil.rmtree(folder, ignore_errors=True)
        rows = self.db.execute("SELECT c.round_idx, c.path, r.metrics FROM checkpoints c "
                               "LEFT JOIN rounds r ON r.round_idx = c.round_idx "
                               "ORDER BY c.round_idx").fetchall()
        keep = {r[0] for r in rows[-max(keep_checkpoints, 1):]}
        if keep_best:
            scored = [(r[0], json.loads(r[2]) if r[2] else {}) for r in rows]
            ranked = [(m["accuracy"], k) for k, m in scored
                      if isinstance(m.get("accuracy"), (int, float))]
            ranked = ranked or [(-m["loss"], k) for k, m in scored
                                if isinstance(m.get("loss"), (int, float))]
            if ranked:
                keep.add(max(ranked)[1])
        for round_idx, path, _ in rows:
            if round_idx in keep:
                continue
            file = self.run_dir / path
            freed += file.stat().st_size if file.exists() else 0
            file.unlink(missing_ok=True)
            self.db.execute("DELETE FROM checkpoints WHERE round_idx=?", (round_idx,))
        return freed

    # --- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, round_idx: int, state: Mapping[str, torch.Tensor],
                        metrics: Mapping[str, Any], state_hash: str) -> Path:
        """Write the global model after ``round_idx`` and mark the round done, atomically."""
        path = self.run_dir / "checkpoints" / f"global_r{round_idx}.safetensors"
        blob = state_bytes(state, {"round": str(round_idx), "state_hash": state_hash})
        _fsync_write(path, blob)
        digest = hashlib.sha256(blob).hexdigest()
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO checkpoints(round_idx, path, sha256, "
                            "created_at) VALUES (?, ?, ?, ?)",
                            (round_idx, str(path.relative_to(self.run_dir)), digest, time.time()))
            self.db.execute("UPDATE rounds SET state='done', new_hash=?, metrics=? "
                            "WHERE round_idx=?", (state_hash, json.dumps(dict(metrics)),
                                                  round_idx))
        return path

    def latest_checkpoint(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        row = self.db.execute("SELECT round_idx, path, sha256 FROM checkpoints "
                              "ORDER BY round_idx DESC LIMIT 1").fetchone()
        if row is None:
            return None
        data = (self.run_dir / row[1]).read_bytes()
        if hashlib.sha256(data).hexdigest() != row[2]:
            raise StoreError(f"{row[1]}: checkpoint does not match its recorded sha256")
        return row[0], dict(st_load(data))

    def _tx(self) -> Iterator[None]:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
