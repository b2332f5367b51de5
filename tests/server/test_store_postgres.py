"""PostgreSQL as the store, where it differs from SQLite: an unreachable database at start,
and a database lost mid-round (a TCP proxy in front of it is cut, then restored): no ack
without a durable write, and updates are taken in again once it is back."""

from __future__ import annotations

import socket

import pytest

from hfedmoe.errors import StoreError
from hfedmoe.models.hf import build_hf_model
from hfedmoe.modelsync import build_shards
from hfedmoe.strategies import get_strategy
from server.config import ServerConfig, StoreConfig
from server.intake import Intake
from server.registry import DeclaredExamples
from server.rounds import RoundState
from server.store import open_store
from tests.server.test_intake import RUN, Holder, Recorder, _blob, _send
from tests.tcp_proxy import proxy_url


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_an_unreachable_database_at_start_is_a_store_error_naming_it(tmp_path):
    port = _closed_port()
    cfg = ServerConfig(run_id="fleet", run_dir=str(tmp_path), store=StoreConfig(
        url=f"postgresql://kit:s3cret@127.0.0.1:{port}/fleet", connect_timeout_s=2))
    with pytest.raises(StoreError) as err:
        open_store(cfg)
    message = str(err.value)
    assert f"postgresql://kit@127.0.0.1:{port}/fleet (schema hfedmoe_fleet) unreachable" \
        in message
    assert "s3cret" not in message


@pytest.fixture
def proxied(pg_schema):
    """(proxy, StoreConfig) of the test database reached through a proxy that can be cut."""
    url, schema = pg_schema
    proxy, proxied_url = proxy_url(url)
    yield proxy, StoreConfig(url=proxied_url, schema=schema, connect_timeout_s=2)
    proxy.cut()


def test_a_lost_database_fails_each_write_and_the_store_reconnects(tmp_path, proxied):
    proxy, store_cfg = proxied
    store = open_store(ServerConfig(run_dir=str(tmp_path), store=store_cfg))
    store.spool_update(0, "a", b"blob-a", num_examples=1)
    proxy.cut()
    with pytest.raises(StoreError, match=f"127.0.0.1:{proxy.port}"):
        store.spool_update(0, "b", b"blob-b", num_examples=1)
    with pytest.raises(StoreError, match="unreachable"):  # still gone: connecting again fails
        store.update(0, "a")
    proxy.restore()
    store.spool_update(0, "b", b"blob-b", num_examples=1)
    assert [u.client_id for u in store.updates(0)] == ["a", "b"]
    store.close()


@pytest.fixture(scope="module")
def model():
    return build_hf_model("qwen3-moe", "classification", num_labels=3)


def test_losing_the_database_mid_round_stops_acks_until_it_returns(tmp_path, proxied, model):
    proxy, store_cfg = proxied
    cfg = ServerConfig(run_id=RUN, run_dir=str(tmp_path), store=store_cfg)
    store = open_store(cfg)
    store.upsert_devices([("a", {"local_examples": 4}, 1), ("b", {"local_examples": 4}, 1)])
    strategy = get_strategy(cfg.method.strategy, cfg.method)
    manifest, _ = build_shards(model.state())
    r = RoundState(0, ["a", "b"], 1e12, manifest.state_hash, manifest, expected=2)
    holder = Holder(r, 0, strategy.make_aggregator())
    transport = Recorder()
    intake = Intake(cfg, transport, store, model.state(), holder, strategy=strategy,
                    declared=DeclaredExamples(store))
    blob_a, sha_a = _blob(model, "a", 0, manifest.state_hash)
    blob_b, sha_b = _blob(model, "b", 0, manifest.state_hash)
    _send(intake, "a", blob_a, sha_a)

    proxy.cut()
    _send(intake, "b", blob_b, sha_b)
    assert transport.acks("b") == []  # not durable: not acknowledged, and not counted
    assert set(holder.aggregator.summaries) == {"a"} and set(r.accepted) == {"a"}
    assert r.rejected == 0

    proxy.restore()
    _send(intake, "b", blob_b, sha_b)  # the device sends it again (no ack came)
    assert [a.status for a in transport.acks("b")] == ["accepted"]
    assert set(holder.aggregator.summaries) == {"a", "b"} and set(r.accepted) == {"a", "b"}
    assert [u.client_id for u in store.updates(0)] == ["a", "b"]
    assert [p["client"] for p in store.participation(0)] == ["a", "b"]
    store.close()


def test_a_coordinator_and_its_workers_opening_at_once_migrate_once(tmp_path, pg_schema):
    from concurrent.futures import ThreadPoolExecutor

    url, schema = pg_schema
    cfg = ServerConfig(run_dir=str(tmp_path), store=StoreConfig(url=url, schema=schema))
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: open_store(cfg), range(4)))
    rows = stores[0]._run("SELECT version FROM schema_version")
    assert rows == [(1,)]
    stores[1].upsert_device("a", {}, budget=1)
    stores[2].refresh_device("a")
    assert stores[2].devices()["a"]["budget"] == 1
    for store in stores:
        store.close()
