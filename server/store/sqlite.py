"""The embedded store: SQLite (WAL, ``synchronous=FULL``) in ``run.db`` of the run directory.

The default: nothing to install or run. Ingest workers reach the same file, so they must
share the run directory's disk with the coordinator (same host). One writer at a time: the
others wait for its lock (up to a minute).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hfedmoe.errors import StoreError
from server.store import migrations
from server.store.sql import SqlStore


class SQLiteStore(SqlStore):
    """A run's durable state in ``{run_dir}/run.db``; blobs under ``spool_dir`` (the run
    directory unless given)."""

    dialect = "sqlite"

    def __init__(self, run_dir: str | Path, spool_dir: str | Path | None = None) -> None:
        super().__init__(run_dir, spool_dir)
        self.path = self.run_dir / "run.db"
        try:
            # ingest workers write to the same database: wait for each other's locks
            self.db = sqlite3.connect(self.path, isolation_level=None,
                                      check_same_thread=False, timeout=60.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        self.migrate()
        self._reload_devices()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    def close(self) -> None:
        self.db.close()

    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        self._run("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._run("ROLLBACK")
            raise
        self._run("COMMIT")

    def schema_version(self) -> int | None:
        row = self._one("SELECT MAX(version) FROM schema_version")
        return None if row is None else row[0]

    def migrate(self, steps: tuple[migrations.Step, ...] | None = None) -> None:
        """Apply the pending migration steps (:mod:`server.store.migrations`), one
        transaction each; every process that opens the store runs this, the lock orders them."""
        self._run(migrations.VERSION_TABLE.format(real="REAL"))
        while True:
            with self._atomic():
                todo = migrations.pending(self.schema_version(), str(self.path), steps)
                if not todo:
                    return
                step = todo[0]
                for statement in step.statements(self.dialect):
                    self._run(statement)
                self._run("INSERT INTO schema_version(version, summary, applied_at) "
                          "VALUES (?, ?, ?)", (step.version, step.summary, time.time()))
