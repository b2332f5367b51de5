"""CI's HFEDMOE_REQUIRE_BROKER=1: the broker fixtures of tests/hfedmoe/transport and tests/integration
fail instead of skipping when Mosquitto is missing (so broker tests cannot vanish silently)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tests.broker_required as rules
from tests.broker_required import REQUIRE_BROWSER_ENV, REQUIRE_ENV, need_chromium, skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
BROKER_TESTS = [  # one test behind each broker fixture
    "tests/hfedmoe/transport/test_mosquitto_security.py::test_tls_with_client_cert_connects",
    "tests/integration/test_server_rounds.py::test_device_killed_mid_round_does_not_stall_the_round",
]


def test_skip_or_fail(monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail("no broker")
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ENV):
        skip_or_fail("no broker")


@pytest.mark.parametrize(("broker", "browser", "fails"), [
    (None, None, False), ("1", None, True), (None, "1", True), ("1", "0", False),
    ("0", "1", True)])
def test_missing_chromium_skips_or_fails(monkeypatch, tmp_path, broker, browser, fails):
    """CI's HFEDMOE_REQUIRE_BROKER=1 (and HFEDMOE_REQUIRE_BROWSER=1) turn a missing Chromium
    into a failure of the dashboard's browser test."""
    for env, value in ((REQUIRE_ENV, broker), (REQUIRE_BROWSER_ENV, browser)):
        if value is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, value)
    monkeypatch.setattr(rules, "CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(pytest.fail.Exception if fails else pytest.skip.Exception,
                       match="chromium not installed"):
        need_chromium()
    found = tmp_path / "chromium"
    found.write_text("")
    monkeypatch.setattr(rules, "CHROMIUM", str(found))
    assert need_chromium() == str(found)


@pytest.mark.parametrize("require", ["", "1"])
def test_broker_fixtures_honour_require_broker(require):
    env = {**os.environ, "HFEDMOE_MOSQUITTO": "/nonexistent/mosquitto", REQUIRE_ENV: require}
    # -m "": both tests, slow or not
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-m", "", *BROKER_TESTS], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    tail = out.stdout[-2000:] + out.stderr[-2000:]
    if require:
        assert out.returncode != 0 and "2 errors" in tail and "skipped" not in tail, tail
        assert REQUIRE_ENV in tail
    else:
        assert out.returncode == 0 and "2 skipped" in tail, tail
