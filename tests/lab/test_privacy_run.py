"""Differential privacy as a run shows it: epsilon per device after every round, and a device
whose next noised update would pass ``method.dp_max_epsilon`` sits the round out."""

from __future__ import annotations

import pytest

from hfedmoe.config import apply_overrides, from_dict
from hfedmoe.privacy import epsilon, rounds_within


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simulate_reports_epsilon_and_stops_at_the_budget(tmp_path, minilm_available):
    if not minilm_available:
        pytest.skip("assets extra not installed")
    from lab.simulate import simulate
    from server.config import ServerConfig

    z, delta = 1.0, 1e-5
    allowed = rounds_within(z, 9.0, delta)  # rounds a device may take part in
    assert 1 <= allowed < 4
    data = apply_overrides({
        "run_dir": str(tmp_path / "sim"), "max_eval_examples": 16,
        "model": {"num_experts": 2, "top_k": 1, "max_length": 32, "upcycle": "copy"},
        "train": {"batch_size": 8, "max_steps": 1, "threads": 1},
        "rounds": {"rounds": allowed + 1, "train_time_s": 5.0, "fraction": 1.0}},
        ["method.dp_clip=0.5", f"method.dp_noise_multiplier={z}", "method.dp_max_epsilon=9.0"])
    cfg = from_dict(ServerConfig, data)
    rows = [r for r in simulate(cfg, 2, ["phone-midrange-6gb", "jetson-orin-nano-8gb"],
                                measure_repeats=1) if r["phase"] == "round"]
    assert len(rows) == allowed + 1
    for i, r in enumerate(rows[:allowed]):
        p = r["privacy"]
        assert r["accepted"] == 2 and p["delta"] == delta and p["max_epsilon"] == 9.0
        assert set(p["rounds"].values()) == {i + 1}
        assert p["epsilon_max"] == pytest.approx(epsilon(z, i + 1, delta), rel=1e-3)
        assert p["epsilon_max"] <= 9.0
    last = rows[-1]  # one more noised update would pass the budget: nobody takes part
    assert last["accepted"] == 0 and last["bytes_in"] == 0
    assert last["privacy"]["epsilon_max"] == rows[allowed - 1]["privacy"]["epsilon_max"]
    assert last["accuracy"] == rows[allowed - 1]["accuracy"]  # the model did not move
    from server.report import write_report

    html = write_report(tmp_path / "sim").read_text()
    assert "Differential privacy" in html and f"{rows[0]['privacy']['epsilon_max']:.4f}" in html


def test_privacy_settings_are_validated():
    from hfedmoe.config import MethodConfig
    from hfedmoe.errors import ConfigError

    for bad in ({"dp_delta": 0.0}, {"dp_delta": 1.0}, {"dp_max_epsilon": -1.0},
                {"dp_clip": 1.0, "dp_max_epsilon": 5.0}):  # a budget without noise
        with pytest.raises(ConfigError):
            MethodConfig(**bad)


def test_epsilon_without_dp_accounting_is_a_config_error(monkeypatch):
    """A phone without dp-accounting (dm-tree would not build) runs without DP; with DP on,
    epsilon cannot be accounted and says so instead of an ImportError."""
    import sys

    from hfedmoe import privacy
    from hfedmoe.errors import ConfigError

    privacy._rdp_epsilon.cache_clear()
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import fails
    with pytest.raises(ConfigError, match="dp-accounting"):
        privacy.epsilon(1.0, 3, 1e-5)
    assert privacy.epsilon(0.0, 3, 1e-5) == float("inf")  # no noise: nothing imported
    privacy._rdp_epsilon.cache_clear()


def test_taking_part_is_decided_on_the_noise_each_earlier_update_ran_at():
    """A device that ran two earlier rounds at noise 4 has spent far less than two rounds at
    the announced 0.8: the simulator's check accounts each update at its own noise."""
    from hfedmoe.config import MethodConfig
    from hfedmoe.privacy import epsilon_of_rounds, may_take_part

    cfg = MethodConfig(dp_clip=1.0, dp_noise_multiplier=0.8, dp_max_epsilon=8.0)
    at_announced = epsilon_of_rounds([(0.8, 1.0)] * 3, cfg.dp_delta)
    at_own = epsilon_of_rounds([(4.0, 1.0), (4.0, 1.0), (0.8, 1.0)], cfg.dp_delta)
    assert at_own < cfg.dp_max_epsilon < at_announced  # the case separates the two rules
    assert may_take_part([4.0, 4.0], cfg)
    assert not may_take_part(2, cfg) and not may_take_part([0.8, 0.8], cfg)
    assert may_take_part([], cfg) == may_take_part(0, cfg)
