"""The device's own privacy (device_agent.privacy): the stricter of its settings and the
server's, refusals, per-round epsilon accounting that survives a restart, and the metadata
policy."""

from __future__ import annotations

import dataclasses

import dp_accounting
import pytest

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.privacy import DevicePrivacy, DevicePrivacyConfig, PrivacyLedger
from hfedmoe.config import MethodConfig
from hfedmoe.errors import ConfigError, PrivacyRefused
from hfedmoe.names import ExpertId
from hfedmoe.update import SparseUpdate, UpdateMeta

E00, E01, E10 = ExpertId(0, 0), ExpertId(0, 1), ExpertId(1, 0)


def device(**own: object) -> DevicePrivacy:
    return DevicePrivacy(DevicePrivacyConfig(**own), PrivacyLedger(":memory:"))  # type: ignore[arg-type]


def expected_epsilon(rounds: list[tuple[float, float]], delta: float) -> float:
    """dp-accounting's RDP accountant over the rounds as they ran, composed one by one."""
    acc = dp_accounting.rdp.RdpAccountant()
    for z, q in rounds:
        event = dp_accounting.GaussianDpEvent(z)
        acc.compose(event if q == 1 else dp_accounting.PoissonSampledDpEvent(q, event))
    return acc.get_epsilon(delta)


def test_the_stricter_of_the_device_and_the_server_applies():
    own = device(min_noise_multiplier=1.0, max_clip=0.5, max_epsilon=20.0, delta=1e-6)
    off = own.settings(MethodConfig())  # a server that announces no DP at all
    assert (off.dp_noise_multiplier, off.dp_clip, off.dp_delta, off.dp_max_epsilon) == \
        (1.0, 0.5, 1e-6, 20.0)
    server = MethodConfig(dp_clip=0.2, dp_noise_multiplier=2.0, dp_delta=1e-5,
                          dp_max_epsilon=10.0)
    got = own.settings(server)
    assert (got.dp_noise_multiplier, got.dp_clip, got.dp_delta, got.dp_max_epsilon) == \
        (2.0, 0.2, 1e-6, 10.0)
    loose = MethodConfig(dp_clip=5.0, dp_noise_multiplier=0.3)
    got = own.settings(loose)
    assert (got.dp_noise_multiplier, got.dp_clip) == (1.0, 0.5)
    assert device().settings(loose) == loose  # no settings of its own: the server's


@pytest.mark.parametrize("own, reason", [
    ({"min_noise_multiplier": 1.0}, "no-clip-bound"),  # noise, but nothing to scale it by
    ({"max_epsilon": 5.0}, "no-noise"),  # a budget the round would pass at once
])
def test_a_round_that_cannot_be_made_private_enough_is_refused(own, reason):
    with pytest.raises(PrivacyRefused) as err:
        device(**own).admit(MethodConfig())
    assert err.value.reason == reason


def test_epsilon_uses_each_rounds_own_noise_and_refuses_past_the_budget():
    own = device(min_noise_multiplier=0.8, max_clip=1.0, max_epsilon=11.0)
    noises = [0.5, 2.0, 1.0]  # the server's, round by round; the device's floor is 0.8
    for r, z in enumerate(noises):
        own.record(r, own.admit(MethodConfig(dp_clip=1.0, dp_noise_multiplier=z)))
    rounds = [(0.8, 1.0), (2.0, 1.0), (1.0, 1.0)]
    assert own.ledger.rounds() == rounds
    assert own.epsilon() == pytest.approx(expected_epsilon(rounds, 1e-5), rel=1e-9)
    # today's noise for every round would be another number: the per-round list is what counts
    assert own.epsilon() != pytest.approx(expected_epsilon([(1.0, 1.0)] * 3, 1e-5))
    with pytest.raises(PrivacyRefused) as err:  # one more at 0.8: 11.33 > 11
        own.admit(MethodConfig(dp_clip=1.0, dp_noise_multiplier=0.5))
    assert err.value.reason == "epsilon-budget"
    ok = own.admit(MethodConfig(dp_clip=1.0, dp_noise_multiplier=20.0))  # tiny: still fits
    assert ok.dp_noise_multiplier == 20.0


def test_sampled_rounds_are_amplified_as_dp_accounting_says():
    ledger = PrivacyLedger(":memory:")
    ledger.record(0, 1.0, 1.0, sampling=0.1)
    ledger.record(1, 1.5, 1.0)
    assert ledger.epsilon(1e-5) == pytest.approx(
        expected_epsilon([(1.0, 0.1), (1.5, 1.0)], 1e-5), rel=1e-9)


