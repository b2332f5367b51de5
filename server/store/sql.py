"""The queries both stores share: registry, rounds, updates, participation, skips, rejections,
checkpoints, written once in the SQL that SQLite and PostgreSQL both speak (``?``
placeholders, ``INSERT ... ON CONFLICT ... DO UPDATE``).

A backend (:class:`server.store.sqlite.SQLiteStore`, :class:`server.store.postgres.PostgresStore`)
supplies :meth:`SqlStore._run` (one statement, its rows; StoreError on any database error) and
:meth:`SqlStore._atomic` (statements inside commit together). Write order is what makes a
SIGKILL at any point harmless (see :mod:`server.store.files`):

- an update blob is written (temporary file, fsync, rename) *then* its row is committed,
  *then* the device is acknowledged; a device never resends an acknowledged update, and a row
  always points at a complete file;
- a checkpoint is written and renamed before the round is marked done, so the global model is
  either the previous checkpoint or the new one, never half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load as st_load

from server.store import files
from server.store.files import StoredUpdate

_DEVICE_COLS = "device_id, report, budget, status, last_seen"


class SqlStore:
    """A run's durable state: rows in a database, blobs as files under ``spool_dir``."""

    def __init__(self, run_dir: str | Path, spool_dir: str | Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.spool_dir = Path(spool_dir) if spool_dir else self.run_dir
        for d in (self.run_dir, self.spool_dir / "updates", self.spool_dir / "checkpoints"):
            d.mkdir(parents=True, exist_ok=True)
        # the device registry, mirrored in memory: the coordinator reads it on every message,
        # and parsing thousands of reports per read does not scale (writes go to both)
        self._devices: dict[str, dict[str, Any]] = {}
        self._undo: list[tuple[str, dict[str, Any] | None]] | None = None

    # --- what a backend supplies -----------------------------------------------------------
    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _atomic(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self._run(sql, params)
        return rows[0] if rows else None

    # --- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key=?", (key,))
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._run("INSERT INTO meta(key, value) VALUES (?, ?) "
                  "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # --- devices ---------------------------------------------------------------------------
    def upsert_device(self, device_id: str, report: Mapping[str, Any], budget: int,
                      status: str = "online", now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._run(
            "INSERT INTO devices(device_id, report, budget, status, registered_at, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
            "report=excluded.report, budget=excluded.budget, status=excluded.status, "
            "last_seen=excluded.last_seen",
            (device_id, json.dumps(report), budget, status, now, now))
        if self._undo is not None:
            self._undo.append((device_id, self._devices.get(device_id)))
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
        """Statements inside commit together (or not at all; the registry's memory mirror
        forgets the devices written inside, too)."""
        self._undo = []
        try:
            with self._atomic():
                yield
        except BaseException:
            for device_id, before in reversed(self._undo):
                if before is None:
                    self._devices.pop(device_id, None)
                else:
                    self._devices[device_id] = before
            raise
        finally:
            self._undo = None

    def _reload_devices(self) -> None:
        rows = self._run(f"SELECT {_DEVICE_COLS} FROM devices")
        self._devices = {r[0]: {"report": json.loads(r[1]), "budget": r[2], "status": r[3],
                                "last_seen": r[4]} for r in rows}

    def refresh_device(self, device_id: str) -> None:
        """Re-read one device's row (another process, the coordinator, writes the registry)."""
        row = self._one("SELECT report, budget, status, last_seen FROM devices "
                        "WHERE device_id=?", (device_id,))
        if row is None:
            self._devices.pop(device_id, None)
        else:
            self._devices[device_id] = {"report": json.loads(row[0]), "budget": row[1],
                                        "status": row[2], "last_seen": row[3]}

    def set_device_status(self, device_id: str, status: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._run("UPDATE devices SET status=?, last_seen=? WHERE device_id=?",
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
        self._run("INSERT INTO rounds(round_idx, state, started_at, deadline, participants, "
                  "base_hash) VALUES (?, 'open', ?, ?, ?, ?) ON CONFLICT(round_idx) DO UPDATE "
                  "SET state=excluded.state, started_at=excluded.started_at, "
                  "deadline=excluded.deadline, participants=excluded.participants, "
                  "base_hash=excluded.base_hash, new_hash=NULL, metrics=NULL",
                  (round_idx, time.time(), deadline, json.dumps(participants), base_hash))

    def set_round_state(self, round_idx: int, state: str) -> None:
        self._run("UPDATE rounds SET state=? WHERE round_idx=?", (state, round_idx))

    def round_info(self, round_idx: int) -> dict[str, Any] | None:
        row = self._one("SELECT state, started_at, deadline, participants, base_hash, "
                        "new_hash, metrics FROM rounds WHERE round_idx=?", (round_idx,))
        if row is None:
            return None
        return {"state": row[0], "started_at": row[1], "deadline": row[2],
                "participants": json.loads(row[3]), "base_hash": row[4], "new_hash": row[5],
                "metrics": json.loads(row[6]) if row[6] else None}

    def last_round(self) -> int | None:
        row = self._one("SELECT MAX(round_idx) FROM rounds")
        return None if row is None else row[0]

    # --- updates ---------------------------------------------------------------------------
    def spool_update(self, round_idx: int, client_id: str, blob: bytes, num_examples: int,
                     late: bool = False) -> StoredUpdate:
        """Persist an accepted update (file, then row); idempotent per (round, client)."""
        existing = self.update(round_idx, client_id)
        if existing is not None:
            return existing
        path = self.spool_dir / "updates" / f"r{round_idx}" / f"{client_id}.bin"
        files.fsync_write(path, blob)
        digest = hashlib.sha256(blob).hexdigest()
        self._run("INSERT INTO updates(round_idx, client_id, path, sha256, num_bytes, "
                  "num_examples, late, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  (round_idx, client_id, str(path.relative_to(self.spool_dir)), digest,
                   len(blob), num_examples, int(late), time.time()))
        return StoredUpdate(round_idx, client_id, path, digest, len(blob), num_examples, late)

    def update(self, round_idx: int, client_id: str) -> StoredUpdate | None:
        row = self._one("SELECT path, sha256, num_bytes, num_examples, late FROM updates "
                        "WHERE round_idx=? AND client_id=?", (round_idx, client_id))
        if row is None:
            return None
        return StoredUpdate(round_idx, client_id, self.spool_dir / row[0], row[1], row[2],
                            row[3], bool(row[4]))

    def updates(self, round_idx: int) -> list[StoredUpdate]:
        rows = self._run("SELECT client_id, path, sha256, num_bytes, num_examples, late "
                         "FROM updates WHERE round_idx=? ORDER BY accepted_at, client_id",
                         (round_idx,))
        return [StoredUpdate(round_idx, r[0], self.spool_dir / r[1], r[2], r[3], r[4],
                             bool(r[5])) for r in rows]

    def read_update(self, stored: StoredUpdate) -> bytes:
        return files.read_checked(stored.path, stored.sha256, "spooled update")

    def record_participation(self, round_idx: int, client_id: str, budget: int,
                             experts_sent: int, optimizer_experts: int,
                             info: dict[str, Any]) -> None:
        """Per device and round: its registered budget, the experts it sent and the experts
        that held optimizer state (as the device reports), plus the plan's facts."""
        self._run("INSERT INTO participation(round_idx, client_id, budget, experts_sent, "
                  "optimizer_experts, info) VALUES (?, ?, ?, ?, ?, ?) "
                  "ON CONFLICT(round_idx, client_id) DO UPDATE SET budget=excluded.budget, "
                  "experts_sent=excluded.experts_sent, "
                  "optimizer_experts=excluded.optimizer_experts, info=excluded.info",
                  (round_idx, client_id, budget, experts_sent, optimizer_experts,
                   json.dumps(info, default=str)))

    def participation(self, round_idx: int | None = None) -> list[dict[str, Any]]:
        q = ("SELECT round_idx, client_id, budget, experts_sent, optimizer_experts, info "
             "FROM participation")
        rows = (self._run(q + " WHERE round_idx=? ORDER BY client_id", (round_idx,))
                if round_idx is not None else self._run(q + " ORDER BY round_idx, client_id"))
        return [{"round": r[0], "client": r[1], "budget": r[2], "experts_sent": r[3],
                 "optimizer_experts": r[4], **json.loads(r[5])} for r in rows]

    def reject(self, round_idx: int | None, client_id: str, error: str, reason: str) -> None:
        self._run("INSERT INTO rejections(round_idx, client_id, error, reason, at) "
                  "VALUES (?, ?, ?, ?, ?)", (round_idx, client_id, error, reason, time.time()))

    def record_skip(self, round_idx: int | None, client_id: str, reasons: list[str],
                    conditions: Mapping[str, Any], during_round: bool = False) -> None:
        """A device sat a round out (its conditions broke the eligibility rules)."""
        self._run("INSERT INTO skips(round_idx, client_id, reasons, conditions, during_round, "
                  "at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(round_idx, client_id) DO UPDATE "
                  "SET reasons=excluded.reasons, conditions=excluded.conditions, "
                  "during_round=excluded.during_round, at=excluded.at",
                  (round_idx, client_id, json.dumps(reasons), json.dumps(conditions),
                   int(during_round), time.time()))

    def skips(self, round_idx: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT round_idx, client_id, reasons, conditions, during_round FROM skips"
        rows = (self._run(q + " WHERE round_idx=? ORDER BY client_id", (round_idx,))
                if round_idx is not None else self._run(q + " ORDER BY round_idx, client_id"))
        return [{"round": r[0], "client": r[1], "reasons": json.loads(r[2]),
                 "conditions": json.loads(r[3]), "during_round": bool(r[4])} for r in rows]

    def rejections(self, round_idx: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT round_idx, client_id, error, reason FROM rejections"
        rows = (self._run(q + " WHERE round_idx=? ORDER BY id", (round_idx,))
                if round_idx is not None else self._run(q + " ORDER BY id"))
        return [{"round": r[0], "client": r[1], "error": r[2], "reason": r[3]} for r in rows]

    # --- retention -------------------------------------------------------------------------
    def size_bytes(self) -> int:
        """Bytes the run directory (and the spool directory, where apart) holds on disk."""
        return files.tree_bytes(self.run_dir, self.spool_dir)

    def check_room(self, nbytes: int, min_free_bytes: int, max_run_dir_bytes: int) -> None:
        """Raise :class:`DiskFullError` unless ``nbytes`` more leave ``min_free_bytes`` free
        on the spool's disk and keep the run within ``max_run_dir_bytes`` (0: no quota)."""
        used = self.size_bytes() if max_run_dir_bytes else 0
        files.check_room(self.spool_dir, used, nbytes, min_free_bytes, max_run_dir_bytes)

    def prune(self, done_round: int, keep_updates: bool, keep_checkpoints: int,
              keep_best: bool) -> int:
        """Free what a durable round no longer needs; returns the bytes freed.

        Call after :meth:`save_checkpoint` of ``done_round``: the spooled updates of rounds up
        to it are folded into that checkpoint (resume only reads an interrupted round's
        updates), so their files go unless ``keep_updates``; checkpoints other than the last
        ``keep_checkpoints`` and (``keep_best``) the one with the best held-out accuracy (or
        lowest loss) go with their rows.
        """
        freed = 0 if keep_updates else files.prune_update_files(self.spool_dir, done_round)
        rows = self._run("SELECT c.round_idx, c.path, r.metrics FROM checkpoints c "
                         "LEFT JOIN rounds r ON r.round_idx = c.round_idx "
                         "ORDER BY c.round_idx")
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
            file = self.spool_dir / path
            freed += file.stat().st_size if file.exists() else 0
            file.unlink(missing_ok=True)
            self._run("DELETE FROM checkpoints WHERE round_idx=?", (round_idx,))
        return freed

    # --- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, round_idx: int, state: Mapping[str, torch.Tensor],
                        metrics: Mapping[str, Any], state_hash: str) -> Path:
        """Write the global model after ``round_idx`` and mark the round done, atomically."""
        path = self.spool_dir / "checkpoints" / f"global_r{round_idx}.safetensors"
        blob = files.state_bytes(state, {"round": str(round_idx), "state_hash": state_hash})
        files.fsync_write(path, blob)
        digest = hashlib.sha256(blob).hexdigest()
        with self._atomic():
            self._run("INSERT INTO checkpoints(round_idx, path, sha256, created_at) "
                      "VALUES (?, ?, ?, ?) ON CONFLICT(round_idx) DO UPDATE SET "
                      "path=excluded.path, sha256=excluded.sha256, "
                      "created_at=excluded.created_at",
                      (round_idx, str(path.relative_to(self.spool_dir)), digest, time.time()))
            self._run("UPDATE rounds SET state='done', new_hash=?, metrics=? "
                      "WHERE round_idx=?", (state_hash, json.dumps(dict(metrics)), round_idx))
        return path

    def latest_checkpoint(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        row = self._one("SELECT round_idx, path, sha256 FROM checkpoints "
                        "ORDER BY round_idx DESC LIMIT 1")
        if row is None:
            return None
        data = files.read_checked(self.spool_dir / row[1], row[2], "checkpoint")
        return row[0], dict(st_load(data))
