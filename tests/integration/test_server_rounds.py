"""The server over a real Mosquitto: crash-resume, stragglers, dropouts, hostile updates."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from hfedmoe.config import ModelConfig
from hfedmoe.errors import WireError
from hfedmoe.models import build_model
from hfedmoe.names import ExpertId
from hfedmoe.update import SparseUpdate
from hfedmoe.wire import WireConfig, decode, encode, spec_from_state
from server.config import ServerConfig
from server.store import Store, open_store
from tests.integration.conftest import (
    SMALL,
    FakeDevice,
    merge,
    metrics,
    spawn,
    stop,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]
E0 = ExpertId(0, 0)


@pytest.fixture(scope="module")
def model():
    """The same base model the server builds (same config and seed)."""
    cfg = ModelConfig(num_experts=2, top_k=1, max_length=32)
    return build_model(cfg, "classification", 10)


def server_cfg(tmp_path: Path, url: str, run_id: str, **rounds) -> dict:
    return merge(SMALL, {"run_id": run_id, "run_dir": str(tmp_path / "run"),
                         "max_eval_examples": 32, "eval_batch_size": 32,
                         "transport": {"url": url, "keepalive": 5},
                         "rounds": {"registration_timeout_s": 60.0, **rounds}})


def make_update(model, run: str, rnd: int, dev: str, base_hash: str, *,
                seed: int = 0, experts=(E0,), n: int = 10, **over) -> SparseUpdate:
    g = torch.Generator().manual_seed(seed)
    deltas = {"layers.0.gate.weight": torch.randn(2, 384, generator=g) * 1e-3}
    for e in experts:
        for k, v in model.expert_state(e).items():
            deltas[k] = torch.randn(v.shape, generator=g) * 1e-3
    fields = dict(run_id=run, round_idx=rnd, client_id=dev, num_examples=n,
                  deltas=deltas, usage={E0: 0.6, ExpertId(0, 1): 0.4},
                  importance={E0: 0.5, ExpertId(0, 1): 0.3}, routed=frozenset(experts),
                  updated=frozenset(experts), base_model_hash=base_hash)
    fields.update(over)
    return SparseUpdate(**fields)


def round_of(dev: FakeDevice, idx: int) -> dict:
    dev.wait(lambda: any(r.get("round") == idx for r in dev.rounds), 90, f"round {idx}")
    return [r for r in dev.rounds if r.get("round") == idx][-1]


def test_sigkill_after_ack_resumes_with_updates_counted_once(tmp_path, mosquitto, model,
                                                            store_config):
    """On both stores (SQLite in the run directory, PostgreSQL): an acknowledged update
    survives a SIGKILL of the server and is aggregated once."""
    run_id = "crash"
    cfg = server_cfg(tmp_path, mosquitto, run_id, rounds=1, min_devices=2, deadline_s=120.0)
    if store_config.url:
        cfg["store"] = {"url": store_config.url, "schema": store_config.schema}
    server = spawn("server", cfg, tmp_path / "server.toml")
    a, b = FakeDevice(mosquitto, run_id, "dev-a"), FakeDevice(mosquitto, run_id, "dev-b")
    try:
        a.register()
        b.register()
        ann = round_of(a, 0)
        base = ann["model"]["state_hash"]
        up_a = make_update(model, run_id, 0, "dev-a", base, seed=1, n=10)
        sha_a = a.send(encode(up_a, 0.01))
        a.wait(lambda: a.ack_for(sha_a) is not None, 60, "ack of A")
        assert a.ack_for(sha_a)["status"] == "accepted"
        server.send_signal(signal.SIGKILL)
        server.wait(10)

        server = spawn("server", cfg, tmp_path / "server.toml")  # same run directory
        up_b = make_update(model, run_id, 0, "dev-b", base, seed=2, n=30)
        b.wait(lambda: len(b.rounds) >= 2, 90, "round 0 announced again")
        sha_b = b.send(encode(up_b, 0.01))
        b.wait(lambda: b.ack_for(sha_b) is not None, 90, "ack of B")
        wait_for(lambda: server.poll() is not None, 120, "the server to finish")
        assert server.returncode == 0
    finally:
        stop(server)
        a.close()
        b.close()
    rows = [r for r in metrics(tmp_path / "run") if r.get("phase") == "round"]
    assert len(rows) == 1 and rows[0]["accepted"] == 2
    assert len([x for x in a.acks if x.get("sha") == sha_a]) == 1  # A never had to resend
    assert (tmp_path / "run" / "run.db").exists() == (not store_config.url)  # the store used
    store = open_store(ServerConfig(run_id=run_id, run_dir=str(tmp_path / "run"),
                                    store=store_config))
    assert [u.client_id for u in store.updates(0)] == ["dev-a", "dev-b"]
    _, state = store.latest_checkpoint()
    store.close()
    key = "layers.0.experts.0.w_in"  # Eq. 17: data-size weights 10/40 and 30/40
    expected = model.state()[key] + 0.25 * up_a.deltas[key] + 0.75 * up_b.deltas[key]
    torch.testing.assert_close(state[key], expected, rtol=1e-6, atol=1e-7)  # fp32 rounding
    untouched = "layers.0.experts.1.w_in"  # nobody updated it: bit-identical
    assert torch.equal(state[untouched], model.state()[untouched])


def test_a_database_lost_mid_round_takes_the_update_once_it_is_back(tmp_path, mosquitto,
                                                                    model, pg_schema):
    """The server's PostgreSQL behind a proxy that is cut mid-round: an update sent meanwhile
    is not acknowledged; resent once the database is back, it is taken in and aggregated."""
    from tests.tcp_proxy import proxy_url

    url, schema = pg_schema
    proxy, proxied = proxy_url(url)
    run_id = "dbloss"
    cfg = server_cfg(tmp_path, mosquitto, run_id, rounds=1, min_devices=2, deadline_s=120.0)
    cfg["store"] = {"url": proxied, "schema": schema, "connect_timeout_s": 2.0}
    server = spawn("server", cfg, tmp_path / "server.toml")
    a, b = FakeDevice(mosquitto, run_id, "dev-a"), FakeDevice(mosquitto, run_id, "dev-b")
    try:
        a.register()
        b.register()
        base = round_of(a, 0)["model"]["state_hash"]
        sha_a = a.send(encode(make_update(model, run_id, 0, "dev-a", base, seed=1), 0.01))
        a.wait(lambda: a.ack_for(sha_a) is not None, 60, "ack of A")
        proxy.cut()
        sha_b = b.send(encode(make_update(model, run_id, 0, "dev-b", base, seed=2), 0.01))
        assert not b.t.run_until(lambda: b.ack_for(sha_b) is not None, 10.0)  # no ack
        proxy.restore()
        b.sender.publish_manifest()  # what an agent does while it has no ack
        b.sender.resend(range(len(b.sender.manifest.chunks)), count=False)
        b.wait(lambda: b.ack_for(sha_b) is not None, 60, "ack of B once the database is back")
        assert b.ack_for(sha_b)["status"] == "accepted"
        wait_for(lambda: server.poll() is not None, 120, "the server to finish")
        assert server.returncode == 0
    finally:
        stop(server)
        a.close()
        b.close()
        proxy.cut()
    rows = [r for r in metrics(tmp_path / "run") if r.get("phase") == "round"]
    assert len(rows) == 1 and rows[0]["accepted"] == 2 and rows[0]["rejected"] == 0
    assert "the store failed" in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("policy", ["drop", "fold"])
def test_straggler_is_late_and_round_does_not_wait(tmp_path, mosquitto, model, policy):
    run_id = f"late-{policy}"
    cfg = server_cfg(tmp_path, mosquitto, run_id, rounds=2, min_devices=2, deadline_s=8.0,
                     late_policy=policy)
    server = spawn("server", cfg, tmp_path / "server.toml")
    a, s = FakeDevice(mosquitto, run_id, "dev-a"), FakeDevice(mosquitto, run_id, "slow")
    try:
        a.register()
        s.register()
        r0 = round_of(a, 0)
        sha = a.send(encode(make_update(model, run_id, 0, "dev-a", r0["model"]["state_hash"]),
                            0.01))
        a.wait(lambda: a.ack_for(sha) is not None, 30, "ack")
        r1 = round_of(s, 1)  # round 0 closed at its deadline without the straggler
        late_up = make_update(model, run_id, 0, "slow", r0["model"]["state_hash"], seed=9)
        late = s.send(encode(late_up, 0.01))
        s.wait(lambda: s.ack_for(late) is not None, 30, "late ack")
        assert s.ack_for(late)["status"] == f"late-{policy}ed".replace("droped", "dropped")
        for dev, seed in ((a, 3), (s, 4)):
            sha = dev.send(encode(make_update(model, run_id, 1, dev.device_id,
                                              r1["model"]["state_hash"], seed=seed), 0.01))
            dev.wait(lambda sha=sha, dev=dev: dev.ack_for(sha) is not None, 30, "ack")
        wait_for(lambda: server.poll() is not None, 60, "the server to finish")
    finally:
        stop(server)
        a.close()
        s.close()
    rows = [r for r in metrics(tmp_path / "run") if r.get("phase") == "round"]
    assert [(r["accepted"], r["late"]) for r in rows] == [(1, 0), (2, 1)]
    assert rows[0]["round_s"] < 30  # closed at its 8 s deadline
    store = Store(tmp_path / "run")
    folded = [u.client_id for u in store.updates(1) if u.late]
    store.close()
    contributors = {"dev-a", "slow"} | ({"slow~r0"} if policy == "fold" else set())
    assert folded == (["slow~r0"] if policy == "fold" else [])
    assert set(rows[1]["devices"]) == contributors  # the folded update was aggregated


def test_device_killed_mid_round_does_not_stall_the_round(tmp_path, mosquitto):
    run_id = "dropout"
    cfg = server_cfg(tmp_path, mosquitto, run_id, rounds=1, min_devices=2, deadline_s=200.0)
    server = spawn("server", cfg, tmp_path / "server.toml")
    agents = {}
    for i, name in enumerate(("keep", "gone")):
        agents[name] = spawn("agent", merge(SMALL, {
            "device_id": name, "run_id": run_id, "work_dir": str(tmp_path / name),
            "shard": i, "num_shards": 2, "emulate": "laptop-cpu-16gb",
            "upload_margin_s": 5.0, "matmul_seconds": 0.2,
            "train": {"max_steps": 20},
            "transport": {"url": mosquitto, "keepalive": 5}}), tmp_path / f"{name}.toml")
    try:
        gone_log = tmp_path / "gone.log"
        wait_for(lambda: gone_log.exists() and "round 0," in gone_log.read_text(), 180,
                 "the device to start training", [server])
        os.killpg(agents["gone"].pid, signal.SIGKILL)  # no clean disconnect: the will fires
        wait_for(lambda: server.poll() is not None, 180, "the server to finish")
        assert server.returncode == 0
    finally:
        for p in (*agents.values(), server):
            stop(p)
    rows = [r for r in metrics(tmp_path / "run") if r.get("phase") == "round"]
    assert rows[0]["participants"] == 2 and rows[0]["accepted"] == 1
    assert rows[0]["round_s"] < 150  # did not sit out the 200 s deadline


def _local_error(blob: bytes, spec, run_id: str, base: str) -> str | None:
    """What the wire decoder says of ``blob`` here (None: it is a valid update)."""
    try:
        decode(blob, spec, WireConfig(max_payload_bytes=8 << 20), run_id=run_id, round_idx=0,
               client_id="dev-a", base_model_hash=base)
    except WireError as exc:
        return type(exc).__name__
    return None


def _hostile(model, run_id: str, base: str, good: bytes, rng: random.Random):
    """(name, device, blob, expected error class names) for every kind of bad update.

    Random, truncated and bit-flipped blobs are kept only when the decoder rejects them here
    too (a flip inside a float of the header can leave a valid update), and the server must
    answer with the same error class.
    """
    spec = spec_from_state(model.state())
    cases = []
    makers = {"random": lambda: rng.randbytes(rng.randint(0, 3000)),
              "truncated": lambda: good[:rng.randint(0, len(good) - 1)]}

    def flip() -> bytes:
        b = bytearray(good)
        pos = rng.randint(0, min(len(b) - 1, 600))
        b[pos] ^= 1 << rng.randint(0, 7)
        return bytes(b)

    makers["bitflip"] = flip
    for kind, make in makers.items():
        found = 0
        while found < 30:
            blob = make()
            err = _local_error(blob, spec, run_id, base)
            if err is not None:
                cases.append((f"{kind}{found}", "dev-a", blob, {err}))
                found += 1

    def enc(up, tau=0.01):
        return encode(up, tau)

    mk = lambda **kw: make_update(model, run_id, 0, "dev-a", base, **kw)  # noqa: E731

    def poisoned(value: float) -> bytes:  # the encoder refuses NaN/Inf: forge the bytes
        up = mk(seed=5)
        blob = enc(up)
        n = struct.unpack("<Q", blob[:8])[0]
        meta = json.loads(blob[8:8 + n])["__metadata__"]
        tensors = {k: v.clone() for k, v in up.deltas.items()}
        tensors["layers.0.experts.0.w_in"][1, 1] = value
        return st_save(tensors, metadata=meta)

    cases += [
        ("nan", "dev-a", poisoned(float("nan")), {"NonFiniteError"}),
        ("inf", "dev-a", poisoned(float("-inf")), {"NonFiniteError"}),
        ("wrong-run", "dev-a", enc(mk(run_id="other")), {"MismatchError"}),
        ("future-round", "dev-a", enc(mk(round_idx=7)), {"MismatchError"}),
        ("wrong-client", "dev-a", enc(mk(client_id="dev-b")), {"MismatchError"}),
        ("wrong-base", "dev-a", enc(mk(base_model_hash="0" * 64)), {"MismatchError"}),
        ("unknown-key", "dev-a", enc(mk(deltas={"layers.0.gate.bias": torch.zeros(2)})),
         {"UnknownKeyError"}),
        ("wrong-shape", "dev-a", enc(mk(deltas={"layers.0.gate.weight": torch.zeros(3, 384)})),
         {"ShapeError"}),
        ("bad-expert-id", "dev-a", enc(mk(usage={ExpertId(9, 0): 0.5})),
         {"UnknownKeyError", "SchemaError"}),
        ("not-updated", "dev-a", enc(mk(updated=frozenset())), {"SchemaError",
                                                                "AlgorithmError"}),
        # refused from its manifest, before a byte of it is buffered
        ("oversized", "dev-a", rng.randbytes(9 << 20), {"PayloadTooLarge", "TransferError"}),
        ("unregistered", "ghost", enc(make_update(model, run_id, 0, "ghost", base)),
         {"UnknownClientError"}),
        # dev-a declared 100 local examples when it registered: 1e9 is over the policy's cap
        ("inflated-examples", "dev-a", enc(mk(n=10**9, seed=11)), {"PolicyError"}),
        ("usage-over-one", "dev-a", enc(mk(usage={E0: 0.9, ExpertId(0, 1): 0.9}, seed=12)),
         {"SchemaError"}),
        # dev-a registered a budget of 2 experts
        ("over-budget", "dev-a", encode(mk(experts=(E0, ExpertId(0, 1), ExpertId(1, 0)),
                                           usage={E0: 0.6, ExpertId(0, 1): 0.4,
                                                  ExpertId(1, 0): 0.5}, seed=9),
                                        0.01, WireConfig(dtype="bfloat16")),  # under 8 MB
         {"BudgetExceededError"}),
    ]
    return cases


def test_hostile_updates_are_rejected_and_the_model_is_bit_identical(tmp_path, mosquitto,
                                                                     model):
    run_id = "hostile"
    cfg = server_cfg(tmp_path, mosquitto, run_id, rounds=1, min_devices=2, deadline_s=40.0)
    cfg["wire"] = {"max_payload_bytes": 8 << 20}
    server = spawn("server", cfg, tmp_path / "server.toml")
    a, ghost = FakeDevice(mosquitto, run_id, "dev-a"), FakeDevice(mosquitto, run_id, "ghost")
    quiet = FakeDevice(mosquitto, run_id, "dev-b")  # a participant that sends nothing
    try:
        a.register()
        quiet.register()
        base = round_of(a, 0)["model"]["state_hash"]
        good = encode(make_update(model, run_id, 0, "dev-a", base, experts=()), 0.01)
        cases = _hostile(model, run_id, base, good, random.Random(0))
        assert len(cases) >= 100
        sent = []
        for name, device, blob, expected in cases:
            dev = ghost if device == "ghost" else a
            sent.append((name, dev, dev.send(blob), expected))
        for name, dev, sha, expected in sent:
            dev.wait(lambda dev=dev, sha=sha: dev.ack_for(sha) is not None, 60, f"ack of {name}")
            ack = dev.ack_for(sha)
            assert ack["status"] == "rejected", name
            if expected:
                assert ack["error"] in expected, (name, ack)
        a.register(payload=b"{not json")  # still serving: a bad registration gets an error
        a.wait(lambda: sum(x.get("type") == "error" and x.get("sha") == "" for x in a.acks) >= 1,
               30, "registration error")
        assert server.poll() is None
        wait_for(lambda: server.poll() is not None, 120, "the round deadline")
    finally:
        stop(server)
        a.close()
        ghost.close()
        quiet.close()
    rows = [r for r in metrics(tmp_path / "run") if r.get("phase") == "round"]
    assert rows[0]["accepted"] == 0 and rows[0]["rejected"] >= 100
    store = Store(tmp_path / "run")
    _, state = store.latest_checkpoint()
    assert len(store.rejections()) >= 100  # a blob that does not parse has no round
    store.close()
    base_state = model.state()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[k], base_state[k]) for k in base_state)
