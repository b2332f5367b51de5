"""Durable state: spooled updates, atomic checkpoints, reopen after a crash."""

import pytest
import torch

from hfedmoe.errors import StoreError
from server.store import Store


def test_updates_are_spooled_once_and_survive_reopen(tmp_path):
    store = Store(tmp_path)
    store.open_round(0, deadline=123.0, participants=["a", "b"], base_hash="h0")
    first = store.spool_update(0, "a", b"blob-a", num_examples=5)
    again = store.spool_update(0, "a", b"different", num_examples=9)  # a resend: ignored
    assert again == first
    store.spool_update(0, "b", b"blob-b", num_examples=7, late=True)
    store.close()

    reopened = Store(tmp_path)
    ups = reopened.updates(0)
    assert [(u.client_id, u.num_examples, u.late) for u in ups] == [("a", 5, False),
                                                                     ("b", 7, True)]
    assert reopened.read_update(ups[0]) == b"blob-a"
    assert reopened.round_info(0)["participants"] == ["a", "b"]
    assert reopened.round_info(0)["state"] == "open"


def test_tampered_spool_file_is_detected(tmp_path):
    store = Store(tmp_path)
    stored = store.spool_update(1, "a", b"payload", num_examples=1)
    stored.path.write_bytes(b"payload!")
    with pytest.raises(StoreError, match="sha256"):
        store.read_update(stored)


def test_checkpoint_marks_round_done_and_loads_back(tmp_path):
    store = Store(tmp_path)
    assert store.latest_checkpoint() is None
    store.open_round(0, 0.0, ["a"], "h0")
    state = {"layers.0.gate.weight": torch.arange(6.0).reshape(2, 3)}
    store.save_checkpoint(0, state, {"accuracy": 0.5}, "h1")
    rnd, loaded = store.latest_checkpoint()
    assert rnd == 0 and torch.equal(loaded["layers.0.gate.weight"], state["layers.0.gate.weight"])
    info = store.round_info(0)
    assert info["state"] == "done" and info["new_hash"] == "h1"
    assert info["metrics"] == {"accuracy": 0.5}
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_devices_and_rejections(tmp_path):
    store = Store(tmp_path)
    store.upsert_device("phone-1", {"kind": "android"}, budget=3)
    store.upsert_device("phone-1", {"kind": "android"}, budget=2)
    store.set_device_status("phone-1", "offline")
    assert store.devices()["phone-1"]["budget"] == 2
    assert store.devices()["phone-1"]["status"] == "offline"
    store.reject(0, "phone-9", "UnknownKeyError", "no such key")
    assert store.rejections(0) == [{"round": 0, "client": "phone-9", "error": "UnknownKeyError",
                                    "reason": "no such key"}]
