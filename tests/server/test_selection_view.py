"""The report's selection view on hand-made round rows: the sets from the participation
records, or from the aggregation report in rows written before records carried them."""

from __future__ import annotations

from server.selection_view import (
    matrix,
    measures_row,
    round_measures,
    round_sets,
    selection_section,
)

NEW = {"round": 4, "phase": "round",
       "held": {"b": {"expert_ids": ["0:2", "1:0"]}, "a": {"expert_ids": ["0:2"]}},
       "devices": {"a": {"updated": ["9:9"]}},  # the records win
       "selection": {"clients": 2, "jaccard": 0.5, "overlap_coef": 1.0, "union": 2,
                     "coverage": 0.25}}
OLD = {"round": 0, "phase": "round", "held": {"a": {"budget": 2}, "b": {"budget": 1}},
       "devices": {"b": {"updated": ["0:1", "0:2", "1:0"]}, "a": {"updated": ["1:1"]}}}


def test_sets_come_from_the_records_else_from_the_aggregation_report():
    assert round_sets(NEW) == {"a": ["0:2"], "b": ["0:2", "1:0"]}
    assert round_sets(OLD) == {"a": ["1:1"], "b": ["0:1", "0:2", "1:0"]}
    assert round_sets({"round": 1, "phase": "round"}) == {}


def test_measures_are_the_rows_else_measured_without_coverage():
    assert round_measures(NEW) == NEW["selection"]
    # a and b share nothing: Jaccard 0 and coefficient 0 over the one pair; 4 experts
    assert round_measures(OLD) == {"clients": 2, "jaccard": 0.0, "overlap_coef": 0.0,
                                   "union": 4, "coverage": None}
    assert measures_row(NEW) == ["5", "2", "0.500", "1.000", "2", "25.0%"]
    assert measures_row(OLD) == ["1", "2", "0.000", "0.000", "4", "-"]


def test_matrix_marks_each_devices_experts_and_counts_them():
    table = matrix({"a": ["0:2"], "b": ["0:2", "1:0"]}, ["0:2", "1:0", "1:1"])
    assert "<td>a</td><td class='e'>■</td><td class='e'></td><td class='e'></td>" in table
    assert "<td>b</td><td class='e'>■</td><td class='e'>■</td><td class='e'></td>" in table
    assert "<td>devices</td><td class='e'>2</td><td class='e'>1</td><td class='e'>0</td>" in table


def test_no_section_without_a_trained_expert():
    initial = {"round": -1, "phase": "initial"}
    assert selection_section([initial, {"round": 0, "phase": "round", "held": {}}]) == ""
    assert "Round 1" in selection_section([initial, OLD])
