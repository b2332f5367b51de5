"""Topics, the memory hub, config parsing, password hashing, certs and the no-torch rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hfedmoe.errors import ConfigError, TransportError
from hfedmoe.transport.base import Message
from hfedmoe.transport.broker_config import (
    MOSQUITTO_PASSWD,
    acl_text,
    hash_password,
    verify_password,
    write_mosquitto_config,
    write_password_file,
)
from hfedmoe.transport.certs import make_certs
from hfedmoe.transport.config import TransportConfig, parse_url
from hfedmoe.transport.memory import MemoryHub
from hfedmoe.transport.topics import Topics, check_id
from tests.broker_required import skip_or_fail

SHA = "ab" * 32


def test_topics_layout_and_parsing():
    t = Topics("run1")
    assert t.register("dev1") == "hfedmoe/v1/run1/register/dev1"
    assert t.status("dev1") == "hfedmoe/v1/run1/status/dev1"
    assert t.round() == "hfedmoe/v1/run1/round"
    assert t.ack("dev1") == "hfedmoe/v1/run1/ack/dev1"
    up = t.update("dev1", SHA)
    assert up.prefix == f"hfedmoe/v1/run1/update/dev1/{SHA}"
    assert up.request == f"hfedmoe/v1/run1/ack/dev1/resend/{SHA}"
    assert t.update_request_for(up.prefix) == up.request
    assert t.model_for("dev1", SHA).request == f"hfedmoe/v1/run1/update/dev1/fetch/{SHA}"
    assert t.parse(t.ack("dev2")) == ("ack", "dev2")
    with pytest.raises(TransportError):
        t.parse("hfedmoe/v1/other/round")


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x" * 65, "sp ace", "é"])
def test_ids_are_validated(bad):
    with pytest.raises(ConfigError):
        check_id(bad)
    with pytest.raises(ConfigError):
        Topics("run").register(bad)


def test_memory_hub_wildcards_retain_and_will():
    hub = MemoryHub()
    a, b = hub.connect("a", will=("s/a", b"offline")), hub.connect("b")
    seen: list[Message] = []
    b.subscribe("x/+/z", seen.append)
    b.subscribe("x/#", seen.append)  # overlapping filters: one delivery, both handlers
    a.publish("x/y/z", b"1")
    a.publish("x/y/q", b"2")
    a.publish("s/a", b"online", retain=True)
    assert b.pump() == 2
    assert [m.payload for m in seen] == [b"1", b"1", b"2"]
    late: list[Message] = []
    b.subscribe("s/#", late.append)
    b.pump()
    assert [m.payload for m in late] == [b"online"]
    a.drop()  # abnormal disconnect: the will fires
    b.pump()
    assert late[-1].payload == b"offline"
    b.unsubscribe("s/#")
    a.reconnect()
    a.publish("s/a", b"back")
    b.pump()
    assert late[-1].payload == b"offline"
    a.close()
    with pytest.raises(TransportError):
        a.publish("x", b"")


def test_handler_errors_do_not_stop_the_pump():
    hub = MemoryHub()
    t = hub.connect()
    got = []
    t.subscribe("t", lambda m: 1 / 0)
    t.subscribe("t", got.append)
    t.publish("t", b"ok")
    assert t.pump() == 1 and got


def test_transport_config():
    assert parse_url("mqtts://broker.local").port == 8883
    assert parse_url("mqtt://127.0.0.1:1999").tls is False
    for bad in ("http://x", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ConfigError):
            parse_url(bad)
    with pytest.raises(ConfigError):
        TransportConfig(client_cert="c.pem")
    with pytest.raises(ConfigError):
        TransportConfig(password="p")


def test_password_hash_format_matches_mosquitto(tmp_path):
    h = hash_password("secret", salt=b"0123456789ab")
    assert h.startswith("$7$101$") and verify_password("secret", h)
    assert not verify_password("nope", h) and not verify_password("secret", "garbage")
    if not Path(MOSQUITTO_PASSWD).exists():
        skip_or_fail("mosquitto_passwd not installed")
    path = write_password_file(tmp_path / "pw", {"alice": "s3cret"}, use_tool=True)
    user, hashed = path.read_text().strip().split(":", 1)
    assert user == "alice" and verify_password("s3cret", hashed)


def test_acl_grants():
    text = acl_text(["dev1"])
    assert "user server\ntopic readwrite hfedmoe/#" in text
    assert "topic write hfedmoe/v1/+/update/dev1/#" in text
    assert "topic read hfedmoe/v1/+/ack/dev1/#" in text
    assert "dev2" not in text


def test_certs_and_config_files(tmp_path):
    bundle = make_certs(tmp_path, ["dev1"], hosts=["edge.example", "10.1.2.3"], days=2)
    assert set(bundle.clients) == {"server", "dev1"}
    assert bundle.ca.key.stat().st_mode & 0o777 == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(bundle.broker.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "edge.example" in san.get_values_for_type(x509.DNSName)
    files = write_mosquitto_config(tmp_path / "b", ["dev1"], certs=bundle, tls_port=18883)
    conf = files.conf.read_text()
    assert "allow_anonymous false" in conf and "require_certificate true" in conf
    # the certificate is the identity on the TLS listener: no password file at all
    assert "use_identity_as_username true" in conf and "password_file" not in conf
    assert files.passwd is None and files.credentials == {}
    assert f"keyfile {bundle.broker.key.resolve()}" in conf  # absolute: any working directory
    # a plain listener has no certificates: there (only) a password proves the username
    files = write_mosquitto_config(tmp_path / "p", ["dev1"], certs=bundle, tls_port=18883,
                                   plain_port=11883, passwords={"dev1": "pw"})
    assert files.credentials["dev1"] == "pw" and len(files.credentials["server"]) > 16
    assert f"password_file {files.passwd}" in files.conf.read_text()
    with pytest.raises(ConfigError):  # passwords without a listener that uses them
        write_mosquitto_config(tmp_path / "q", ["dev1"], certs=bundle, passwords={"dev1": "pw"})
    with pytest.raises(ConfigError):
        write_mosquitto_config(tmp_path / "c", ["dev1"], certs=None)


def test_certs_command(tmp_path):
    import argparse

    from hfedmoe.transport import cli
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["certs", str(tmp_path), "--devices", "d1,d2"])
    assert args.func(args) == 0
    assert (tmp_path / "clients" / "d2.crt").exists()
    assert (tmp_path / "mosquitto" / "mosquitto.conf").exists()


def test_transport_never_imports_torch():
    code = ("import sys; import hfedmoe.transport.mqtt, hfedmoe.transport.chunks, "
            "hfedmoe.transport.memory, hfedmoe.transport.broker, hfedmoe.transport.broker_config,"
            " hfedmoe.transport.cli; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
