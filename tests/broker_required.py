"""The one rule for tests that need a real Mosquitto: skip where it is missing, except where
``HFEDMOE_REQUIRE_BROKER=1`` (CI sets it) -- there a missing broker fails the test, so the
crash-resume, hostile-update, ACL and broker-restart tests can never be dropped silently.

The same rule for the headless-browser test of the dashboard: a missing Chromium skips it,
except where ``HFEDMOE_REQUIRE_BROWSER=1`` (unset: as ``HFEDMOE_REQUIRE_BROKER``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REQUIRE_ENV = "HFEDMOE_REQUIRE_BROKER"
# HFEDMOE_MOSQUITTO: another binary (tests of this rule point it at a missing one)
MOSQUITTO = (os.environ.get("HFEDMOE_MOSQUITTO") or shutil.which("mosquitto")
             or "/usr/sbin/mosquitto")
REQUIRE_BROWSER_ENV = "HFEDMOE_REQUIRE_BROWSER"
# HFEDMOE_CHROMIUM: another binary (tests of this rule point it at a missing one)
CHROMIUM = (os.environ.get("HFEDMOE_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser") or "/usr/bin/chromium")


def _truthy(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "no")


def broker_required() -> bool:
    return _truthy(os.environ.get(REQUIRE_ENV, ""))


def browser_required() -> bool:
    """``HFEDMOE_REQUIRE_BROWSER``; where unset, ``HFEDMOE_REQUIRE_BROKER`` (CI sets both)."""
    value = os.environ.get(REQUIRE_BROWSER_ENV)
    return broker_required() if value is None else _truthy(value)


def skip_or_fail(reason: str) -> None:
    """``pytest.skip(reason)``, or ``pytest.fail`` when the environment requires the broker."""
    if broker_required():
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1 forbids skipping broker tests)",
                    pytrace=False)
    pytest.skip(reason)


def need_mosquitto() -> str:
    """The mosquitto binary's path; skips (or fails, see :func:`skip_or_fail`) without one."""
    if not Path(MOSQUITTO).exists():
        skip_or_fail(f"mosquitto binary not installed ({MOSQUITTO})")
    return MOSQUITTO


def need_chromium() -> str:
    """The chromium binary's path; skips without one, or fails where the environment requires
    the browser (:func:`browser_required`)."""
    chromium = CHROMIUM
    if not Path(chromium).exists():
        reason = f"chromium not installed ({chromium}; apt-get install chromium)"
        if browser_required():
            pytest.fail(f"{reason} (and {REQUIRE_BROWSER_ENV}=1, or {REQUIRE_ENV}=1 with "
                        f"{REQUIRE_BROWSER_ENV} unset, forbids skipping the browser test)",
                        pytrace=False)
        pytest.skip(reason)
    return chromium
