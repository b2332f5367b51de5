"""benchmarks.learning without running a study: its round rows keep what each device
selected and the round's overlap, its summary their means, and settings that make no sense
are refused before anything is measured."""

from __future__ import annotations

import pytest

from benchmarks import learning
from hfedmoe.errors import ConfigError


def _sim_rows(sets_by_round: list[dict[str, list[str]]], num_experts: int = 8) -> list[dict]:
    """A simulation's metrics rows as :func:`lab.simulate.simulate` returns them (only the
    keys the study reads), one round per entry of ``sets_by_round``."""
    from server.rounds import selection_measures

    rows = [{"round": -1, "phase": "initial", "accuracy": 0.25, "loss": 2.0}]
    for r, sets in enumerate(sets_by_round):
        rows.append({"round": r, "phase": "round", "accuracy": 0.5 + 0.125 * r, "loss": 1.0,
                     "bytes_in": 100, "round_s": 2.0, "wall_s": 3.0, "experts_updated": 2,
                     "budgets": {d: 2 for d in sets}, "signals": {"below_tau": 0.0},
                     "held": {d: {"budget": 2, "expert_ids": s} for d, s in sets.items()},
                     "selection": selection_measures(sets, num_experts)})
    return rows


ROUNDS = [{"a": ["0:1", "0:2"], "b": ["0:1"]},  # Jaccard 1/2, coefficient 1, 2 of 8
          {"a": ["0:1"], "b": ["1:1"]}]  # disjoint: 0 and 0, 2 of 8


def test_study_rows_keep_each_devices_set_and_the_rounds_overlap():
    rows = learning.study_rows(_sim_rows(ROUNDS), "hfedmoe", 0.5, 3, 12.0)
    assert [r["round"] for r in rows] == [-1, 0, 1]
    assert rows[0]["selected"] == {} and rows[0]["selection"] == {}
    assert rows[1]["selected"] == {"a": ["0:1", "0:2"], "b": ["0:1"]}
    assert rows[1]["selection"] == {"clients": 2, "jaccard": 0.5, "overlap_coef": 1.0,
                                    "union": 2, "coverage": 0.25}
    # the keys the study wrote before stay
    assert {"bench", "kind", "strategy", "alpha", "seed", "round", "accuracy", "loss",
            "bytes_in", "cum_bytes_in", "round_s", "cum_emulated_s", "wall_s",
            "experts_updated", "budgets", "signals", "held", "run_wall_s"} <= set(rows[1])
    assert (rows[2]["cum_bytes_in"], rows[2]["cum_emulated_s"]) == (200, 4.0)


def test_summary_has_each_strategys_overlap_and_coverage_over_rounds():
    rows = [r for seed in (0, 1) for s, sets in (("hfedmoe", ROUNDS), ("fedmoe", ROUNDS[:1] * 2))
            for r in learning.study_rows(_sim_rows(sets), s, 0.5, seed, 1.0)]
    summary = {r["strategy"]: r for r in learning.summarize(rows, ["hfedmoe", "fedmoe"],
                                                            0.5, 0.9)}
    assert summary["hfedmoe"]["selection_mean"] == {"jaccard": 0.25, "overlap_coef": 0.5,
                                                    "union": 2.0, "coverage": 0.25}
    assert summary["fedmoe"]["selection_mean"] == {"jaccard": 0.5, "overlap_coef": 1.0,
                                                   "union": 2.0, "coverage": 0.25}
    assert learning.selection_mean([{"selection": {"jaccard": None, "union": 1}}]) == {
        "union": 1.0}


def _args(*argv: str):
    args = learning.build_parser().parse_args(list(argv))
    learning.resolve_defaults(args)
    return args


def test_study_settings_are_checked_and_parsed():
    alphas, seeds, strategies = learning.check_args(_args(
        "--alphas", "0.5,0.1", "--seeds", "0,4", "--strategies", "hfedmoe,fedmoe+lora",
        "--fraction", "0.2", "--devices", "30"))
    assert (alphas, seeds, strategies) == ([0.5, 0.1], [0, 4], ["hfedmoe", "fedmoe+lora"])
    args = _args("--fraction", "0.2")
    args.train_time_s = 600.0  # main resolves "auto" or the number before any run
    cfg = learning.server_config(args, "hfedmoe", 0.5, 4, "/tmp/x")
    assert cfg.rounds.fraction == 0.2 and cfg.rounds.seed == cfg.data.seed == 4


