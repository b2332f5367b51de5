"""server.rounds: participants, the participation record and the metrics rows, on hand-made
values; and the live coordinator and the simulator writing rows of the same shape through them."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
import torch

from hfedmoe.aggregation import ClientReport
from hfedmoe.config import MethodConfig
from hfedmoe.names import ExpertId, expert_key, gate_key
from hfedmoe.privacy import epsilon
from hfedmoe.update import SparseUpdate
from server.rounds import (
    Participation,
    choose_participants,
    dense_update_bytes,
    disagreement_of,
    experts_in,
    held_entry,
    initial_row,
    participation_record,
    round_label,
    round_row,
    selected_sets,
    selection_measures,
    updates_expected,
)

E12, E13, E20 = ExpertId(1, 2), ExpertId(1, 3), ExpertId(2, 0)


def _update(meta: dict, experts=(E12, E13)) -> SparseUpdate:
    deltas = {expert_key(e.layer_idx, e.expert_idx, "w_in"): torch.zeros(2, 2) for e in experts}
    deltas[gate_key(1, "weight")] = torch.zeros(2, 2)  # a gate: not an expert sent
    return SparseUpdate("run", 0, "d", 4, deltas, updated=frozenset(experts), meta=meta)


# --- participants ------------------------------------------------------------------------------
def test_every_online_device_takes_part_at_fraction_one():
    assert choose_participants(["c", "a", "b"], 0, fraction=1.0, seed=7) == ["a", "b", "c"]


def test_participants_are_drawn_by_seed_and_round_alone():
    five = ["a", "b", "c", "d", "e"]
    # ceil(0.4 * 5) = 2, from Random("0:0") / Random("0:1"): pinned, so a resumed run (or a
    # simulation of the same devices) draws the same devices as before
    assert choose_participants(five, 0, fraction=0.4, seed=0) == ["a", "e"]
    assert choose_participants(five, 1, fraction=0.4, seed=0) == ["b", "e"]
    assert choose_participants(five[::-1], 0, fraction=0.4, seed=0) == ["a", "e"]  # any order


def test_over_selection_adds_its_share_and_at_least_one_takes_part():
    five = ["a", "b", "c", "d", "e"]
    assert choose_participants(five, 0, fraction=0.4, seed=0, over_select=0.5) == ["a", "b", "e"]
    assert len(choose_participants(five, 0, fraction=0.4, seed=0, over_select=9.0)) == 5
    assert len(choose_participants(five, 3, fraction=0.01, seed=0)) == 1
    assert choose_participants([], 0, fraction=1.0, seed=0) == []


@pytest.mark.parametrize(("participants", "min_updates", "over_select", "expected"), [
    (4, 0, 0.0, 4),  # every participant
    (4, 3, 0.0, 3),  # k of n
    (6, 0, 0.5, 4),  # over-selected by half: the participants without the extra
    (3, 5, 0.0, 3),  # never more than the participants
    (6, 2, 0.5, 2),  # k of n wins over the over-selection
])
def test_updates_expected(participants, min_updates, over_select, expected):
    assert updates_expected(participants, min_updates, over_select) == expected


# --- the participation record ----------------------------------------------------------------
def test_participation_record_reads_the_update_and_its_plan():
    lat = {"step": {"median": 0.25}}
    update = _update({"steps": 3, "selected": 4, "optimizer_experts": 2, "stopped_by": "plan",
                      "plan": {"limit": "memory", "reason": "2 experts fit"},
                      "budget_limit": "time", "latency": lat, "upload_prev": {"s": 1.5},
                      "ib_vs_importance": 0.25})
    rec = participation_record(5, update, 1234)
    assert rec == Participation(budget=5, experts_sent=2, optimizer_experts=2, bytes=1234,
                                expert_ids=("1:2", "1:3"), steps=3, selected=4, limit="memory",
                                reason="2 experts fit", stopped_by="plan", budget_limit="time",
                                latency={"step": {"median": 0.25}, "upload_prev": {"s": 1.5}},
                                norm=0.0, max_expert_norm=0.0)
    # JSON-ready: the ids as a list, as the store reads them back
    assert rec.info() == {"bytes": 1234, "expert_ids": ["1:2", "1:3"], "steps": 3, "selected": 4,
                          "limit": "memory", "reason": "2 experts fit", "stopped_by": "plan",
                          "budget_limit": "time", "latency": rec.latency,
                          "dp_noise_multiplier": None, "norm": 0.0, "max_expert_norm": 0.0}
    assert held_entry({"round": 0, "client": "d", **rec.to_dict()}) == {
        "budget": 5, "experts_sent": 2, "optimizer_experts": 2, "bytes": 1234,
        "expert_ids": ["1:2", "1:3"], "steps": 3, "selected": 4, "limit": "memory",
        "reason": "2 experts fit", "stopped_by": "plan", "budget_limit": "time", "norm": 0.0,
        "max_expert_norm": 0.0}
    assert disagreement_of(update) == 0.25


def test_participation_record_without_a_plan_or_with_odd_meta():
    big = {"x": "y" * 5000}  # a timing summary too large to keep
    rec = participation_record(1, _update({"optimizer_experts": True, "budget_limit": "quota",
                                           "budget_reason": "3 GB a day", "latency": big,
                                           "ib_vs_importance": "high"}, experts=(E20,)), 9)
    assert (rec.experts_sent, rec.optimizer_experts, rec.steps) == (1, -1, None)
    assert (rec.limit, rec.reason, rec.latency) == ("quota", "3 GB a day", None)
    assert disagreement_of(_update({"ib_vs_importance": "high"})) is None
    assert experts_in(_update({}, experts=(E12, E20))) == {E12, E20}


def test_participation_record_sorts_expert_ids_by_layer_then_expert():
    e = [ExpertId(10, 0), ExpertId(2, 11), ExpertId(2, 3)]  # as strings "10:0" < "2:11" < "2:3"
    rec = participation_record(3, _update({}, experts=e), 1)
    assert rec.expert_ids == ("2:3", "2:11", "10:0") and rec.experts_sent == 3


# --- what the round's clients selected ---------------------------------------------------------
def test_selection_measures_of_three_clients_on_hand_made_sets():
    sets = {"a": {"0:1", "0:2", "1:0", "1:1"}, "b": {"0:1", "0:2"}, "c": {"2:0", "2:1"}}
    # pairs a-b: 2 shared of 4 (Jaccard 1/2), b inside a (coefficient 1); a-c, b-c: disjoint
    assert selection_measures(sets, 48) == {"clients": 3, "jaccard": 1 / 6,
                                            "overlap_coef": 1 / 3, "union": 6,
                                            "coverage": 0.125}


def test_prefixes_of_one_ranking_overlap_fully_by_the_coefficient():
    ranking = ["1:4", "0:0", "2:7", "0:3"]
    sets = {"small": ranking[:1], "mid": ranking[:2], "big": ranking}
    m = selection_measures(sets, 8)
    # Jaccard: mid/big 2/4, small/big 1/4, small/mid 1/2
    assert m == {"clients": 3, "jaccard": (0.5 + 0.25 + 0.5) / 3, "overlap_coef": 1.0,
                 "union": 4, "coverage": 0.5}


def test_selection_measures_with_one_client_empty_sets_or_no_model_size():
    assert selection_measures({"a": {"0:1", "0:2"}}, 16) == {
        "clients": 1, "jaccard": None, "overlap_coef": None, "union": 2, "coverage": 0.125}
    assert selection_measures({}, 16) == {"clients": 0, "jaccard": None, "overlap_coef": None,
                                          "union": 0, "coverage": 0.0}
    # a client that trained no expert (budget 0): Jaccard 0 with a non-empty set, no
    # coefficient; two empty sets: neither
    assert selection_measures({"a": set(), "b": {"0:1"}, "c": set()}, 0) == {
        "clients": 3, "jaccard": 0.0, "overlap_coef": None, "union": 1, "coverage": None}


def test_selected_sets_from_live_and_stored_records():
    records = {"b": {"expert_ids": ["0:1"]}, "a": {"expert_ids": []},
               "old": {"budget": 2}}  # stored before records carried the ids
    assert selected_sets(records) == {"a": [], "b": ["0:1"]}


# --- rows ----------------------------------------------------------------------------------------
def _report(client: str, updated, aggregated, alpha: float) -> ClientReport:
    return ClientReport(client, 4, frozenset(updated), frozenset(updated), frozenset(aggregated),
                        1.0, alpha)


def _row(method: MethodConfig, **over):
    report = {"a": _report("a", {E12, E13}, {E12}, 0.5), "b": _report("b", {E12}, {E12}, 0.5)}
    records = {c: participation_record(3, _update({"steps": 1}, experts), n).to_dict()
               for c, n, experts in (("a", 100, (E12, E13)), ("b", 50, (E12,)))}
    args = dict(participants=["a", "b", "c"], accepted={"a": 100, "b": 50}, report=report,
                metrics={"accuracy": 0.5}, budgets={"a": 3, "b": 3, "c": 2, "z": 9},
                records=records, usage={"a": {E12: 0.5}, "b": {E12: 0.25}},
                disagreement={"a": 0.5, "b": 0.25}, dense_bytes=1000, method=method,
                noised_updates={"a": 2, "b": 1}, aggregation_s=0.25, round_s=3.0, wall_s=4.0,
                num_experts=16, rejected=1, late=2, bytes_out=70, skipped={"c": ["battery 10% < 20%"]})
    return round_row(3, **{**args, **over})


def test_round_row_from_hand_made_values():
    row = _row(MethodConfig(tau=0.3))
    held = {"budget": 3, "optimizer_experts": -1, "steps": 1, "selected": None, "limit": None,
            "reason": None, "stopped_by": None, "budget_limit": None, "norm": 0.0,
            "max_expert_norm": 0.0}
    assert {k: v for k, v in row.items() if k not in ("devices", "signals")} == {
        "round": 3, "phase": "round", "participants": 3, "accepted": 2, "rejected": 1,
        "late": 2, "experts_updated": 1, "bytes_in": 150, "bytes_out": 70,
        "aggregation_s": 0.25, "round_s": 3.0, "wall_s": 4.0, "accuracy": 0.5,
        "budgets": {"a": 3, "b": 3, "c": 2}, "dense_bytes": 2000,
        "held": {"a": {**held, "bytes": 100, "experts_sent": 2, "expert_ids": ["1:2", "1:3"]},
                 "b": {**held, "bytes": 50, "experts_sent": 1, "expert_ids": ["1:2"]}},
        "skipped": {"c": ["battery 10% < 20%"]},
        # a: {1:2, 1:3}, b: {1:2}: Jaccard 1/2, b inside a; 2 of the model's 16 experts
        "selection": {"clients": 2, "jaccard": 0.5, "overlap_coef": 1.0, "union": 2,
                      "coverage": 0.125}}
    assert row["devices"]["a"] == {"routed": ["1:2", "1:3"], "updated": ["1:2", "1:3"],
                                   "aggregated": ["1:2"], "alpha": 0.5, "overlap": 1.0}
    signals = row["signals"]
    assert signals["tau_removed"] == 1 and signals["tau_removed_clients"] == 1
    assert signals["usage_min"] == 0.25 and signals["usage_max"] == 0.5
    assert signals["below_tau"] == 0.5 and signals["ib_disagreement"] == 0.375
    assert "privacy" not in row  # noise off


def test_round_row_reports_epsilon_with_noise_on():
    method = MethodConfig(dp_clip=1.0, dp_noise_multiplier=1.0)
    privacy = _row(method)["privacy"]
    assert privacy["rounds"] == {"a": 2, "b": 1}
    assert privacy["epsilon_max"] == pytest.approx(epsilon(1.0, 2, 1e-5), abs=1e-4)


def test_an_empty_round_and_the_initial_row():
    row = _row(MethodConfig(), accepted={}, report={}, records={}, usage={}, disagreement={})
    assert (row["accepted"], row["bytes_in"], row["dense_bytes"], row["held"]) == (0, 0, 0, {})
    assert row["experts_updated"] == 0 and row["signals"]["ib_disagreement"] == 0.0
    assert row["selection"] == {"clients": 0, "jaccard": None, "overlap_coef": None,
                                "union": 0, "coverage": 0.0}
    initial = initial_row({"accuracy": 0.25})
    assert initial == {"round": -1, "phase": "initial", "accuracy": 0.25}
    assert round_label(initial) == "initial" and round_label(row) == "4"


def test_dense_update_bytes_by_wire_dtype():
    state = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    assert dense_update_bytes(state, "float32") == 68
    assert dense_update_bytes(state, "bfloat16") == 34


# --- both drivers ------------------------------------------------------------------------------
def _coordinator_round(tmp_path) -> list[dict]:
    """One live round over the memory transport: two devices, one expert each."""
    from hfedmoe.models.hf import build_hf_model
    from hfedmoe.transport.chunks import send_blob
    from hfedmoe.transport.memory import MemoryHub
    from hfedmoe.transport.topics import Topics
    from hfedmoe.wire import encode
    from server.config import RoundConfig, ServerConfig
    from server.coordinator import Coordinator

    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    cfg = ServerConfig(run_id="keys", run_dir=str(tmp_path),
                       rounds=RoundConfig(rounds=1, deadline_s=60, min_devices=2,
                                          registration_timeout_s=30))
    hub = MemoryHub()
    coordinator = Coordinator(cfg, hub.connect("server"), model, None)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rows=coordinator.run()))
    thread.start()
    topics, rounds = Topics("keys"), []
    devices = {d: hub.connect(d) for d in ("a", "b")}
    acks: dict[str, list] = {d: [] for d in devices}
    try:
        for d, t in devices.items():
            t.subscribe(topics.ack(d), lambda m, d=d: acks[d].append(json.loads(m.payload)))
            t.subscribe(topics.round(), lambda m: rounds.append(json.loads(m.payload)))
            t.publish(topics.status(d), b'{"state": "online"}', retain=True)
            while not any(a.get("type") == "registered" for a in acks[d]):
                t.publish(topics.register(d), json.dumps({"budget": 2, "report": {}}).encode())
                t.run_until(lambda d=d: bool(acks[d]), 1.0)
        devices["a"].run_until(lambda: any(r.get("type") == "round" for r in rounds), 30)
        ann = [r for r in rounds if r.get("type") == "round"][0]
        for d, t in devices.items():
            delta = {k: torch.full_like(v, 0.5) for k, v in model.expert_state(E12).items()}
            blob = encode(SparseUpdate("keys", 0, d, 4, delta, usage={E12: 0.5},
                                       importance={E12: 0.5}, routed=frozenset({E12}),
                                       updated=frozenset({E12}),
                                       base_model_hash=ann["model"]["state_hash"],
                                       meta={"steps": 1, "ib_vs_importance": 0.5}), 0.01)
            sha = hashlib.sha256(blob).hexdigest()
            send_blob(t, topics.update(d, sha), blob)
            t.run_until(lambda d=d, sha=sha: any(a.get("sha") == sha for a in acks[d]), 30)
    finally:
        thread.join(60)
        coordinator.close()
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_the_coordinator_and_the_simulator_write_rows_of_the_same_shape(
        tmp_path, minilm_available, monkeypatch):
    if not minilm_available:
        pytest.skip("assets extra not installed")
    import server.rounds
    from hfedmoe.config import from_dict
    from lab import simulate as lab_simulate
    from server import coordinator as server_coordinator
    from server.config import ServerConfig

    built = []

    def spy(*args, **kwargs):
        built.append(kwargs["participants"])
        return server.rounds.round_row(*args, **kwargs)

    monkeypatch.setattr(server_coordinator, "round_row", spy)
    monkeypatch.setattr(lab_simulate, "round_row", spy)
    live = _coordinator_round(tmp_path / "live")
    cfg = from_dict(ServerConfig, {
        "run_dir": str(tmp_path / "sim"), "max_eval_examples": 8,
        "model": {"num_experts": 2, "top_k": 1, "max_length": 32},
        "train": {"batch_size": 8, "max_steps": 1, "threads": 1},
        "rounds": {"rounds": 1, "train_time_s": 5.0}})
    sim = lab_simulate.simulate(cfg, 2, ["phone-midrange-6gb", "jetson-orin-nano-8gb"],
                                measure_repeats=1)
    assert built == [["a", "b"], ["sim000-phone-midrange-6gb", "sim001-jetson-orin-nano-8gb"]]

    def shape(rows):  # keys of the initial and the round row, evaluation keys aside
        initial, row = rows
        evaluation = set(initial) - {"time", "round", "phase"}
        return (set(initial) - evaluation, set(row) - evaluation,
                {frozenset(h) for h in row["held"].values()}, set(row["signals"]),
                set(row["selection"]))

    assert [r["round"] for r in live] == [r["round"] for r in sim] == [-1, 0]
    assert shape(live) == shape(sim)
    assert live[1]["accepted"] == sim[1]["accepted"] == 2
    # each live device sent expert 1:2 alone (the store's record read back); the tiny model
    # has 2 MoE layers of 4 experts
    assert [h["expert_ids"] for h in live[1]["held"].values()] == [["1:2"], ["1:2"]]
    assert live[1]["selection"] == {"clients": 2, "jaccard": 1.0, "overlap_coef": 1.0,
                                    "union": 1, "coverage": 1 / 8}
    for h in sim[1]["held"].values():
        assert h["experts_sent"] == len(h["expert_ids"])
    assert sim[1]["selection"]["clients"] == 2


# --- the global routing prior and the evaluation schedule ---------------------------------------
def test_the_routing_prior_is_the_data_weighted_usage_folded_into_the_last_one():
    from server.rounds import routing_prior

    e0, e1 = ExpertId(0, 0), ExpertId(0, 1)
    first = routing_prior({}, {"a": {e0: 0.6, e1: 0.2}, "b": {e0: 0.0}}, {"a": 3, "b": 1})
    assert first == {e0: pytest.approx(0.45), e1: pytest.approx(0.2)}
    second = routing_prior(first, {"c": {e0: 0.05, ExpertId(1, 0): 0.3}}, {"c": 10}, keep=0.5)
    assert second[e0] == pytest.approx(0.25)  # half the old, half this round's
    assert second[e1] == pytest.approx(0.2)  # nobody reported it: kept
    assert second[ExpertId(1, 0)] == pytest.approx(0.3)  # new: this round's
    assert routing_prior(first, {"d": {e0: float("nan")}}, {}) == first  # NaN never enters


@pytest.mark.parametrize("every, evaluated", [
    (1, list(range(12))),
    (5, [4, 7, 8, 9, 10, 11]),  # every 5th and the last 5
    (100, [7, 8, 9, 10, 11]),
])
def test_rounds_evaluated(every, evaluated):
    from server.rounds import evaluates

    assert [r for r in range(12) if evaluates(r, 12, every)] == evaluated


def test_epsilon_counts_the_noise_each_update_reported():
    from hfedmoe.privacy import epsilon_of_rounds
    from server.rounds import noised_updates

    records = [{"client": "a", "dp_noise_multiplier": 0.8}, {"client": "a"},
               {"client": "b", "dp_noise_multiplier": 2.0},
               {"client": "c", "dp_noise_multiplier": 0.0}]
    assert noised_updates(records, 1.0) == {"a": [0.8, 1.0], "b": [2.0]}
    assert noised_updates(records, 0.0) == {"a": [0.8], "b": [2.0]}
    # the server announced no noise; the devices added their own: still reported
    privacy = _row(MethodConfig(), noised_updates=noised_updates(records, 0.0))["privacy"]
    assert privacy["rounds"] == {"a": 1, "b": 1}
    assert privacy["epsilon"]["a"] == pytest.approx(
        epsilon_of_rounds([(0.8, 1.0)], 1e-5), abs=1e-4)
    mixed = _row(MethodConfig(dp_clip=1.0, dp_noise_multiplier=1.0),
                 noised_updates=noised_updates(records, 1.0))["privacy"]
    assert mixed["epsilon"]["a"] == pytest.approx(
        epsilon_of_rounds([(0.8, 1.0), (1.0, 1.0)], 1e-5), abs=1e-4)
