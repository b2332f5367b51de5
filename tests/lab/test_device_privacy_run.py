"""Simulated devices with their own ``[privacy]`` (``[devices]`` of a simulation config,
:mod:`lab.device_privacy`): each applies the stricter of its own and the announced DP
settings, releases its metadata as its section says, sits out a round that would pass its
epsilon budget, and the run reports each device's epsilon over the noise it actually applied.
"""

from __future__ import annotations

import pytest

from hfedmoe.cli import main
from hfedmoe.config import from_dict, load_config
from hfedmoe.errors import ConfigError
from lab.device_privacy import SimulationConfig

PROFILES = ["phone-midrange-6gb", "jetson-orin-nano-8gb", "laptop-cpu-16gb"]
CLIP, ANNOUNCED, DELTA = 0.5, 0.5, 1e-5


def _rdp_epsilon(noises: list[float]) -> float:
    """dp-accounting's RDP accountant over one Gaussian mechanism per noise multiplier."""
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    for z in noises:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(DELTA))


def _budget() -> float:
    """An epsilon budget that one update at noise 1 fits and a second does not."""
    return (_rdp_epsilon([1.0]) + _rdp_epsilon([1.0, 1.0])) / 2


def _cfg(tmp_path) -> SimulationConfig:
    """Announced: clip 0.5, noise 0.5. Device 0 demands noise 1, then 2 from round 1, and
    withholds its loss and usage; device 1 has no section of its own; device 2 demands noise
    1 within an epsilon budget that holds one update."""
    return from_dict(SimulationConfig, {
        "run_dir": str(tmp_path / "sim"), "max_eval_examples": 16,
        "model": {"num_experts": 2, "top_k": 1, "max_length": 32, "upcycle": "copy"},
        "train": {"batch_size": 8, "max_steps": 1, "threads": 1, "selection_batches": 1},
        "rounds": {"rounds": 2, "train_time_s": 5.0, "budget_share": 0.5},
        "method": {"dp_clip": CLIP, "dp_noise_multiplier": ANNOUNCED, "dp_delta": DELTA},
        "devices": {"overrides": [
            {"indices": [0], "privacy": {"min_noise_multiplier": 1.0, "loss": "withheld",
                                         "usage": "withheld"}},
            {"indices": [0], "from_round": 1, "privacy": {"min_noise_multiplier": 2.0}},
            {"profiles": ["laptop-cpu-16gb"],
             "privacy": {"min_noise_multiplier": 1.0, "max_epsilon": _budget()}},
        ]}})


@pytest.fixture(scope="module")
def run(tmp_path_factory, minilm_available):
    """The two rounds' rows, every decoded update (round, device) -> update, and the store's
    participation records and skips."""
    if not minilm_available:
        pytest.skip("assets extra not installed")
    import lab.simulate
    from server.store import Store

    tmp = tmp_path_factory.mktemp("device-privacy")
    cfg = _cfg(tmp)
    updates = {}
    real = lab.simulate._held_to_policy

    def spy(sim, r, d, update):
        updates[(r, d.id)] = update
        return real(sim, r, d, update)

    mp = pytest.MonkeyPatch()
    mp.setattr(lab.simulate, "_held_to_policy", spy)
    try:
        rows = [r for r in lab.simulate.simulate(cfg, len(PROFILES), PROFILES,
                                                 measure_repeats=1) if r["phase"] == "round"]
    finally:
        mp.undo()
    store = Store(tmp / "sim")
    try:
        return rows, updates, store.participation(), store.skips()
    finally:
        store.close()


def _ids():
    return [f"sim{i:03d}-{p}" for i, p in enumerate(PROFILES)]


def test_each_device_sends_with_the_stricter_noise_and_the_rest_with_the_announced(run):
    _, updates, records, _ = run
    floor, plain, budgeted = _ids()
    applied = {(p["round"], p["client"]): p["dp_noise_multiplier"] for p in records}
    assert applied == {(0, floor): 1.0, (1, floor): 2.0, (0, plain): ANNOUNCED,
                       (1, plain): ANNOUNCED, (0, budgeted): 1.0}
    for (_, _), update in updates.items():  # the noise is on the deltas at the clip bound
        assert update.meta.dp_clip == CLIP
        assert update.meta.dp_noise_std == pytest.approx(
            update.meta.dp_noise_multiplier * CLIP)


def test_the_reported_epsilon_is_over_the_noise_each_device_applied(run):
    rows, _, _, _ = run
    floor, plain, budgeted = _ids()
    expected = [{floor: [1.0], plain: [ANNOUNCED], budgeted: [1.0]},
                {floor: [1.0, 2.0], plain: [ANNOUNCED] * 2, budgeted: [1.0]}]
    for row, noises in zip(rows, expected, strict=True):
        p = row["privacy"]
        assert p["delta"] == DELTA and p["noise_multiplier"] == ANNOUNCED
        assert p["rounds"] == {d: len(zs) for d, zs in noises.items()}
        assert set(p["epsilon"]) == set(noises)
        for d, zs in noises.items():
            assert p["epsilon"][d] == pytest.approx(_rdp_epsilon(zs), abs=1e-4)
    # per round, not a count at one noise: two rounds at 1 or at 2 are a different epsilon
    eps = rows[1]["privacy"]["epsilon"][floor]
    assert eps != pytest.approx(_rdp_epsilon([1.0, 1.0]), abs=1e-2)
    assert eps != pytest.approx(_rdp_epsilon([2.0, 2.0]), abs=1e-2)


