"""Durable state: spooled updates, atomic checkpoints, reopen after a crash, migrations.

Every test runs on both stores (the ``make_store`` fixture: SQLite, and PostgreSQL on a fresh
schema, skipped where no database answers unless ``HFEDMOE_REQUIRE_POSTGRES=1``).
"""

import pytest
import torch

from hfedmoe.errors import StoreError
from server.store import StateStore, migrations


def test_updates_are_spooled_once_and_survive_reopen(tmp_path, make_store):
    store = make_store(tmp_path)
    store.open_round(0, deadline=123.0, participants=["a", "b"], base_hash="h0")
    first = store.spool_update(0, "a", b"blob-a", num_examples=5)
    again = store.spool_update(0, "a", b"different", num_examples=9)  # a resend: ignored
    assert again == first
    store.spool_update(0, "b", b"blob-b", num_examples=7, late=True)
    store.close()

    reopened = make_store(tmp_path)
    ups = reopened.updates(0)
    assert [(u.client_id, u.num_examples, u.late) for u in ups] == [("a", 5, False),
                                                                     ("b", 7, True)]
    assert reopened.read_update(ups[0]) == b"blob-a"
    assert reopened.round_info(0)["participants"] == ["a", "b"]
    assert reopened.round_info(0)["state"] == "open"
    assert reopened.round_info(0)["deadline"] == 123.0
    assert reopened.last_round() == 0


def test_tampered_spool_file_is_detected(tmp_path, make_store):
    store = make_store(tmp_path)
    stored = store.spool_update(1, "a", b"payload", num_examples=1)
    stored.path.write_bytes(b"payload!")
    with pytest.raises(StoreError, match="sha256"):
        store.read_update(stored)


def test_checkpoint_marks_round_done_and_loads_back(tmp_path, make_store):
    store = make_store(tmp_path)
    assert store.latest_checkpoint() is None and store.last_round() is None
    store.open_round(0, 0.0, ["a"], "h0")
    state = {"layers.0.gate.weight": torch.arange(6.0).reshape(2, 3)}
    store.save_checkpoint(0, state, {"accuracy": 0.5}, "h1")
    rnd, loaded = store.latest_checkpoint()
    assert rnd == 0 and torch.equal(loaded["layers.0.gate.weight"], state["layers.0.gate.weight"])
    info = store.round_info(0)
    assert info["state"] == "done" and info["new_hash"] == "h1"
    assert info["metrics"] == {"accuracy": 0.5}
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_devices_and_rejections(tmp_path, make_store):
    store = make_store(tmp_path)
    store.upsert_device("phone-1", {"kind": "android"}, budget=3)
    store.upsert_device("phone-1", {"kind": "android"}, budget=2)
    store.set_device_status("phone-1", "offline")
    assert store.devices()["phone-1"]["budget"] == 2
    assert store.devices()["phone-1"]["status"] == "offline"
    store.reject(0, "phone-9", "UnknownKeyError", "no such key")
    store.reject(None, "phone-8", "ProtocolError", "not a message")
    assert store.rejections(0) == [{"round": 0, "client": "phone-9", "error": "UnknownKeyError",
                                    "reason": "no such key"}]
    assert [r["client"] for r in store.rejections()] == ["phone-9", "phone-8"]
    assert make_store(tmp_path).devices()["phone-1"] == dict(store.devices()["phone-1"])


def test_a_failed_transaction_keeps_neither_rows_nor_the_registry_mirror(tmp_path, make_store):
    store = make_store(tmp_path)
    store.upsert_device("a", {"n": 1}, budget=1)
    with pytest.raises(RuntimeError), store.transaction():
        store.upsert_device("a", {"n": 2}, budget=5)
        store.upsert_device("b", {"n": 3}, budget=2)
        store.spool_update(0, "a", b"blob", num_examples=1)
        raise RuntimeError("the update's record failed")
    assert set(store.devices()) == {"a"} and store.devices()["a"]["budget"] == 1
    assert store.update(0, "a") is None
    reopened = make_store(tmp_path)
    assert set(reopened.devices()) == {"a"} and reopened.devices()["a"]["report"] == {"n": 1}


