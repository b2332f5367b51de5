"""The device's join decision for an announced round and its conditions checks while it trains
(device_agent.conditions.JoinGate): exact outcomes, the statuses the server hears, and the
privacy budget that makes a device sit a round out."""

from __future__ import annotations

import json

import pytest

from device_agent.conditions import ConditionsBroke, JoinGate
from hfedmoe.eligibility import EligibilityConfig
from hfedmoe.errors import TransportError
from hfedmoe.protocol import DeviceStatus, ModelManifest, RoundAnnouncement, manifest_hash
from hfedmoe.trainer import StopTraining

SHARDS = {"shared": "a" * 64}
GOOD = {"battery_pct": 80, "charging": False, "temperature_c": 30.0, "metered": False,
        "idle": True}
LOW = {**GOOD, "battery_pct": 8}
SERVER_RULES = {"min_battery_pct": 20, "check_every_s": 10.0}  # and the device's: every 10 s
DP = {"dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_delta": 1e-5, "dp_max_epsilon": 8.0}


def announce(round_idx: int = 3, deadline: float = 100.0, participants=("dev",),
             method=None, eligibility=None) -> RoundAnnouncement:
    return RoundAnnouncement(round_idx, deadline, "hfedmoe", method or {}, {},
                             tuple(participants), ModelManifest(manifest_hash(SHARDS), SHARDS),
                             eligibility=SERVER_RULES if eligibility is None else eligibility)


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path):
    readings = tmp_path / "conditions.json"
    readings.write_text(json.dumps(GOOD))
    sent: list[DeviceStatus] = []
    clock = Clock()
    local: dict = {}

    def gate(**own: object) -> JoinGate:
        rules = EligibilityConfig(**{"check_every_s": 10.0, **own})  # type: ignore[arg-type]
        return JoinGate("dev", rules, str(readings), local, sent.append, clock)

    def read(values: dict) -> None:
        readings.write_text(json.dumps(values))

    return gate, read, sent, clock, local


@pytest.mark.parametrize("ann, last_round", [
    (announce(participants=("other",)), -1),  # not named
    (announce(round_idx=3), 3),  # already played (or older)
    (announce(deadline=50.0), -1),  # closed: the deadline is now
])
def test_a_round_not_for_this_device_is_declined_without_reading_conditions(world, ann,
                                                                          last_round):
    gate, _, sent, _, local = world
    local["last_round"] = last_round
    g = gate()
    assert g.admits(ann) is False
    assert sent == [] and g.reported is None


def test_an_eligible_device_joins_and_reports_it_once(world):
    gate, _, sent, _, _ = world
    g = gate()
    assert g.admits(announce()) is True
    assert sent == [DeviceStatus("online", eligible=True, conditions=GOOD, round_idx=3)]
    assert g.admits(announce()) is True  # unchanged: not reported again
    assert len(sent) == 1


def test_an_ineligible_device_sits_out_until_its_conditions_hold(world):
    gate, read, sent, clock, _ = world
    read(LOW)
    g = gate()
    assert g.admits(announce()) is False
    reasons = ("battery 8% < 20% and not charging",)
    assert sent == [DeviceStatus("online", eligible=False, reasons=reasons, conditions=LOW,
                                 round_idx=3)]
    read(GOOD)  # plugged in: seen at the next check, check_every_s (10 s) later
    clock.now += 9.0
    assert g.admits(announce()) is False and len(sent) == 1
    clock.now += 1.0
    assert g.admits(announce()) is True  # joins late
    assert sent[-1] == DeviceStatus("online", eligible=True, conditions=GOOD, round_idx=3)


def test_the_device_rules_add_to_the_servers(world):
    gate, read, sent, _, _ = world
    read({**GOOD, "metered": True})
    assert gate().admits(announce()) is True  # the server allows metered networks
    assert gate(allow_metered=False).admits(announce(round_idx=4)) is False
    assert sent[-1].reasons == ("on a metered network",)


@pytest.mark.parametrize("spent, joins", [(0, True), (1, True), (2, False)])
def test_a_spent_privacy_budget_sits_the_round_out(world, spent, joins):
    gate, _, sent, _, local = world
    g = gate()
    for r in range(spent):  # at noise 1.0, delta 1e-5: epsilon 4.73, 7.08, 9.01 after 1-3
        g.privacy.ledger.record(r, 1.0, 1.0)
    assert g.admits(announce(method=DP)) is joins
    if joins:
        assert "dp_refused_round" not in local and len(sent) == 1
    else:  # refused before the conditions are read; the status says why
        assert local["dp_refused_round"] == 3 and len(sent) == 1
        assert sent[0].eligible is False and sent[0].round_idx == 3
        assert sent[0].reasons[0].startswith("privacy:epsilon-budget: 2 noised updates")
        assert g.admits(announce(method=DP)) is False and len(sent) == 1  # said once


def test_a_device_floor_without_a_clip_bound_refuses_and_says_so(world):
    from device_agent.privacy import DevicePrivacy, DevicePrivacyConfig, PrivacyLedger

    gate, _, sent, _, _ = world
    g = gate()
    g.privacy = DevicePrivacy(DevicePrivacyConfig(min_noise_multiplier=1.0),
                              PrivacyLedger(":memory:"))
    assert g.admits(announce()) is False  # the server announces no DP at all
    assert [s.reasons[0].split(":")[1] for s in sent] == ["no-clip-bound"]


def test_a_device_that_demands_secure_aggregation_sits_out_a_plain_round(world):
    import dataclasses

    from device_agent.privacy import DevicePrivacy, DevicePrivacyConfig, PrivacyLedger

    gate, _, sent, _, _ = world
    g = gate()
    g.privacy = DevicePrivacy(DevicePrivacyConfig(min_secagg_contributors=3),
                              PrivacyLedger(":memory:"))
    secure = dataclasses.replace(announce(round_idx=4),
                                 secagg={"enabled": True, "min_contributors": 3})

    assert g.admits(announce()) is False
    assert [s.reasons[0].split(":")[1] for s in sent] == ["no-secagg"]
    assert g.admits(secure) is True


def test_a_malformed_method_or_rules_table_does_not_block_the_join(world):
    gate, _, _, _, _ = world
    ann = announce(method={"dp_delta": 2.0}, eligibility={"min_battery_pct": 500})
    assert gate().admits(ann) is True


@pytest.mark.parametrize("on_break, raised, sending", [
    ("send", StopTraining, True), ("drop", ConditionsBroke, False)])
def test_conditions_that_break_while_training_stop_it(world, on_break, raised, sending):
    gate, read, sent, clock, _ = world
    g = gate(on_break=on_break)
    assert g.admits(announce())
    g.check_training(3)  # within check_every_s of the join check: not read
    read(LOW)
    clock.now += 5.0
    g.check_training(3)  # still within 10 s
    assert len(sent) == 1
    clock.now += 5.0
    with pytest.raises(raised, match="battery 8% < 20%"):
        g.check_training(3)
    assert sent[-1] == DeviceStatus(
        "online", eligible=False, reasons=("battery 8% < 20% and not charging",),
        conditions=LOW, round_idx=3, during_round=True, sending=sending)
    assert g.reported == (3, ("battery 8% < 20% and not charging",))


def test_a_status_that_cannot_be_sent_does_not_stop_the_device(world, tmp_path):
    def unreachable(status: DeviceStatus) -> None:
        raise TransportError("broker gone")

    g = JoinGate("dev", EligibilityConfig(), str(tmp_path / "conditions.json"), {},
                 unreachable, Clock())
    assert g.admits(announce()) is True
