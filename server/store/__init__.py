"""Durable server state behind one interface (:class:`StateStore`), two implementations.

- :class:`SQLiteStore` (also exported as ``Store``): ``run.db`` in the run directory, the
  embedded default the demo and single-host runs use.
- :class:`PostgresStore`: ``store.url = "postgresql://..."`` in the server config, so ingest
  workers on several hosts share one registry and one record of acknowledged updates.

Both keep blobs (spooled updates, checkpoints, partial aggregates) as files in the spool
directory (:mod:`server.store.files`) and the schema as ordered migration steps
(:mod:`server.store.migrations`). :func:`open_store` picks one from a server config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from server.store.base import StateStore
from server.store.files import StoredUpdate, state_bytes
from server.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.store.postgres import PostgresStore

Store = SQLiteStore  # the embedded default: Store(run_dir)

__all__ = ["PostgresStore", "SQLiteStore", "StateStore", "Store", "StoredUpdate", "open_store",
           "state_bytes"]


def open_store(cfg: ServerConfig, run_dir: str | Path | None = None) -> StateStore:
    """The store a server config names (``cfg.store``), for ``run_dir`` (default
    ``cfg.run_dir``). StoreError (naming the database) when it cannot be opened."""
    run_dir = cfg.run_dir if run_dir is None else run_dir
    sc = cfg.store
    if not sc.url:
        return SQLiteStore(run_dir, sc.spool_dir or None)
    from server.store.postgres import PostgresStore

    return PostgresStore(sc.url, sc.schema_for(cfg.run_id), run_dir, sc.spool_dir or None,
                         connect_timeout_s=sc.connect_timeout_s)


def __getattr__(name: str) -> object:
    if name == "PostgresStore":  # psycopg is imported only where PostgreSQL is used
        from server.store.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(name)
