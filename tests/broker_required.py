"""The one rule for tests that need a real Mosquitto: skip where it is missing, except where
``HFEDMOE_REQUIRE_BROKER=1`` (CI sets it) -- there a missing broker fails the test, so the
crash-resume, hostile-update, ACL and broker-restart tests can never be dropped silently."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REQUIRE_ENV = "HFEDMOE_REQUIRE_BROKER"
# HFEDMOE_MOSQUITTO: another binary (tests of this rule point it at a missing one)
MOSQUITTO = (os.environ.get("HFEDMOE_MOSQUITTO") or shutil.which("mosquitto")
             or "/usr/sbin/mosquitto")


def broker_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


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
