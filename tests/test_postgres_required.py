"""CI's HFEDMOE_REQUIRE_POSTGRES=1: the PostgreSQL store fixtures fail instead of skipping when
no database answers (so the store tests cannot silently run on SQLite alone)."""

from __future__ import annotations

import socket

import pytest

import tests.postgres_required as rules


def _nowhere() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://nobody@127.0.0.1:{port}/none"


@pytest.mark.parametrize(("required", "outcome"), [(None, pytest.skip.Exception),
                                                   ("0", pytest.skip.Exception),
                                                   ("1", pytest.fail.Exception)])
def test_an_unreachable_database_skips_or_fails(monkeypatch, required, outcome):
    monkeypatch.setenv(rules.URL_ENV, _nowhere())
    if required is None:
        monkeypatch.delenv(rules.REQUIRE_ENV, raising=False)
    else:
        monkeypatch.setenv(rules.REQUIRE_ENV, required)
    with pytest.raises(outcome, match="PostgreSQL unreachable at postgresql://nobody@"):
        rules.need_postgres()