@pytest.mark.parametrize(("argv", "match"), [
    (["--seeds", "0,-1"], r"--seeds must be >= 0, got 0,-1"),
    (["--seeds", "0,0"], r"--seeds repeats a seed"),
    (["--seeds", "one"], r"--seeds wants a comma list of ints, got 'one'"),
    (["--fraction", "0"], r"--fraction .* must be in \(0, 1\], got 0.0"),
    (["--fraction", "1.5"], r"--fraction \(the share of the 10 devices .*\) must be in"),
    (["--devices", "0"], r"--devices must be >= 1 \(the clients\), got 0"),
    (["--devices", "-2"], r"--devices must be >= 1 \(the clients\), got -2"),
    (["--alphas", "0.5,0"], r"--alphas must be > 0"),
    (["--rounds", "0"], r"--rounds must be >= 1, got 0"),
    (["--strategies", "hfedmoe,fedprox"], r"unknown strategy 'fedprox'"),
    (["--strategies", "hfedmoe+qlora"], r"unknown strategy 'hfedmoe\+qlora'"),
    (["--strategies", "hfedmoe@gamma=1"], r"'gamma=1' is not method_key=value"),
    (["--strategies", "hfedmoe@beta=high"], r"method.beta wants a float, got 'high'"),
    (["--strategies", "hfedmoe@tau=2"], r"method.tau must be in \[0, 1\]"),
    (["--strategies", "hfedmoe@specificity=-1"], r"method.specificity must be"),
    (["--eval-every", "0"], r"--eval-every must be >= 1"),
    (["--budget-share", "1.5"], r"--budget-share must be in \[0, 1\]"),
    (["--split", "validation"], r"--split validation needs --validation-fraction > 0"),
])
def test_a_study_setting_that_makes_no_sense_is_a_config_error(argv, match):
    with pytest.raises(ConfigError, match=match):
        learning.main(argv)  # refused before anything is measured



def test_stored_rows_run_with_different_settings_are_summarized_apart(tmp_path):
    """``--from-rows`` over one file holding a learning-rate sweep: one summary row per
    setting, each with its own settings and its own runs' accuracy."""
    import json

    from benchmarks._common import read_rows

    stored = tmp_path / "rounds.jsonl"
    with stored.open("w") as f:
        for lr, shift in ((0.1, 0.0), (1.0, 0.25)):
            for seed in (0, 1):
                for r in learning.study_rows(_sim_rows(ROUNDS), "hfedmoe", 0.1, seed, 1.0):
                    if r["round"] >= 0:
                        r["accuracy"] += shift
                    r.update(settings={"lr": lr, "optimizer": "sgd"}, profiles=["p"])
                    f.write(json.dumps(r) + "\n")
    out = tmp_path / "summary.jsonl"
    assert learning.main(["--from-rows", str(stored), "--all-seeds", "--out", str(out)]) == 0
    summary = [r for r in read_rows(out) if r.get("kind") == "summary"]
    assert [(r["settings"]["lr"], r["seeds"]) for r in summary] == [(0.1, [0, 1]),
                                                                    (1.0, [0, 1])]
    # rounds 0 and 1 at 0.5 and 0.625: the last-5 mean of two rounds, then +0.25
    assert [r["last5_accuracy_mean"] for r in summary] == [0.5625, 0.8125]
    assert not (tmp_path / "summary.png").exists()  # no curve mixes two settings


def test_an_arm_run_at_one_alpha_only_is_summarized_at_that_alpha():
    """Controls run at Dirichlet 0.1 only, next to the four strategies at 0.1 and 0.5 in one
    file: each alpha's summary has the arms that ran there, and the paired differences."""
    rows = [r for alpha, arms in ((0.1, ("hfedmoe", "budget-zero")), (0.5, ("hfedmoe",)))
            for s in arms for seed in (0, 1)
            for r in learning.study_rows(_sim_rows(ROUNDS), s, alpha, seed, 1.0)]
    summary = learning.summarize(rows, ["hfedmoe", "budget-zero"], None, 0.9)
    assert [(r["alpha"], r["strategy"]) for r in summary] == [
        (0.1, "hfedmoe"), (0.1, "budget-zero"), (0.5, "hfedmoe")]
    assert summary[1]["hfedmoe_minus_this"] == 0.0  # the same rows: paired difference 0
