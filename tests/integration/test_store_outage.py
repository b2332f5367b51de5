"""The server's PostgreSQL lost while a round closes, or while one opens (a TCP proxy in front
of it is cut, then restored a few seconds later): the server keeps running, says which store
failed (without its password), and completes the round once the database is back; the run
ends with every round once and every acknowledged update folded in exactly once."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from hfedmoe.config import ModelConfig
from hfedmoe.models import build_model
from hfedmoe.wire import encode
from server.config import ServerConfig, StoreConfig
from server.store import open_store
from tests.integration.conftest import FakeDevice, metrics, spawn, stop, wait_for
from tests.integration.test_server_rounds import make_update, round_of, server_cfg
from tests.tcp_proxy import proxy_url

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]
KEY = "layers.0.experts.0.w_in"  # every update trains expert 0 of layer 0
UNTOUCHED = "layers.0.experts.1.w_in"


@pytest.fixture(scope="module")
def model():
    """The same base model the server builds (same config and seed)."""
    return build_model(ModelConfig(num_experts=2, top_k=1, max_length=32), "classification", 10)


def _log(tmp_path: Path) -> str:
    """What the server has logged so far (``spawn`` writes it next to its config)."""
    path = tmp_path / "server.log"
    return path.read_text() if path.exists() else ""


def _send_and_ack(dev: FakeDevice, update) -> str:
    sha = dev.send(encode(update, 0.01))
    dev.wait(lambda: dev.ack_for(sha) is not None, 60, f"ack of {dev.device_id}")
    assert dev.ack_for(sha)["status"] == "accepted"
    return sha


def _weighted(updates) -> torch.Tensor:
    """Eq. 17 on expert 0: the data-size-weighted mean of the updates' deltas."""
    total = sum(u.num_examples for u in updates)
    return sum(u.deltas[KEY] * (u.num_examples / total) for u in updates)


@pytest.mark.parametrize("phase", ["closes", "opens"])
def test_a_database_lost_while_a_round_changes_is_waited_out(tmp_path, mosquitto, model,
                                                             pg_schema, phase):
    """``closes``: round 0 reaches its deadline with one update in while the database is
    away. ``opens``: round 1 opens (after the registration wait for a third device that never
    comes) while the database is away. Either way the server retries, the round completes once
    the proxy is restored, and round 1 runs as usual."""
    url, schema = pg_schema
    proxy, proxied = proxy_url(url)
    run_id = f"dbcut-{phase}"
    rounds = ({"min_devices": 2, "deadline_s": 20.0} if phase == "closes" else
              {"min_devices": 3, "registration_timeout_s": 8.0, "deadline_s": 120.0})
    cfg = server_cfg(tmp_path, mosquitto, run_id, rounds=2, **rounds)
    cfg["store"] = {"url": proxied, "schema": schema, "connect_timeout_s": 2.0}
    server = spawn("server", cfg, tmp_path / "server.toml")
    a, b = FakeDevice(mosquitto, run_id, "dev-a"), FakeDevice(mosquitto, run_id, "dev-b")
    failed = "closing round 0" if phase == "closes" else "opening round 1"
    devices = {"dev-a": a, "dev-b": b}
    sent: dict[int, list] = {}
    shas = []
    try:
        a.register()
        b.register()
        base0 = round_of(a, 0)["model"]["state_hash"]
        sent[0] = [make_update(model, run_id, 0, "dev-a", base0, seed=1, n=10)]
        if phase == "opens":
            sent[0].append(make_update(model, run_id, 0, "dev-b", base0, seed=2, n=30))
        for up in sent[0]:
            shas.append((devices[up.client_id], _send_and_ack(devices[up.client_id], up)))
        if phase == "opens":  # round 0 closed; round 1 waits 8 s for a third device
            wait_for(lambda: any(r.get("phase") == "round" for r in metrics(tmp_path / "run")),
                     60, "round 0 to close", [server])
        proxy.cut()  # closes: round 0 is still open, and closes at its 20 s deadline
        wait_for(lambda: f"{failed}: the store failed" in _log(tmp_path), 90,
                 f"the server to find the database gone while {failed}", [server])
        time.sleep(4)  # a few retries
        assert server.poll() is None  # still running, and still waiting
        assert not any(r.get("round") == 1 for r in metrics(tmp_path / "run"))
        proxy.restore()
        base1 = round_of(a, 1)["model"]["state_hash"]
        sent[1] = [make_update(model, run_id, 1, "dev-a", base1, seed=3, n=10),
                   make_update(model, run_id, 1, "dev-b", base1, seed=4, n=30)]
        for up in sent[1]:
            shas.append((devices[up.client_id], _send_and_ack(devices[up.client_id], up)))
        wait_for(lambda: server.poll() is not None, 120, "the server to finish")
        assert server.returncode == 0
    finally:
        stop(server)
        a.close()
        b.close()
        proxy.cut()
    log = _log(tmp_path)
    assert f"{failed}: the store is back" in log
    assert f"postgresql://hfedmoe@127.0.0.1:{proxy.port}/" in log  # the store, named
    password = urlsplit(url).password
    assert password is None or password not in log  # CI's test URL carries one
    rows = [r for r in metrics(tmp_path / "run") if r.get("phase") == "round"]
    assert [(r["round"], r["accepted"]) for r in rows] == [(0, len(sent[0])), (1, 2)]
    for dev, sha in shas:  # acknowledged once each: no device had to send again
        assert len([x for x in dev.acks if x.get("sha") == sha]) == 1
    store = open_store(ServerConfig(run_id=run_id, run_dir=str(tmp_path / "run"),
                                    store=StoreConfig(url=url, schema=schema)))
    try:
        assert store.last_round() == 1  # no round skipped or repeated
        assert [store.round_info(i)["state"] for i in (0, 1)] == ["done", "done"]
        assert [u.client_id for u in store.updates(1)] == ["dev-a", "dev-b"]
        done, state = store.latest_checkpoint()
    finally:
        store.close()
    assert done == 1
    expected = model.state()[KEY] + _weighted(sent[0]) + _weighted(sent[1])
    torch.testing.assert_close(state[KEY], expected, rtol=1e-5, atol=1e-6)  # each folded once
    assert torch.equal(state[UNTOUCHED], model.state()[UNTOUCHED])
