"""The rule for tests that need a real PostgreSQL, as :mod:`tests.broker_required` has for
Mosquitto: they skip where none is reachable at ``$HFEDMOE_TEST_POSTGRES_URL`` (default
``postgresql://hfedmoe@127.0.0.1:5432/hfedmoe_test``), except where
``HFEDMOE_REQUIRE_POSTGRES=1`` (CI sets it) -- there an unreachable database fails them, so the
store tests can never silently run on SQLite alone.

Each test gets a schema of its own (:func:`fresh_schema`), dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

REQUIRE_ENV = "HFEDMOE_REQUIRE_POSTGRES"
URL_ENV = "HFEDMOE_TEST_POSTGRES_URL"
DEFAULT_URL = "postgresql://hfedmoe@127.0.0.1:5432/hfedmoe_test"
_reachable: dict[str, str] = {}  # url -> "" (reachable) or why not


def postgres_url() -> str:
    return os.environ.get(URL_ENV, "").strip() or DEFAULT_URL


def postgres_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def need_postgres() -> str:
    """The test database's URL; skips (or fails under ``HFEDMOE_REQUIRE_POSTGRES=1``) when
    psycopg is missing or the database does not answer."""
    url = postgres_url()
    if url not in _reachable:
        try:
            import psycopg

            with psycopg.connect(url, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _reachable[url] = ""
        except Exception as exc:  # noqa: BLE001 - ImportError or any connection failure
            _reachable[url] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    why = _reachable[url]
    if why:
        reason = f"PostgreSQL unreachable at {url} ({why}); set {URL_ENV}"
        if postgres_required():
            pytest.fail(f"{reason} (and {REQUIRE_ENV}=1 forbids skipping)", pytrace=False)
        pytest.skip(reason)
    return url


def fresh_schema() -> Iterator[tuple[str, str]]:
    """(url, schema): a schema name no other test uses; the schema is dropped afterwards."""
    url = need_postgres()
    schema = "t_" + secrets.token_hex(6)
    try:
        yield url, schema
    finally:
        import psycopg

        with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
