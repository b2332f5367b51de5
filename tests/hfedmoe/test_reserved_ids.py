"""Reserved account names (``server``) can never become a device: refused by ``hfedmoe certs``,
by the agent config, and by the server's registration handler (with nothing registered)."""

from __future__ import annotations

import json

import pytest

from hfedmoe.errors import ConfigError, ReservedIdError
from hfedmoe.transport.topics import RESERVED_IDS, SERVER_ACCOUNT, check_device_id

RESERVED = ["server", "Server", "SERVER"]


def test_reserved_names():
    assert SERVER_ACCOUNT in RESERVED_IDS
    assert check_device_id("dev-1") == "dev-1" and check_device_id("server-2") == "server-2"
    for name in RESERVED:
        with pytest.raises(ReservedIdError):
            check_device_id(name)
    assert issubclass(ReservedIdError, ConfigError)


@pytest.mark.parametrize("name", RESERVED)
def test_certs_refuses_reserved_device_id(tmp_path, capsys, name):
    from hfedmoe.cli import main
    from hfedmoe.transport.broker_config import acl_text, write_mosquitto_config
    from hfedmoe.transport.certs import make_certs

    out = tmp_path / "pki"
    assert main(["certs", str(out), "--devices", f"dev1,{name}"]) == ConfigError.exit_code
    assert "ReservedIdError" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ReservedIdError):
        make_certs(out, ["dev1", name])
    with pytest.raises(ReservedIdError):
        acl_text(["dev1", name])
    with pytest.raises(ReservedIdError):
        write_mosquitto_config(tmp_path / "b", [name], plain_port=11883)
    assert main(["certs", str(out), "--devices", "dev1,dev1"]) == ConfigError.exit_code


@pytest.mark.parametrize("name", RESERVED)
def test_agent_config_refuses_reserved_device_id(name):
    from device_agent.config import AgentConfig
    from hfedmoe.config import from_dict

    with pytest.raises(ReservedIdError):
        AgentConfig(device_id=name)
    with pytest.raises(ReservedIdError):
        from_dict(AgentConfig, {"device_id": name, "run_id": "r"})
    assert AgentConfig(device_id="jetson-01").device_id == "jetson-01"


def test_server_rejects_registration_as_reserved_id(tmp_path):
    from hfedmoe.models.hf import build_hf_model
    from hfedmoe.transport.memory import MemoryHub
    from hfedmoe.transport.topics import Topics
    from server.config import RoundConfig, ServerConfig
    from server.coordinator import Coordinator

    model = build_hf_model("qwen3-moe", "classification", num_labels=3)
    cfg = ServerConfig(run_id="res", run_dir=str(tmp_path),
                       rounds=RoundConfig(rounds=1, deadline_s=60, min_devices=1))
    hub = MemoryHub()
    coordinator = Coordinator(cfg, hub.connect("coordinator"), model, None)
    coordinator.start()
    topics = Topics("res")
    acks: dict[str, list] = {}
    impostor, device = hub.connect("impostor"), hub.connect("a")
    for name in [*RESERVED, "a"]:
        acks[name] = []
        impostor.subscribe(topics.ack(name), lambda m, n=name: acks[n].append(json.loads(m.payload)))
    body = json.dumps({"budget": 2, "report": {"fake": True}}).encode()
    try:
        for name in RESERVED:
            impostor.publish(topics.register(name), body)
        device.publish(topics.register("a"), body)

        def answered() -> bool:
            coordinator.transport.pump(timeout=0.01)
            impostor.pump(timeout=0.01)
            return all(acks[n] for n in acks)

        assert impostor.run_until(answered, 10)
        for name in RESERVED:
            assert acks[name] == [{"type": "error", "round": None, "sha": "", "status": "rejected",
                                   "error": "ReservedIdError", "reason": acks[name][0]["reason"]}]
        assert acks["a"][0]["type"] == "registered"
        assert set(coordinator.store.devices()) == {"a"}  # nothing registered as "server"
        assert coordinator.round is None
    finally:
        coordinator.close()
        impostor.close()
        device.close()


@pytest.mark.parametrize("name", ["dev1\n", "dev1\r", "dev1\nuser server", "\ndev1", "dev 1"])
def test_an_id_with_a_line_break_is_refused_and_never_splits_an_acl_line(name):
    from hfedmoe.transport.broker_config import acl_text
    from hfedmoe.transport.topics import check_id

    with pytest.raises(ConfigError):
        check_device_id(name)
    with pytest.raises(ConfigError):
        check_id(name, "run id")
    with pytest.raises(ConfigError):
        acl_text(["dev0", name])


def test_digests_and_parameter_names_do_not_take_a_trailing_newline():
    from hfedmoe.errors import ModelError, ProtocolError
    from hfedmoe.names import parse_key
    from hfedmoe.protocol import PartialNotice
    from hfedmoe.transport.topics import check_sha

    with pytest.raises(ConfigError):
        check_sha("a" * 64 + "\n")
    with pytest.raises(ModelError):
        parse_key("layers.0.experts.1.w1\n")
    assert parse_key("layers.0.experts.1.w1").expert is not None
    with pytest.raises(ProtocolError):
        PartialNotice(0, "p", "a" * 64 + "\n")
    assert PartialNotice(0, "p", "a" * 64).sha256 == "a" * 64
