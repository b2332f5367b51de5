"""The device's own privacy over a real Mosquitto: a server that announces no noise still gets
a clipped, noised update from a device whose config asks for noise, the device's epsilon
ledger holds the round as it ran, and a device whose budget one round would pass refuses it
and says why on its status."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch

from device_agent.privacy import PrivacyLedger
from hfedmoe.config import ModelConfig
from hfedmoe.models import build_model
from hfedmoe.wire import WireConfig, decode, spec_from_state
from server.store import Store
from tests.integration.conftest import SMALL, merge, spawn, stop, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]
CLIP, NOISE = 0.01, 1.0


def test_a_server_announcing_no_noise_gets_only_a_noised_update(tmp_path, mosquitto):
    run_id = "own-privacy"
    server_cfg = merge(SMALL, {
        "run_id": run_id, "run_dir": str(tmp_path / "run"), "max_eval_examples": 32,
        "eval_batch_size": 32, "transport": {"url": mosquitto, "keepalive": 5},
        "retention": {"keep_updates": True},
        "method": {"dp_clip": 0.0, "dp_noise_multiplier": 0.0},  # the server asks for no DP
        "rounds": {"registration_timeout_s": 60.0, "rounds": 1, "min_devices": 2,
                   "deadline_s": 120.0}})
    server = spawn("server", server_cfg, tmp_path / "server.toml")
    agents = [spawn("agent", merge(SMALL, {
        "device_id": name, "run_id": run_id, "work_dir": str(tmp_path / name),
        "shard": i, "num_shards": 2,
        "emulate": "laptop-cpu-16gb", "matmul_seconds": 0.2, "train": {"max_steps": 4},
        "privacy": {"min_noise_multiplier": NOISE, "max_clip": CLIP, "usage": "coarsened",
                    "loss": "withheld", **extra},
        "transport": {"url": mosquitto, "keepalive": 5}}), tmp_path / f"{name}.toml")
        # shy: one update at noise 1 spends epsilon 4.7 at delta 1e-5, over its budget of 1
        for i, (name, extra) in enumerate((("dev", {}), ("shy", {"max_epsilon": 1.0})))]
    try:
        wait_for(lambda: server.poll() is not None, 240, "the server to finish", agents)
        assert server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for p in (*agents, server):
            stop(p)

    store = Store(tmp_path / "run")
    (stored,) = store.updates(0)
    blob = store.read_update(stored)
    (skip,) = store.skips(0)
    store.close()
    assert stored.client_id == "dev" and skip["client"] == "shy"
    assert skip["reasons"][0].startswith("privacy:epsilon-budget: 0 noised updates")
    shy = PrivacyLedger(tmp_path / "shy" / "privacy.sqlite")
    assert shy.rounds() == []  # nothing left it
    shy.close()
    model = build_model(ModelConfig(num_experts=2, top_k=1, max_length=32), "classification", 10)
    update = decode(blob, spec_from_state(model.state()), WireConfig(max_payload_bytes=64 << 20))
    # the update says what the device applied, not what the server announced
    assert update.meta.dp_noise_multiplier == NOISE and update.meta.dp_clip == CLIP
    assert update.meta.dp_noise_std == pytest.approx(NOISE * CLIP)
    assert update.meta.loss is None and update.meta.withheld == ["loss"]
    assert all(round(v * 10, 6) == int(round(v * 10, 6)) for v in update.usage.values())
    # the unnoised (clipped) update has norm <= CLIP; what arrived is that plus Gaussian noise
    # of std sigma per element, whose norm is sigma * sqrt(n) with a spread of about sigma
    flat = torch.cat([d.flatten().double() for d in update.deltas.values()])
    n, sigma = flat.numel(), NOISE * CLIP
    assert n > 10_000
    assert abs(float(flat.norm()) - sigma * math.sqrt(n)) <= CLIP + 6 * sigma
    assert abs(float(flat.mean())) <= 6 * sigma / math.sqrt(n) + CLIP / math.sqrt(n)

    ledger = PrivacyLedger(tmp_path / "dev" / "privacy.sqlite")  # what survives the agent
    assert ledger.rounds() == [(NOISE, 1.0)]
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(NOISE))
    assert ledger.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    ledger.close()