def test_participation_skips_and_meta_upsert(tmp_path, make_store):
    store = make_store(tmp_path)
    store.record_participation(0, "b", 2, 1, 1, {"nbytes": 10})
    store.record_participation(0, "a", 2, 2, 1, {"nbytes": 5})
    store.record_participation(0, "a", 2, 1, 1, {"nbytes": 6})  # a resend's record: replaced
    assert [(p["client"], p["experts_sent"], p["nbytes"]) for p in store.participation(0)] == \
        [("a", 1, 6), ("b", 1, 10)]
    store.record_skip(1, "a", ["battery"], {"battery": 0.1})
    store.record_skip(1, "a", ["thermal"], {"thermal": "hot"}, during_round=True)
    store.record_skip(None, "b", ["metered"], {})  # outside any round: each one kept
    store.record_skip(None, "b", ["metered"], {})
    assert store.skips(1) == [{"round": 1, "client": "a", "reasons": ["thermal"],
                               "conditions": {"thermal": "hot"}, "during_round": True}]
    assert len(store.skips()) == 3
    assert store.get_meta("config") is None
    store.set_meta("config", "{}")
    store.set_meta("config", '{"x": 1}')
    assert store.get_meta("config") == '{"x": 1}'


def test_prune_keeps_the_last_and_the_best_checkpoint(tmp_path, make_store):
    store = make_store(tmp_path)
    state = {"w": torch.zeros(4)}
    for r, acc in enumerate([0.2, 0.9, 0.3, 0.4]):
        store.open_round(r, 0.0, ["a"], f"h{r}")
        store.spool_update(r, "a", b"x" * 100, num_examples=1)
        store.save_checkpoint(r, state, {"accuracy": acc}, f"h{r + 1}")
    freed = store.prune(3, keep_updates=False, keep_checkpoints=1, keep_best=True)
    assert freed > 400
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["global_r1.safetensors", "global_r3.safetensors"]
    assert not (tmp_path / "updates" / "r0").exists()
    assert store.latest_checkpoint()[0] == 3


def test_both_stores_are_state_stores_and_record_their_schema_version(tmp_path, make_store):
    store = make_store(tmp_path)
    assert isinstance(store, StateStore)
    assert store.schema_version() == migrations.STEPS[-1].version


def test_a_later_migration_step_is_applied_once_and_a_newer_database_refused(tmp_path,
                                                                             make_store):
    store = make_store(tmp_path)
    extra = migrations.Step(2, "an index", ("CREATE INDEX ix_upd ON updates(accepted_at)",),
                            ("CREATE INDEX ix_upd ON updates(accepted_at)",))
    steps = (*migrations.STEPS, extra)
    store.migrate(steps)
    store.migrate(steps)  # nothing pending: the index is not created twice
    assert store.schema_version() == 2
    with pytest.raises(StoreError, match="schema version 2 is newer than this kit's 1"):
        store.migrate()
    with pytest.raises(StoreError, match="newer"):
        make_store(tmp_path)  # a kit that knows only step 1 opens nothing


def test_a_store_at_another_spool_dir_keeps_blobs_there(tmp_path, make_store, store_config):
    import dataclasses

    from server.config import ServerConfig
    from server.store import open_store

    spool = tmp_path / "shared"
    cfg = ServerConfig(run_dir=str(tmp_path / "run"),
                       store=dataclasses.replace(store_config, spool_dir=str(spool)))
    store = open_store(cfg)
    try:
        stored = store.spool_update(0, "a", b"blob", num_examples=1)
        assert stored.path == spool / "updates" / "r0" / "a.bin"
        assert store.read_update(store.update(0, "a")) == b"blob"
    finally:
        store.close()
