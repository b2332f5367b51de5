"""benchmarks.poisoning: its statistics on hand-made rows, and a short run end to end."""

from __future__ import annotations

import json

import pytest

from benchmarks import poisoning
from benchmarks.tables import REGIONS
from hfedmoe.errors import ConfigError


def _run(seed: int, attack: str, defence: str, acc: float, rejected: int = 0) -> dict:
    return {"seed": seed, "attack": attack, "attackers": 0 if attack == "none" else 1,
            "defence": defence, "final_accuracy": acc, "rejected": rejected}


def test_the_summary_pairs_each_arm_with_the_no_attack_run_of_its_seed():
    runs = [_run(0, "none", "none", 0.80), _run(1, "none", "none", 0.70),
            _run(0, "scale:10", "none", 0.50), _run(1, "scale:10", "none", 0.30),
            _run(0, "scale:10", "all", 0.80, 3), _run(1, "scale:10", "all", 0.69, 3),
            _run(0, "none", "all", 0.85), _run(1, "none", "all", 0.75)]

    summary = {(s["attack"], s["defence"]): s for s in poisoning.summarize(runs)}

    attacked = summary[("scale:10", "none")]
    assert attacked["final_accuracy"] == 0.4 and attacked["diff_pt"] == -35.0
    # differences -30 and -40: mean -35, sd 7.07, t(1) = 12.706 -> half-width 63.53
    assert attacked["diff_ci95_pt"] == pytest.approx(63.53, abs=0.01)
    assert not attacked["within_target"]
    defended = summary[("scale:10", "all")]
    assert defended["diff_pt"] == -0.5 and defended["within_target"]
    assert defended["rejected"] == 6 and defended["seeds"] == [0, 1]
    # against the honest run with the same defences: -5 and -6 points
    assert defended["same_defence_pt"] == -5.5
    assert "same_defence_pt" not in attacked  # no honest run without defences besides the base
    assert "same_defence_pt" not in summary[("none", "all")]


def test_bounds_come_from_the_largest_honest_norms_and_attackers_from_budgets():
    rows = [{"phase": "initial"},
            {"phase": "round", "held": {"a": {"norm": 2.0, "max_expert_norm": 0.5},
                                        "b": {"norm": 3.0, "max_expert_norm": 0.25}},
             "budgets": {"sim000-x": 2, "sim001-y": 9, "sim002-z": 9}}]
    assert poisoning.honest_bounds(rows, 1.5) == {"max_update_norm": 4.5,
                                                  "max_expert_norm": 0.75}
    assert poisoning.attackers_of(rows, 1) == [1]
    assert poisoning.attackers_of(rows, 2) == [1, 2]


@pytest.mark.parametrize("argv", [["--arms", "none,median"], ["--attacks", "flip:3"],
                                  ["--seeds", "100"], ["--attackers", "10"]])
def test_settings_that_make_no_sense_are_refused_before_anything_runs(argv):
    with pytest.raises(ConfigError):
        poisoning.parse(argv)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three short simulations; minutes on a loaded 2-core machine
def test_a_quick_run_rejects_the_attacker_and_fills_the_table(tmp_path, minilm_available):
    if not minilm_available:
        pytest.skip("the MiniLM assets wheel is not installed")
    out = tmp_path / "poisoning.jsonl"

    assert poisoning.main(["--quick", "--out", str(out)]) == 0

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    runs = {(r["attack"], r["defence"]): r for r in rows if r["kind"] == "run"}
    assert set(runs) == {("none", "none"), ("scale:10", "reject")}
    # x10 is far over bounds of 1.5 x the honest norms: refused in the one round; the honest
    # run refuses nothing
    assert runs[("scale:10", "reject")]["rejected"] == 1
    assert runs[("none", "none")]["rejected"] == 0
    assert all(0.0 <= r["final_accuracy"] <= 1.0 for r in runs.values())
    [calib] = [r for r in rows if r["kind"] == "calibration"]
    assert calib["bounds"]["max_update_norm"] > 0 and calib["bounds"]["max_expert_norm"] > 0
    table = REGIONS["poisoning"].render([r for r in rows if r["kind"] != "run"])
    assert "| scale:10 | 1 | reject |" in table and "Norm bounds" in table