def test_metadata_leaves_as_the_device_says(run):
    _, updates, _, _ = run
    floor, plain, _ = _ids()
    for r in (0, 1):
        mine = updates[(r, floor)]
        assert mine.meta.withheld == ["loss", "usage"]
        assert mine.meta.loss is None and mine.usage == {}
        assert mine.importance  # exact: still sent
        other = updates[(r, plain)]
        assert other.meta.withheld is None and other.meta.loss is not None and other.usage


def test_a_device_whose_budget_one_more_round_would_pass_sits_it_out(run):
    rows, updates, _, skips = run
    _, _, budgeted = _ids()
    assert rows[0]["skipped"] == {} and rows[0]["accepted"] == 3
    assert (1, budgeted) not in updates and rows[1]["accepted"] == 2
    [why] = rows[1]["skipped"][budgeted]
    assert why.startswith("privacy:epsilon-budget: 1 noised updates spent epsilon")
    assert f"> {_budget():g}" in why
    assert [(s["round"], s["client"], s["reasons"]) for s in skips] == [(1, budgeted, [why])]


@pytest.mark.parametrize(("overrides", "says"), [
    (['devices.privacy.loss="blurred"'], r"devices.privacy.loss: 'blurred' is not one of"),
    (["devices.privacy.delta=2.0"], r"privacy.delta must be in \(0, 1\), got 2.0"),
    (["devices.privacy.min_noise_multiplier=-1.0"],
     r"privacy.min_noise_multiplier, max_clip and max_epsilon must be >= 0"),
    (["devices.overrides=[{indices=[0], privacy={max_clip=-1.0}}]"],
     r"devices.overrides\[0\].privacy: privacy.min_noise_multiplier, max_clip and "
     r"max_epsilon must be >= 0"),
    (['devices.overrides=[{privacy={usage="hidden"}}]'],
     r"devices.overrides\[0\].privacy.usage: 'hidden' is not one of"),
    (["devices.overrides=[{privacy={min_noise=1.0}}]"],
     r"unknown config key\(s\) in \[devices.overrides\[0\].privacy\]: min_noise"),
    (["devices.overrides=[{from_round=-1}]"],
     r"devices.overrides\[0\].from_round must be >= 0, got -1"),
    (["devices.overrides=[{indices=[-2]}]"],
     r"devices.overrides\[0\].indices must be device indices >= 0"),
])
def test_bad_device_privacy_is_a_config_error_naming_the_field(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(SimulationConfig, None, overrides)


def test_bad_device_privacy_from_a_file(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text("[[devices.overrides]]\nindices = [1]\n"
                    "[devices.overrides.privacy]\nstat_step = 0.0\n")
    with pytest.raises(ConfigError, match=r"devices.overrides\[0\].privacy: privacy.loss_noise "
                                          r"and stat_noise must be >= 0, loss_step and "
                                          r"stat_step > 0"):
        load_config(SimulationConfig, path)


@pytest.mark.parametrize(("argv", "says"), [
    (["--set", "devices.privacy.max_epsilon=-3.0"],
     "privacy.min_noise_multiplier, max_clip and max_epsilon must be >= 0"),
    (["--set", "devices.overrides=[{indices=[5], privacy={max_clip=1.0}}]"],
     "devices.overrides[0].indices: 5 is not a device of this run (indices 0-1)"),
    (["--set", 'devices.overrides=[{profiles=["pager"], privacy={max_clip=1.0}}]'],
     "devices.overrides[0].profiles: no device of this run has profile 'pager'"),
])
def test_the_cli_refuses_them_before_any_work(tmp_path, capsys, argv, says):
    run_dir = tmp_path / "sim"
    code = main(["simulate", "--devices", "2", "--profiles",
                 "phone-midrange-6gb,jetson-orin-nano-8gb", "--run-dir", str(run_dir), *argv])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code and "ConfigError" in err and says in err
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_device_s_section_by_round_profile_and_index():
    cfg = load_config(SimulationConfig, None, [
        "devices.privacy.max_clip=1.0", "devices.privacy.min_noise_multiplier=0.5",
        'devices.overrides=[{profiles=["a"], privacy={min_noise_multiplier=1.0}}, '
        '{indices=[1], from_round=2, privacy={min_noise_multiplier=3.0, loss="coarsened"}}]'])
    at = cfg.devices.privacy_for
    assert at(0, "b", 0).min_noise_multiplier == 0.5 and at(0, "b", 0).max_clip == 1.0
    assert at(0, "a", 5).min_noise_multiplier == 1.0
    assert at(1, "a", 1).min_noise_multiplier == 1.0  # not yet round 2
    late = at(1, "a", 2)
    assert (late.min_noise_multiplier, late.loss, late.max_clip) == (3.0, "coarsened", 1.0)
