"""A secure-aggregation round in one process: same model as plain aggregation of the surviving
clients, nothing revealed below k, dropouts, and bad input that leaves the round intact."""

from __future__ import annotations

import os

import pytest
import torch

from device_agent.secagg import SecAggClient
from hfedmoe.aggregation import AggregationRule, aggregate
from hfedmoe.names import ExpertId
from hfedmoe.secagg import SecAggConfig, unit_of
from hfedmoe.secagg_messages import (
    MaskedInput,
    Roster,
)
from lab.secagg import run_secure_round
from server.secagg import SecAggServer
from tests.lab.secagg_fixtures import global_state, make_update, ten_clients

CFG = SecAggConfig(enabled=True, min_contributors=3)
RULE = AggregationRule()


def assert_matches_plain(outcome, state, updates, rule=RULE) -> None:
    """Revealed units equal plain aggregation of ``updates`` (float tolerance); every other
    key keeps its global tensor bit for bit."""
    plain = aggregate(state, updates, rule)
    for key, ref in state.items():
        if unit_of(key) in outcome.revealed:
            torch.testing.assert_close(outcome.state[key], plain[key], atol=1e-6, rtol=0)
        else:
            assert torch.equal(outcome.state[key], ref), key


def test_ten_clients_two_dropping_before_unmask_equal_plain_aggregation() -> None:
    state = global_state()
    updates = ten_clients(state)

    outcome, _ = run_secure_round(updates, state, RULE, CFG, drop_before_unmask={"c3", "c8"})

    # dropping after the masked input arrived: their updates still count
    assert outcome.survivors == tuple(f"c{i}" for i in range(10)) and outcome.dropped == ()
    assert_matches_plain(outcome, state, updates)
    assert outcome.revealed["e:0:0"] == 9  # c9's usage of 0:0 is below tau: not a contributor


def test_clients_dropping_before_their_masked_input_are_left_out() -> None:
    state = global_state()
    updates = ten_clients(state)

    outcome, _ = run_secure_round(updates, state, RULE, CFG, drop_before_input={"c0", "c7"})

    assert outcome.dropped == ("c0", "c7")
    assert_matches_plain(outcome, state, [u for u in updates if u.client_id not in ("c0", "c7")])
    # 1:2 was trained by c0, c1, c2: two left, below k, not revealed (and nobody was asked)
    assert outcome.withheld["e:1:2"] == "below-k-after-dropout"


def test_expert_below_k_is_never_sent_or_revealed() -> None:
    state = global_state()
    updates = ten_clients(state)
    server = SecAggServer(CFG, RULE, os.urandom(16), {k: v.shape for k, v in state.items()})
    clients = [SecAggClient(u, RULE, CFG, server.round_key) for u in updates]
    for c in clients:
        server.advertise(c.advertise().to_bytes())
    roster = Roster.from_bytes(server.roster().to_bytes())
    for c in clients:
        server.share_keys(c.share_keys(roster).to_bytes())
    relays = server.relays()
    masked = [MaskedInput.from_bytes(c.masked_input(relays[c.client]).to_bytes())
              for c in clients]
    for m in masked:
        server.masked_input(m)

    # 0:3 (two trainers) and 1:3 (one): in no roster unit, no masked vector, no sum
    assert {u.unit for u in roster.units}.isdisjoint({"e:0:3", "e:1:3"})
    assert all(u not in ("e:0:3", "e:1:3") for m in masked for u, _ in m.vectors)
    assert server.withheld == {"e:0:3": "below-k", "e:1:3": "below-k"}
    request = server.unmask_request()
    assert "e:0:3" not in request.units


@pytest.mark.parametrize("rule", [AggregationRule("usage-threshold", "importance-size", 0.01),
                                  AggregationRule("data-size", "data-size", 0.0)])
def test_other_weightings_equal_plain_aggregation(rule) -> None:
    state = global_state()
    updates = ten_clients(state)

    outcome, _ = run_secure_round(updates, state, rule, CFG, drop_before_input={"c5"})

    assert_matches_plain(outcome, state, [u for u in updates if u.client_id != "c5"], rule)


def test_gate_fallback_to_data_size_when_no_client_has_gate_mass() -> None:
    state = global_state()
    updates = [make_update(f"c{i}", [ExpertId(0, 0)], state, seed=i) for i in range(4)]
    updates = [type(u)(**{**u.__dict__, "importance": {}}) for u in updates]  # P(c) = 0

    outcome, _ = run_secure_round(updates, state, RULE, CFG)

    assert "k:layers.0.gate.weight" in outcome.revealed
    assert_matches_plain(outcome, state, updates)


def test_too_many_dropouts_withhold_the_units_and_keep_the_model() -> None:
    state = global_state()
    updates = ten_clients(state)

    # t = 7 of 9 holders; 2 gone before input and 2 before unmask leave 6 responders
    outcome, _ = run_secure_round(updates, state, RULE, CFG, drop_before_input={"c0", "c1"},
                                  drop_before_unmask={"c2", "c3"})

    assert outcome.revealed == {}
    assert set(outcome.withheld.values()) >= {"unrecoverable"}
    assert all(torch.equal(outcome.state[k], v) for k, v in state.items())
