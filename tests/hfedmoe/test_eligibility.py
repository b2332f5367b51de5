"""Eligibility rules: what each reading breaks, how the server's and a device's rules
combine, and emulated readings."""

from __future__ import annotations

import json

import pytest

from device_agent.conditions import read_conditions
from hfedmoe.eligibility import Conditions, EligibilityConfig, check, combine
from hfedmoe.errors import ConfigError

RULES = EligibilityConfig(min_battery_pct=20, max_temperature_c=45, allow_metered=False)


@pytest.mark.parametrize("cond, reasons", [
    (Conditions(80, False, 30.0, False, None), []),
    (Conditions(8, False, 30.0, False, None), ["battery 8% < 20% and not charging"]),
    (Conditions(8, True, 30.0, False, None), []),  # low but charging
    (Conditions(80, False, 50.0, False, None), ["too hot: 50.0 C > 45.0 C"]),
    (Conditions(80, False, 30.0, True, None), ["on a metered network"]),
    (Conditions(None, None, None, None, None), []),  # nothing readable blocks nothing
    (Conditions(5, False, 60.0, True, None), ["battery 5% < 20% and not charging",
                                              "too hot: 60.0 C > 45.0 C",
                                              "on a metered network"]),
])
def test_check(cond, reasons):
    assert check(cond, RULES) == reasons


def test_charging_and_idle_rules():
    rules = EligibilityConfig(require_charging=True, require_idle=True)
    assert check(Conditions(charging=False, idle=False), rules) == [
        "not charging (the run trains only while charging)", "the device is in use"]
    assert check(Conditions(charging=True, idle=True), rules) == []


def test_combine_keeps_the_stricter_rule():
    server = EligibilityConfig(min_battery_pct=20, max_temperature_c=45, on_break="drop")
    device = EligibilityConfig(min_battery_pct=50, max_temperature_c=0, allow_metered=False,
                               check_every_s=0.5)
    both = combine(server, device)
    assert both.min_battery_pct == 50 and both.max_temperature_c == 45
    assert not both.allow_metered and both.check_every_s == 0.5
    assert both.on_break == "drop"  # the device did not choose: the server's
    assert combine(server, EligibilityConfig(on_break="send")).on_break == "send"
    assert combine(EligibilityConfig(), EligibilityConfig()).on_break == "send"


def test_emulated_readings_are_read_each_time(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"battery_pct": 50, "charging": False}))
    assert read_conditions(path) == Conditions(50, False)
    path.write_text(json.dumps({"battery_pct": 4, "metered": True}))
    assert read_conditions(path) == Conditions(4, None, None, True)
    path.write_text(json.dumps({"battery": 4}))
    with pytest.raises(ConfigError, match="unknown condition"):
        read_conditions(path)
    path.write_text("[1]")
    with pytest.raises(ConfigError, match="JSON object"):
        read_conditions(path)
    # a list plays in order, one reading per call, the last one staying
    played = tmp_path / "drain.json"
    played.write_text(json.dumps([{"battery_pct": 60}, {"battery_pct": 30}, {"battery_pct": 5}]))
    assert [read_conditions(played).battery_pct for _ in range(5)] == [60, 30, 5, 5, 5]


def test_bad_config():
    for bad in ({"min_battery_pct": 120}, {"max_temperature_c": -1}, {"on_break": "later"},
                {"check_every_s": 0}):
        with pytest.raises(ConfigError):
            EligibilityConfig(**bad)


def _fake(bin_dir, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


@pytest.mark.parametrize("nm, logind, metered, idle", [
    ("GENERAL.METERED:no\nGENERAL.METERED:yes (guessed)", "yes", True, True),
    ("GENERAL.METERED:no\nGENERAL.METERED:no", "no", False, False),
    ("GENERAL.METERED:unknown", "", None, None),
])
def test_live_metered_and_idle_readings(tmp_path, monkeypatch, nm, logind, metered, idle):
    """NetworkManager's GENERAL.METERED and logind's IdleHint, through the real subprocess
    path (stand-in binaries on PATH print what the real ones print)."""
    _fake(tmp_path, "nmcli", f"printf '{nm}\\n'\n")
    _fake(tmp_path, "loginctl", f"printf '{logind}\\n'\n")
    monkeypatch.setenv("PATH", f"{tmp_path}")
    cond = read_conditions()
    assert (cond.metered, cond.idle) == (metered, idle)


def test_no_readers_means_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither nmcli nor loginctl
    cond = read_conditions()
    assert cond.metered is None and cond.idle is None
    assert check(cond, EligibilityConfig(allow_metered=False, require_idle=True)) == []
