"""PostgreSQL: the store that several hosts can share (``store.url = "postgresql://..."``).

Through psycopg 3, one connection per process, autocommit: a statement outside a
transaction is committed when it returns, and every session runs with
``synchronous_commit = on`` (whatever the server's default), so a returned INSERT is on the
database's disk before the intake acknowledges the update, as with SQLite's
``synchronous=FULL``. A run's tables live in their own schema (``store.schema``, default
``hfedmoe_{run_id}``); opening the store creates it and applies the pending migrations under
an advisory lock, so a coordinator and its workers may start at once.

When the database goes away (a restart, a network cut), the statement in flight raises
StoreError and the connection is dropped; the next statement connects again. The intake
acknowledges nothing it could not commit, so devices resend and are taken in once the
database is back (:mod:`server.intake`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hfedmoe.errors import StoreError
from server.store import migrations
from server.store.sql import SqlStore

# libpq: notice a dead peer within ~30 s instead of the kernel's default of hours
_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3, "tcp_user_timeout": 30_000}


def describe(url: str) -> str:
    """``postgresql://user@host:port/dbname`` of a URL, without its password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        d = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - psycopg's ProgrammingError: name what we can
        return url.split("@")[-1].split("?")[0]
    user = f"{d['user']}@" if d.get("user") else ""
    port = f":{d['port']}" if d.get("port") else ""
    return f"postgresql://{user}{d.get('host', 'localhost')}{port}/{d.get('dbname', '')}"


class PostgresStore(SqlStore):
    """A run's durable state in PostgreSQL schema ``schema``; blobs under ``spool_dir`` (the
    run directory unless given). Raises StoreError naming the database when it cannot be
    reached at start."""

    dialect = "postgres"

    def __init__(self, url: str, schema: str, run_dir: str | Path,
                 spool_dir: str | Path | None = None, connect_timeout_s: float = 10.0) -> None:
        super().__init__(run_dir, spool_dir)
        self.url, self.schema, self.timeout = url, schema, connect_timeout_s
        self.where = f"{describe(url)} (schema {schema})"
        self.conn: Any = None
        self._in_tx = False
        self._connect()
        self.migrate()
        self._reload_devices()

    def __repr__(self) -> str:
        return f"PostgresStore({self.where!r})"

    # --- the connection --------------------------------------------------------------------
    def _connect(self) -> Any:
        import psycopg
        from psycopg import sql

        try:
            conn = psycopg.connect(self.url, autocommit=True,
                                   connect_timeout=max(1, round(self.timeout)), **_KEEPALIVE)
            conn.execute("SET synchronous_commit TO on")
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        except psycopg.Error as exc:
            raise StoreError(f"database {self.where} unreachable: "
                             f"{str(exc).strip() or type(exc).__name__}") from exc
        self.conn = conn
        return conn

    def _live(self) -> Any:
        if self.conn is None or self.conn.closed or self.conn.broken:
            if self._in_tx:
                raise StoreError(f"database {self.where}: connection lost in a transaction")
            self._drop()
            return self._connect()
        return self.conn

    def _drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None

    def close(self) -> None:
        self._drop()

    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        conn = self._live()
        try:
            cur = conn.execute(sql.replace("?", "%s"), tuple(params))
            return cur.fetchall() if cur.description is not None else []
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if conn.closed or conn.broken:
                self._drop()  # the next statement connects again
            raise StoreError(f"database {self.where}: {str(exc).strip()}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"database {self.where}: {str(exc).strip()}") from exc

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        import psycopg

        conn = self._live()
        self._in_tx = True
        try:
            with conn.transaction():
                yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop()
            raise StoreError(f"database {self.where}: {str(exc).strip()}") from exc
        finally:
            self._in_tx = False

    # --- migrations ------------------------------------------------------------------------
    def schema_version(self) -> int | None:
        row = self._one("SELECT MAX(version) FROM schema_version")
        return None if row is None else row[0]

    def migrate(self, steps: tuple[migrations.Step, ...] | None = None) -> None:
        """Create the schema and apply the pending steps (:mod:`server.store.migrations`),
        one transaction each, under an advisory lock held by one opener at a time."""
        from psycopg import sql

        lock = ("SELECT pg_advisory_xact_lock(hashtext(?::text))", ("hfedmoe-migrate:" + self.schema,))
        with self._atomic():
            self._run(*lock)
            if not self._run("SELECT 1 FROM pg_namespace WHERE nspname = ?", (self.schema,)):
                # (a role without CREATE on the database may still own an existing schema)
                self._run(sql.SQL("CREATE SCHEMA {}").format(
                    sql.Identifier(self.schema)).as_string(self.conn))
            self._run(migrations.VERSION_TABLE.format(real="DOUBLE PRECISION"))
        while True:
            with self._atomic():
                self._run(*lock)
                todo = migrations.pending(self.schema_version(), self.where, steps)
                if not todo:
                    return
                step = todo[0]
                for statement in step.statements(self.dialect):
                    self._run(statement)
                self._run("INSERT INTO schema_version(version, summary, applied_at) "
                          "VALUES (?, ?, ?)", (step.version, step.summary, time.time()))
