"""Secure aggregation over a real Mosquitto: 10 devices, one dropping before its masked input
and one before unmasking, aggregate to the same global model as plain aggregation of the
surviving devices; an expert trained by fewer than k devices is neither revealed nor stored."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from device_agent.config import AgentConfig
from device_agent.link import ServerLink
from device_agent.secure_session import SecureSession
from hfedmoe.aggregation import aggregate
from hfedmoe.config import MethodConfig, ModelConfig, from_dict
from hfedmoe.models import build_model
from hfedmoe.names import ExpertId
from hfedmoe.protocol import Registration
from hfedmoe.secagg import unit_of
from hfedmoe.strategies import get_strategy
from hfedmoe.transport.config import TransportConfig
from hfedmoe.update import SparseUpdate
from server.store import Store
from tests.integration.conftest import SMALL, merge, metrics, spawn, stop, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]
RUN = "secure"
LOW, SHARED, WIDE = ExpertId(0, 1), ExpertId(0, 0), ExpertId(1, 0)


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(num_experts=2, top_k=1, max_length=32), "classification", 10)


def make_update(model, i: int, base_hash: str) -> SparseUpdate:
    """Device i: SHARED by all, LOW by devices 0 and 1 only (below k = 3), WIDE by 2..9."""
    experts = [SHARED] + ([LOW] if i < 2 else [WIDE])
    g = torch.Generator().manual_seed(i)
    deltas = {"layers.0.gate.weight": torch.randn(2, 384, generator=g) * 1e-3}
    for e in experts:
        for k, v in model.expert_state(e).items():
            deltas[k] = torch.randn(v.shape, generator=g) * 1e-3
    usage = {e: 0.4 for e in experts}
    return SparseUpdate(RUN, 0, f"d{i}", 20 + 7 * i, deltas, usage=usage,
                        importance={e: 0.1 * (i + 1) for e in experts},
                        routed=frozenset(experts), updated=frozenset(experts),
                        base_model_hash=base_hash)


def device(url: str, i: int, model, phases: int, out: dict) -> None:
    """A device that registers, waits for round 0, and plays ``phases`` of the four."""
    cfg = AgentConfig(device_id=f"d{i}", run_id=RUN, transport=TransportConfig(url=url))
    link = ServerLink(cfg)
    try:
        link.connect(lambda: Registration(2, {"local_examples": 20 + 7 * i}, f"d{i}"))
        assert link.pump_until(lambda: link.announcement is not None, link.clock() + 120)
        ann = link.announcement
        update = make_update(model, i, ann.model.state_hash)
        rule = get_strategy(ann.strategy, from_dict(MethodConfig, dict(ann.method))).rule
        session = SecureSession(link, ann, update, rule)
        for phase in (session.advertise, session.share, session.mask, session.unmask)[:phases]:
            phase()
        out[f"d{i}"] = (update, rule)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        out[f"d{i}"] = exc
    finally:
        link.close()


def test_ten_devices_two_dropping_match_plain_aggregation(tmp_path: Path, mosquitto, model):
    cfg = merge(SMALL, {"run_id": RUN, "run_dir": str(tmp_path / "run"), "max_eval_examples": 32,
                        "transport": {"url": mosquitto, "keepalive": 5},
                        "rounds": {"rounds": 1, "min_devices": 10, "deadline_s": 120.0,
                                   "registration_timeout_s": 60.0},
                        "secagg": {"enabled": True, "min_contributors": 3,
                                   "phase_timeout_s": 8.0}})
    server = spawn("server", cfg, tmp_path / "server.toml")
    out: dict = {}
    # d7 stops after sharing keys, d8 after its masked input; the others play all four phases
    threads = [threading.Thread(target=device, args=(mosquitto, i, model,
                                                     {7: 2, 8: 3}.get(i, 4), out))
               for i in range(10)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        errors = {d: r for d, r in out.items() if isinstance(r, BaseException)}
        assert not errors and len(out) == 10, errors
        wait_for(lambda: server.poll() is not None, 120, "the server to finish")
        assert server.returncode == 0
    finally:
        stop(server)

    row = [r for r in metrics(tmp_path / "run") if r.get("phase") == "round"][0]
    info = row["secagg"]
    assert info["dropped"] == ["d7"] and "d8" in info["survivors"]
    assert info["withheld_units"] == {unit_of(next(iter(model.expert_state(LOW)))): "below-k"}
    survivors = [out[d][0] for d in sorted(out) if d != "d7"]
    plain = aggregate(model.state(), survivors, out["d0"][1])
    store = Store(tmp_path / "run")
    try:
        _, state = store.latest_checkpoint()
        assert store.updates(0) == []  # nothing of a device's update was spooled
    finally:
        store.close()
    for key, before in model.state().items():
        if unit_of(key) in info["revealed"]:
            torch.testing.assert_close(state[key], plain[key], atol=1e-6, rtol=0)
        else:  # LOW (two trainers) and every key nobody sent keep their global weights
            assert torch.equal(state[key], before), key
    log = (tmp_path / "server.log").read_text()
    assert "e:0:1 withheld (below-k)" in log
