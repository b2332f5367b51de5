"""The demo's console lines say how the devices' trained sets overlap in each round."""

from __future__ import annotations

from lab.launch import _progress


def _row(selection):
    return {"round": 1, "phase": "round", "accuracy": 0.5, "accepted": 3, "participants": 3,
            "experts_updated": 20, "bytes_in": 2_000_000, "dense_bytes": 8_000_000,
            "bytes_out": 1_000_000, "selection": selection}


def test_a_round_line_gives_the_jaccard_overlap_and_the_distinct_experts():
    line = _progress(_row({"clients": 3, "jaccard": 0.3125, "union": 22}), 3)
    assert line.startswith("round 2/3: accuracy 0.500")
    assert "trained sets: Jaccard 0.31, 22 distinct experts" in line
    assert "25% of the 8 MB dense" in line


def test_a_round_with_one_device_has_no_overlap_to_give():
    line = _progress(_row({"clients": 1, "jaccard": None, "union": 5}), 3)
    assert "trained sets: -, 5 distinct experts" in line
