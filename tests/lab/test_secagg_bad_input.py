"""Bad input to a secure-aggregation round: typed errors, and the round and model intact."""

from __future__ import annotations

import dataclasses
import os

import pytest

from device_agent.secagg import SecAggClient
from hfedmoe.aggregation import AggregationRule
from hfedmoe.errors import AlgorithmError, ReplayError, SecAggError
from hfedmoe.secagg import SecAggConfig, new_keypair
from hfedmoe.secagg_messages import (
    AdvertiseKeys,
    MaskedInput,
    Roster,
    Sealed,
    ShareRelay,
)
from server.secagg import SecAggServer
from tests.lab.secagg_fixtures import global_state, ten_clients
from tests.lab.test_secagg_round import assert_matches_plain

CFG = SecAggConfig(enabled=True, min_contributors=3)
RULE = AggregationRule()


class Round:
    """A round driven phase by phase, so a test can slip bad messages in between."""

    def __init__(self, seen_keys: set[bytes] | None = None) -> None:
        self.state = global_state()
        self.updates = ten_clients(self.state)
        self.server = SecAggServer(CFG, RULE, os.urandom(16),
                                   {k: v.shape for k, v in self.state.items()}, seen_keys)
        self.clients = {u.client_id: SecAggClient(u, RULE, CFG, self.server.round_key)
                        for u in self.updates}
        self.adverts = {c: x.advertise() for c, x in self.clients.items()}

    def advertise(self) -> Roster:
        for ad in self.adverts.values():
            self.server.advertise(ad.to_bytes())
        return Roster.from_bytes(self.server.roster().to_bytes())

    def share(self, roster: Roster) -> dict[str, ShareRelay]:
        for c in self.clients.values():
            self.server.share_keys(c.share_keys(roster).to_bytes())
        return self.server.relays()

    def masked(self, relays, skip=()) -> dict[str, bytes]:
        return {c: x.masked_input(relays[c]).to_bytes() for c, x in self.clients.items()
                if c not in skip}

    def finish(self, masked: dict[str, bytes]):
        for data in masked.values():
            self.server.masked_input(data)
        request = self.server.unmask_request()
        for c in request.survivors:
            self.server.unmask_response(self.clients[c].unmask(request).to_bytes())
        return self.server.finalize(self.state)


def test_malformed_and_replayed_keys_are_refused_and_the_round_goes_on() -> None:
    r = Round()
    ad = r.adverts["c0"]
    bad = [ad.to_bytes()[:30],  # truncated
           dataclasses.replace(ad, round_key=os.urandom(16)).to_bytes(),  # another round's
           dataclasses.replace(ad, enc_public=ad.mask_public).to_bytes()]  # one key twice
    for data in bad:
        with pytest.raises(SecAggError):
            r.server.advertise(data)
    roster = r.advertise()
    with pytest.raises(ReplayError):  # the same advertisement again
        r.server.advertise(ad.to_bytes())

    outcome = r.finish(r.masked(r.share(roster)))

    assert_matches_plain(outcome, r.state, r.updates)


def test_public_key_of_an_earlier_round_is_a_replay() -> None:
    seen: set[bytes] = set()
    first = Round(seen)
    first.advertise()
    second = Round(seen)
    old = first.adverts["c1"]
    replay = AdvertiseKeys(second.server.round_key, "c1", old.enc_public, old.mask_public,
                           old.units)

    with pytest.raises(ReplayError, match="used before"):
        second.server.advertise(replay.to_bytes())


def test_message_with_last_rounds_key_is_a_replay() -> None:
    r = Round()
    roster = r.advertise()
    share = r.clients["c0"].share_keys(roster)

    with pytest.raises(ReplayError, match="round key"):
        r.server.share_keys(dataclasses.replace(share, round_key=os.urandom(16)).to_bytes())


def test_malformed_masks_are_refused_and_the_sum_is_untouched() -> None:
    r = Round()
    masked = r.masked(r.share(r.advertise()))
    good = MaskedInput.from_bytes(masked["c2"])
    unit, vec = good.vectors[0]
    short = dataclasses.replace(good, vectors=((unit, vec[:-1]),) + good.vectors[1:])
    missing = dataclasses.replace(good, vectors=good.vectors[1:])
    for data in (short.to_bytes(), missing.to_bytes(), masked["c2"][:-3]):
        with pytest.raises(SecAggError):
            r.server.masked_input(data)
    r.server.masked_input(masked.pop("c2"))
    with pytest.raises(ReplayError):
        r.server.masked_input(good.to_bytes())

    outcome = r.finish(masked)

    assert_matches_plain(outcome, r.state, r.updates)


