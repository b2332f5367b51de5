"""The dashboard's "Experts trained" section of ``api/state`` from hand-made metrics rows: the
last closed round's device x expert matrix and measures, the recent rounds' series, and the
bounds that keep a large fleet's snapshot small."""

from __future__ import annotations

import json
from types import SimpleNamespace

from server.config import RoundConfig, ServerConfig
from server.dashboard import Dashboard
from server.dashboard.selection import MAX_DEVICES, SERIES_ROUNDS, ExpertsTrained
from server.store import Store
from tests.server.run_dir import write_run

EMPTY = {"clients": 0, "jaccard": None, "overlap_coef": None, "union": 0, "coverage": 0.0}


def round_row(idx: int, sets: dict[str, list[str]], **selection) -> dict:
    return {"round": idx, "phase": "round",
            "held": {d: {"budget": 2, "expert_ids": ids} for d, ids in sets.items()},
            "selection": {**EMPTY, **selection}}


def test_the_snapshot_shows_the_last_closed_round_and_the_series(tmp_path):
    write_run(tmp_path)  # round 0: phone 0:1 1:2, laptop 0:1; round 1: phone 0:1 1:3
    store = Store(tmp_path)
    c = SimpleNamespace(cfg=ServerConfig(run_id="two", run_dir=str(tmp_path),
                                         rounds=RoundConfig(rounds=3)),
                        store=store, round=None, next_round=2, clock=lambda: 1.0,
                        strategy=SimpleNamespace(name="hfedmoe"), hooks=[])
    d = Dashboard(c, port=0)
    try:
        d.hook("start")
        sel = json.loads(d.state_bytes())["selection"]
        assert (sel["round"], sel["devices"], sel["experts"]) == (1, {"phone": ["0:1", "1:3"]},
                                                                  ["0:1", "1:3"])
        assert sel["measures"] == {"clients": 1, "jaccard": None, "overlap_coef": None,
                                   "union": 2, "coverage": 0.125}
        assert (sel["devices_total"], sel["devices_more"], sel["experts_more"]) == (1, 0, 0)
        assert [(p["round"], p["jaccard"], p["union"], p["coverage"]) for p in sel["series"]] \
            == [(0, 0.5, 2, 0.125), (1, None, 2, 0.125)]
        # the next round closes: its row is read on the next snapshot
        with open(tmp_path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(round_row(2, {"laptop": ["1:0"], "phone": ["0:1", "1:0"]},
                                          clients=2, jaccard=0.5, overlap_coef=1.0, union=2,
                                          coverage=0.125)) + "\n")
        d.hook("close")
        sel = json.loads(d.state_bytes())["selection"]
        assert sel["round"] == 2 and sel["experts"] == ["0:1", "1:0"]
        assert sel["devices"] == {"laptop": ["1:0"], "phone": ["0:1", "1:0"]}
        assert [p["round"] for p in sel["series"]] == [0, 1, 2]
    finally:
        store.close()


def test_before_any_round_the_section_is_empty():
    state = ExpertsTrained()
    state.add({"round": -1, "phase": "initial", "accuracy": 0.5})
    assert state.state() == {"round": None, "devices": {}, "experts": [],
                             "measures": dict.fromkeys(EMPTY), "devices_total": 0,
                             "devices_more": 0, "experts_more": 0, "series": []}


def test_a_round_without_records_shows_its_measures_and_no_matrix():
    state = ExpertsTrained()
    state.add(round_row(0, {"a": ["0:0"], "b": ["0:0", "1:1"]}, clients=2, jaccard=0.5,
                        overlap_coef=1.0, union=2, coverage=0.5))
    state.add({"round": 1, "phase": "round", "held": {}, "devices": {}, "selection": EMPTY})
    s = state.state()
    assert (s["round"], s["devices"], s["experts"], s["measures"]) == (1, {}, [], EMPTY)
    assert [(p["round"], p["clients"], p["union"]) for p in s["series"]] == [(0, 2, 2),
                                                                             (1, 0, 0)]


def test_the_matrix_is_capped_and_counts_what_it_leaves_out():
    sets = {f"dev-{i:05d}": [f"{i % 4}:{i % 3}", "0:0"] for i in range(10_000)}
    state = ExpertsTrained()
    state.add(round_row(7, sets, clients=10_000, jaccard=0.3, overlap_coef=0.6, union=12,
                        coverage=1.0))
    s = state.state()
    assert list(s["devices"]) == sorted(sets)[:MAX_DEVICES]  # the first devices by id
    assert (s["devices_total"], s["devices_more"]) == (10_000, 10_000 - MAX_DEVICES)
    assert s["devices"]["dev-00005"] == ["0:0", "1:2"]  # by layer, then expert
    assert s["measures"]["clients"] == 10_000  # the whole round's, not the shown devices'
    assert len(json.dumps(s)) < 10_000  # 64 rows, not 10,000
    # and the columns: the first experts by layer, the devices' ids cut to them
    small = ExpertsTrained(max_devices=2, max_experts=2)
    small.add(round_row(0, {"a": ["1:0", "0:3"], "b": ["2:1", "0:1"], "c": ["5:5"]}))
    s = small.state()
    assert s["experts"] == ["0:1", "0:3"] and s["experts_more"] == 2
    assert s["devices"] == {"a": ["0:3"], "b": ["0:1"]} and s["devices_more"] == 1


def test_the_series_keeps_the_last_rounds_and_unreadable_rows_are_skipped():
    state = ExpertsTrained()
    for i in range(SERIES_ROUNDS + 5):
        state.add(round_row(i, {"a": [f"0:{i}"]}, clients=1, union=1, coverage=0.25))
    state.add({"round": 99, "phase": "round", "held": "not records"})  # unreadable: skipped
    state.add({"phase": "round", "held": {}})  # no round index: skipped
    s = state.state()
    assert [p["round"] for p in s["series"]] == list(range(5, SERIES_ROUNDS + 5))
    assert s["round"] == SERIES_ROUNDS + 4 and s["devices"] == {"a": [f"0:{SERIES_ROUNDS + 4}"]}


def test_ids_that_are_not_experts_stay_out_of_the_grid():
    state = ExpertsTrained()
    state.add(round_row(0, {"<b>x</b>": ["0:1", "<script>", "-1:2"]},
                        jaccard=float("nan")))
    s = state.state()
    assert s["devices"] == {"<b>x</b>": ["0:1"]} and s["experts"] == ["0:1"]
    assert s["measures"]["jaccard"] is None  # not finite: unknown (api/state is strict JSON)
