"""The study's controls and settings through the simulator: budgets as a share of the experts
(``rounds.budget_share``), ``budget-zero`` (no expert trains), ``hfedmoe-other`` (another
client's data ranks the experts), the global routing prior handed to the devices, and
``eval_every``."""

from __future__ import annotations

import dataclasses

import pytest

from hfedmoe.config import load_config
from server.config import ServerConfig

PROFILES = ["phone-midrange-6gb", "jetson-orin-nano-8gb", "laptop-cpu-16gb",
            "jetson-agx-orin-32gb"]


def _cfg(tmp_path, strategy: str, *extra: str) -> ServerConfig:
    return load_config(ServerConfig, None, [
        f"run_dir={tmp_path / strategy}", "max_eval_examples=16", "model.num_experts=4",
        "model.top_k=2", "model.max_length=32", "model.upcycle=moefy", "train.batch_size=8",
        "train.max_steps=1", "train.threads=1", "train.selection_batches=1",
        "rounds.train_time_s=5.0", "rounds.budget_share=0.5", f"method.strategy={strategy}",
        "data.alpha=0.1", *extra])


@pytest.fixture(scope="module")
def calibration(minilm_available):
    if not minilm_available:
        pytest.skip("assets extra not installed")
    import tempfile

    from lab.devices import calibrate

    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        return calibrate(_cfg(Path(tmp), "hfedmoe"), measure_repeats=1)


def _run(cfg, calibration, rounds=2):
    from lab.simulate import simulate

    cfg = dataclasses.replace(cfg, rounds=dataclasses.replace(cfg.rounds, rounds=rounds))
    return [r for r in simulate(cfg, len(PROFILES), PROFILES, calibration=calibration)
            if r["phase"] == "round"]


def test_budget_share_gives_each_device_its_share_of_the_experts(tmp_path, calibration):
    from device_agent.profiles import load_profile
    from lab.simulate import share_cap

    rows = _run(_cfg(tmp_path, "hfedmoe"), calibration, rounds=1)
    budgets = [rows[0]["budgets"][d] for d in sorted(rows[0]["budgets"])]
    # 24 experts (6 layers x 4); the largest profile (27 GiB available) gets half of them
    reports = [load_profile(p) for p in PROFILES]
    assert budgets == [share_cap(0.5, 24, r, reports) for r in reports] == [1, 3, 4, 12]


def test_budget_zero_trains_no_expert_and_still_moves_the_gates(tmp_path, calibration):
    rows = _run(_cfg(tmp_path, "budget-zero"), calibration, rounds=1)
    assert rows[0]["experts_updated"] == 0
    assert all(ids == [] for ids in
               (h.get("expert_ids") for h in rows[0]["held"].values()))
    assert rows[0]["bytes_in"] > 0  # gates and head still travel


def test_hfedmoe_other_trains_the_set_the_next_client_would_pick(tmp_path, calibration):
    own = _run(_cfg(tmp_path, "hfedmoe"), calibration, rounds=1)[0]["held"]
    other = _run(_cfg(tmp_path, "hfedmoe-other"), calibration, rounds=1)[0]["held"]
    ids = sorted(own)
    assert len(ids) == len(PROFILES)
    differs = 0
    for i, d in enumerate(ids):
        mine = set(other[d]["expert_ids"])
        theirs = set(own[ids[(i + 1) % len(ids)]]["expert_ids"])
        # both are prefixes of one ranking (the next client's), cut at two budgets
        assert mine <= theirs or theirs <= mine
        assert len(mine) <= own[d]["budget"]
        differs += mine != set(own[d]["expert_ids"])
    assert differs > 0


def test_devices_get_the_routing_prior_from_round_1_and_eval_every_skips_rounds(
        tmp_path, calibration, monkeypatch):
    import lab.devices

    seen: dict[int, list] = {}
    real = lab.devices.train_device

    def spy(model, data, job, state, round_idx, *a, **kw):
        seen.setdefault(round_idx, []).append(job.prior)
        return real(model, data, job, state, round_idx, *a, **kw)

    monkeypatch.setattr(lab.devices, "train_device", spy)
    cfg = _cfg(tmp_path, "hfedmoe", "method.specificity=1.0", "eval_every=100")
    rows = _run(cfg, calibration, rounds=7)
    assert all(p == {} for p in seen[0])  # nothing reported yet
    assert all(p and all(0 <= v <= 1 for v in p.values()) for p in seen[1])
    assert len(seen[1][0]) == 24  # every expert some client's tokens reached has a prior
    assert [r["round"] for r in rows if r.get("accuracy") is not None] == [2, 3, 4, 5, 6]