def test_accounting_survives_a_restart_of_the_agent(tmp_path):
    cfg = AgentConfig(device_id="dev", work_dir=str(tmp_path / "dev"),
                      privacy=DevicePrivacyConfig(min_noise_multiplier=1.0, max_clip=1.0))
    first = DeviceAgent(cfg)
    for r, z in enumerate([0.0, 3.0]):
        first.privacy.record(r, first.privacy.admit(MethodConfig(dp_noise_multiplier=z,
                                                                 dp_clip=2.0 if z else 0.0)))
    before = first.privacy.epsilon()
    first.privacy.ledger.close()
    again = DeviceAgent(cfg)  # a new process over the same directory
    assert again.privacy.ledger.rounds() == [(1.0, 1.0), (3.0, 1.0)]
    assert again.privacy.epsilon() == before == pytest.approx(
        expected_epsilon([(1.0, 1.0), (3.0, 1.0)], 1e-5), rel=1e-9)


def _update() -> SparseUpdate:
    return SparseUpdate(
        run_id="r", round_idx=0, client_id="dev", num_examples=4, deltas={},
        usage={E00: 0.62, E01: 0.38, E10: 1.0}, importance={E00: 0.27, E01: 0.55, E10: 0.9},
        routed=frozenset({E00, E01, E10}), updated=frozenset({E00}),
        meta=UpdateMeta(loss=2.3456, ib_vs_importance=0.25))


def test_metadata_exact_coarsened_and_withheld():
    exact = device().release(_update())
    assert exact.usage == _update().usage and exact.meta.loss == 2.3456
    assert exact.meta.withheld is None and exact.meta.ib_vs_importance == 0.25
    coarse = device(loss="coarsened", usage="coarsened", importance="coarsened").release(
        _update())
    assert coarse.meta.loss == 2.5  # nearest multiple of 0.5
    assert coarse.usage == pytest.approx({E00: 0.6, E01: 0.3, E10: 1.0})  # floored to 0.1
    assert coarse.importance == pytest.approx({E00: 0.2, E01: 0.5, E10: 0.9})
    assert coarse.routed == {E00} and coarse.meta.ib_vs_importance is None
    gone = device(loss="withheld", usage="withheld", importance="withheld").release(_update())
    assert gone.usage == {} and gone.importance == {} and gone.meta.loss is None
    assert gone.meta.withheld == ["importance", "loss", "usage"]
    assert gone.aggregated(0.5) == {E00}  # withheld usage: every updated expert counts


def test_noised_metadata_moves_within_bounds():
    out = device(loss="noised", usage="noised", importance="noised", stat_noise=0.3,
                 loss_noise=1.0).release(_update())
    assert out.meta.loss != 2.3456 and out.usage != _update().usage
    assert all(0.0 <= v <= 1.0 for v in (*out.usage.values(), *out.importance.values()))
    assert sum(v for e, v in out.usage.items() if e.layer_idx == 0) <= 1.0 + 1e-9
    assert out.meta.withheld is None


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError):
        DevicePrivacyConfig(usage="blurred")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DevicePrivacyConfig(min_noise_multiplier=-1.0)
    assert dataclasses.replace(DevicePrivacyConfig(), loss="withheld").loss == "withheld"


def test_a_count_from_before_the_ledger_enters_it_once_at_the_rounds_noise(tmp_path):
    import json

    work = tmp_path / "dev"
    work.mkdir()
    (work / "agent_state.json").write_text(json.dumps({"dp_rounds": 2, "last_round": 4}))
    cfg = AgentConfig(device_id="dev", work_dir=str(work))
    agent = DeviceAgent(cfg)
    assert agent.privacy.ledger.rounds() == []
    agent.privacy.admit(MethodConfig())  # no noise this round: nothing to account it at yet
    assert agent.privacy.ledger.rounds() == []
    agent.privacy.admit(MethodConfig(dp_clip=1.0, dp_noise_multiplier=1.5))
    assert agent.privacy.ledger.rounds() == [(1.5, 1.0), (1.5, 1.0)]
    state = json.loads((work / "agent_state.json").read_text())
    assert "dp_rounds" not in state and state["last_round"] == 4
    agent.privacy.ledger.close()
    again = DeviceAgent(cfg)
    again.privacy.admit(MethodConfig(dp_clip=1.0, dp_noise_multiplier=1.5))
    assert again.privacy.ledger.rounds() == [(1.5, 1.0), (1.5, 1.0)]  # not twice


def test_a_device_can_demand_secure_aggregation_with_its_own_k():
    strict = device(min_secagg_contributors=4)

    device().admit_secagg({})  # no floor: a plain round is fine
    strict.admit_secagg({"enabled": True, "min_contributors": 5})
    with pytest.raises(PrivacyRefused) as plain:
        strict.admit_secagg({})
    with pytest.raises(PrivacyRefused) as low:
        strict.admit_secagg({"enabled": True, "min_contributors": 3})
    assert (plain.value.reason, low.value.reason) == ("no-secagg", "secagg-k")
    with pytest.raises(ConfigError, match="min_secagg_contributors"):
        DevicePrivacyConfig(min_secagg_contributors=1)
