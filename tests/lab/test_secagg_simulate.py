"""``hfedmoe simulate`` with ``[secagg] enabled``: the same global model as plain aggregation
for every expert with at least k contributors; the rest keep their global weights."""

from __future__ import annotations

import pytest
import torch

from hfedmoe.config import apply_overrides, from_dict
from hfedmoe.secagg import unit_of

DEVICES = ["phone-midrange-6gb", "jetson-orin-nano-8gb", "phone-midrange-6gb",
           "jetson-orin-nano-8gb"]


def _run(tmp_path, name: str, overrides: list[str]):
    from lab.simulate import simulate
    from server.config import ServerConfig
    from server.store import Store

    data = apply_overrides({
        "run_dir": str(tmp_path / name), "max_eval_examples": 16,
        "model": {"num_experts": 4, "top_k": 2, "max_length": 32, "upcycle": "copy"},
        "train": {"batch_size": 8, "max_steps": 1, "threads": 1},
        "rounds": {"rounds": 1, "train_time_s": 5.0, "fraction": 1.0}}, overrides)
    rows = simulate(from_dict(ServerConfig, data), len(DEVICES), DEVICES, measure_repeats=1)
    store = Store(tmp_path / name)
    try:
        _, state = store.latest_checkpoint()
    finally:
        store.close()
    return rows, state


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_secure_simulation_matches_plain_above_k(tmp_path, minilm_available):
    if not minilm_available:
        pytest.skip("assets extra not installed")
    plain_rows, plain = _run(tmp_path, "plain", [])
    rows, secure = _run(tmp_path, "secure", ["secagg.enabled=true", "secagg.min_contributors=2",
                                             "secagg.sim_drop_before_unmask=1",
                                             "secagg.dropout_fraction=0.4"])

    info = rows[-1]["secagg"]
    assert info["revealed_units"] > 0, info
    assert info["up_bytes"] > 0 and info["dropped"] == []
    assert set(info["withheld"]) <= {"below-k"}, info["withheld"]  # one dropout is tolerated
    moved = 0
    for key, value in secure.items():
        if torch.equal(value, plain[key]) or unit_of(key) in info["withheld_units"]:
            continue
        torch.testing.assert_close(value, plain[key], atol=1e-5, rtol=0,
                                   msg=f"{key} ({unit_of(key)})")
        moved += 1
    assert moved > 0 and plain_rows[-1]["accepted"] == rows[-1]["accepted"]