def test_malformed_and_wrong_shares_do_not_change_the_result() -> None:
    r = Round()
    masked = r.masked(r.share(r.advertise()))
    for data in masked.values():
        r.server.masked_input(data)
    request = r.server.unmask_request()
    # c3 drops before unmasking: its seeds must be rebuilt from the others' shares
    responses = {c: r.clients[c].unmask(request) for c in request.survivors if c != "c3"}
    liar = responses["c4"]
    garbage = dataclasses.replace(
        liar, seed_shares=tuple((o, u, os.urandom(32)) for o, u, _ in liar.seed_shares),
        own_seeds=tuple((u, os.urandom(32)) for u, _ in liar.own_seeds))
    unasked = dataclasses.replace(liar, key_shares=(("c5", os.urandom(32)),))
    with pytest.raises(SecAggError):
        r.server.unmask_response(liar.to_bytes()[:-5])
    with pytest.raises(SecAggError, match="did not drop"):
        r.server.unmask_response(unasked.to_bytes())
    r.server.unmask_response(garbage.to_bytes())  # well formed, wrong: outvoted at rebuild
    for c, resp in responses.items():
        if c != "c4":
            r.server.unmask_response(resp.to_bytes())

    outcome = r.server.finalize(r.state)

    assert_matches_plain(outcome, r.state, r.updates)


def test_client_sending_plain_and_masked_updates_is_refused_and_left_out() -> None:
    r = Round()
    masked = r.masked(r.share(r.advertise()))
    with pytest.raises(SecAggError, match="plain update"):
        r.server.refuse_plain("c6")
    with pytest.raises(SecAggError, match="plain update"):
        r.server.masked_input(masked.pop("c6"))

    outcome = r.finish(masked)

    assert outcome.dropped == ("c6",)
    assert_matches_plain(outcome, r.state, [u for u in r.updates if u.client_id != "c6"])


def test_tampered_bundle_and_misstated_roster_are_refused_by_the_device() -> None:
    r = Round()
    roster = r.advertise()
    evil = dataclasses.replace(roster, clients=tuple(
        dataclasses.replace(c, mask_public=new_keypair().public) if c.client == "c0" else c
        for c in roster.clients))
    with pytest.raises(SecAggError, match="misstates"):
        r.clients["c0"].share_keys(evil)
    relays = r.share(roster)
    relay = relays["c1"]
    s = relay.shares[0]
    tampered = dataclasses.replace(relay, shares=(Sealed(s.peer, s.blob[:-1] + b"\0"),)
                                   + relay.shares[1:])

    with pytest.raises(SecAggError, match="authentication"):
        r.clients["c1"].masked_input(tampered)


def test_device_refuses_to_reveal_a_unit_below_k() -> None:
    r = Round()
    masked = r.masked(r.share(r.advertise()), skip={"c0", "c1"})
    for data in masked.values():
        r.server.masked_input(data)
    request = r.server.unmask_request()
    assert "e:1:2" not in request.units  # only c2 of c0..c2 is left
    greedy = dataclasses.replace(request, units=request.units + ("e:1:2",))

    with pytest.raises(SecAggError, match="< k"):
        r.clients["c2"].unmask(greedy)


def test_a_non_finite_delta_never_leaves_the_device() -> None:
    state = global_state()
    update = ten_clients(state)[0]
    key = next(k for k in update.deltas if ".experts." in k)
    update.deltas[key][0, 0] = float("nan")
    client = SecAggClient(update, RULE, CFG, os.urandom(16))
    server = SecAggServer(CFG, RULE, client.round_key, {k: v.shape for k, v in state.items()})
    others = [SecAggClient(u, RULE, CFG, client.round_key) for u in ten_clients(state)[1:]]
    for c in [client, *others]:
        server.advertise(c.advertise())
    roster = server.roster()
    for c in [client, *others]:
        server.share_keys(c.share_keys(roster))
    relays = server.relays()

    with pytest.raises(AlgorithmError, match="NaN"):
        client.masked_input(relays[client.client])


def test_a_round_takes_at_most_max_clients() -> None:
    cfg = dataclasses.replace(CFG, max_clients=2)
    state = global_state()
    updates = ten_clients(state)[:3]
    server = SecAggServer(cfg, RULE, os.urandom(16), {k: v.shape for k, v in state.items()})
    clients = [SecAggClient(u, RULE, cfg, server.round_key) for u in updates]
    server.advertise(clients[0].advertise())
    server.advertise(clients[1].advertise())

    with pytest.raises(SecAggError, match="max_clients"):
        server.advertise(clients[2].advertise())
