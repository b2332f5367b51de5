"""Certificate-bound identity on a real Mosquitto started from the kit's generated config, and
that config starting as root and as a normal user (the field-trial guide's own commands)."""

from __future__ import annotations

import multiprocessing
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfedmoe.errors import TransportError
from hfedmoe.transport.broker import free_port
from hfedmoe.transport.broker_config import write_mosquitto_config
from hfedmoe.transport.certs import make_certs
from hfedmoe.transport.config import TransportConfig
from hfedmoe.transport.mqtt import MqttTransport
from hfedmoe.transport.topics import Topics
from tests.broker_required import need_mosquitto
from tests.hfedmoe.transport.conftest import DEVICES, Mosquitto, _wait_port

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

DOC = Path(__file__).resolve().parents[3] / "docs" / "field-trials.md"


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _collect(transport, topic_filter: str) -> list[tuple[str, bytes]]:
    seen: list[tuple[str, bytes]] = []
    transport.subscribe(topic_filter, lambda m: seen.append((m.topic, m.payload)))
    assert transport.wait_subscribed(5)
    return seen


def _pump_until(transports, predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in transports:
            t.pump(timeout=0.01)
        if predicate():
            return True
    return False


@pytest.fixture(scope="module")
def dual(tmp_path_factory) -> Iterator[Mosquitto]:
    """The TLS listener plus a plain one, so a password file with every account's password
    exists: on the TLS listener those passwords must still not choose the identity."""
    need_mosquitto()
    root = tmp_path_factory.mktemp("dual")
    certs = make_certs(root / "pki", DEVICES)
    files = write_mosquitto_config(root / "broker", DEVICES, certs=certs, tls_port=free_port(),
                                   plain_port=free_port(), bind="127.0.0.1")
    assert files.passwd is not None and set(files.credentials) == {"server", *DEVICES}
    broker = Mosquitto(files, certs).start()
    _wait_port(files.plain_port)
    yield broker
    broker.stop()


@pytest.fixture(params=["tls-only", "tls+plain"])
def broker(request) -> Mosquitto:
    return request.getfixturevalue("mosquitto" if request.param == "tls-only" else "dual")


def test_dev1_certificate_cannot_act_as_dev2(broker):
    """dev1's certificate with username dev2 (and dev2's password, where one exists) logs in as
    dev1: what it publishes on dev2's update tree never reaches the server (who may read it)."""
    topics = Topics(f"run-{_tag()}")
    server = broker.connect("server", f"server-{_tag()}")
    # username dev2, dev2's own password when the config has one, dev1's certificate
    impostor = MqttTransport(broker.cfg("dev2", cert_of="dev1"), f"dev2-{_tag()}")
    dev2 = broker.connect("dev2", f"dev2-{_tag()}")
    try:
        server_sees = _collect(server, f"{topics.base}/#")
        impostor.publish(f"{topics.update('dev2', '0' * 64).prefix}/manifest", b"forged")
        impostor.publish(f"{topics.update('dev2', '0' * 64).prefix}/chunk/0", b"forged")
        impostor.publish(topics.register("dev2"), b"forged")
        impostor.publish(topics.status("dev2"), b"forged")
        impostor.publish(topics.register("dev1"), b"impostor-is-dev1")  # allowed: it *is* dev1
        dev2.publish(f"{topics.update('dev2', '1' * 64).prefix}/manifest", b"dev2-own")
        everyone = [server, impostor, dev2]
        assert _pump_until(everyone, lambda: (topics.register("dev1"), b"impostor-is-dev1")
                           in server_sees and any(p == b"dev2-own" for _, p in server_sees))
        _pump_until(everyone, lambda: False, timeout=0.3)
        assert not any(p == b"forged" for _, p in server_sees)
    finally:
        for t in (server, impostor, dev2):
            t.close()


def test_dev1_certificate_with_server_name_reads_nothing(broker):
    """dev1's certificate with the ``server`` account name (and password, where one exists)
    is dev1: it reads no other device's topics; the real server and dev1 still work."""
    topics = Topics(f"run-{_tag()}")
    server = broker.connect("server", f"server-{_tag()}")
    spy = MqttTransport(broker.cfg("server", cert_of="dev1"), f"server-{_tag()}")
    dev1 = broker.connect("dev1", f"dev1-{_tag()}")
    dev2 = broker.connect("dev2", f"dev2-{_tag()}")
    try:
        spy_all = _collect(spy, f"{topics.base}/#")
        spy_dev2 = _collect(spy, topics.ack_tree("dev2"))
        spy_updates = _collect(spy, f"{topics.base}/update/+/#")
        server_updates = _collect(server, topics.all_updates())
        dev1_own = _collect(dev1, topics.ack_tree("dev1"))
        dev2_own = _collect(dev2, topics.ack_tree("dev2"))
        spy.publish(topics.round(), b"forged-round")  # nor can it write as the server
        server.publish(topics.ack("dev2"), b"for-dev2")
        server.publish(topics.ack("dev1"), b"for-dev1")
        dev2.publish(f"{topics.update('dev2', '2' * 64).prefix}/manifest", b"dev2-update")
        everyone = [server, spy, dev1, dev2]
        assert _pump_until(everyone, lambda: dev1_own and dev2_own and server_updates)
        _pump_until(everyone, lambda: False, timeout=0.3)
        assert dev2_own == [(topics.ack("dev2"), b"for-dev2")]
        assert server_updates[0][1] == b"dev2-update"
        # as dev1 it may read its own ack tree through the "#" filter, nothing else
        assert spy_dev2 == [] and spy_updates == []
        assert all(t.startswith(topics.ack("dev1")) for t, _ in spy_all)
        assert dev1_own == [(topics.ack("dev1"), b"for-dev1")]
    finally:
        for t in (server, spy, dev1, dev2):
            t.close()


def test_password_alone_is_no_identity_on_tls(dual):
    """On the TLS listener a username/password without a certificate is refused, even with
    the server account's real password."""
    cfg = dual.cfg("server", cert=False)
    assert cfg.password  # the real one, from the plain listener's password file
    cfg = TransportConfig(**{**cfg.__dict__, "connect_timeout": 2.0})
    with pytest.raises(TransportError):
        MqttTransport(cfg, f"server-{_tag()}")


# --- the field-trial guide's commands: the broker starts as root and as a normal user ---------


def _doc_commands() -> tuple[list[str], list[str]]:
    """The ``hfedmoe certs`` and ``mosquitto -c`` lines of docs/field-trials.md, verbatim."""
    text = DOC.read_text()
    certs = re.findall(r"^hfedmoe certs .*$", text, re.M)
    start = re.findall(r"^(?:sudo )?mosquitto -c \S+$", text, re.M)
    assert len(certs) == 1 and start, "docs/field-trials.md lost its broker commands"
    return shlex.split(certs[0]), shlex.split(start[0].removeprefix("sudo "))


def _certs_args(port: int) -> list[str]:
    """The guide's ``hfedmoe certs`` arguments, on a free port and bound to loopback."""
    args, _ = _doc_commands()
    assert args[:2] == ["hfedmoe", "certs"]
    args = args[1:]
    i = args.index("--port")
    args[i + 1] = str(port)
    return [*args, "--bind", "127.0.0.1"]


def _run_certs(cwd: Path, port: int) -> None:
    out = subprocess.run([sys.executable, "-m", "hfedmoe.cli", *_certs_args(port)], cwd=cwd,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout


def _start(cwd: Path, prefix: list[str] = ()) -> subprocess.Popen:
    """The guide's start command (``mosquitto -c trial-pki/...``) run in ``cwd``."""
    _, start = _doc_commands()
    assert start[0] == "mosquitto"
    return subprocess.Popen([*prefix, need_mosquitto(), *start[1:]], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.stdout.read() if proc.stdout else ""


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # real uid
    raise AssertionError("no Uid line")


def _serves(cwd: Path, port: int) -> None:
    """A device and the server connect over TLS with their certificates and talk."""
    pki = cwd / "trial-pki"
    args = _certs_args(port)
    device = args[args.index("--devices") + 1].split(",")[0]

    def cfg(name: str) -> TransportConfig:
        return TransportConfig(url=f"mqtts://127.0.0.1:{port}", ca_cert=str(pki / "ca.crt"),
                               client_cert=str(pki / "clients" / f"{name}.crt"),
                               client_key=str(pki / "clients" / f"{name}.key"),
                               connect_timeout=5.0)

    topics = Topics(f"run-{_tag()}")
    server = MqttTransport(cfg("server"), f"server-{_tag()}")
    dev = MqttTransport(cfg(device), f"{device}-{_tag()}")
    try:
        seen = _collect(server, topics.all_register())
        dev.publish(topics.register(device), b"hello")
        assert _pump_until([server, dev], lambda: seen)
        assert seen == [(topics.register(device), b"hello")]
    finally:
        server.close()
        dev.close()


def _run_broker(cwd: Path, port: int, prefix: list[str] = ()) -> int:
    """Start the guide's command, check it serves TLS clients; returns the broker's uid."""
    proc = _start(cwd, prefix)
    try:
        try:
            _wait_port(port)
        except RuntimeError:
            raise AssertionError(f"mosquitto did not come up:\n{_stop(proc)}") from None
        uid = _uid_of(proc.pid)
        _serves(cwd, port)
        assert proc.poll() is None, _stop(proc)
        return uid
    finally:
        _stop(proc)


def _conf_user(cwd: Path) -> str | None:
    text = (cwd / "trial-pki" / "mosquitto" / "mosquitto.conf").read_text()
    users = re.findall(r"^user (\S+)$", text, re.M)
    return users[0] if users else None


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A working directory every account can enter (pytest's tmp_path is not: 0700)."""
    path = Path(tempfile.mkdtemp(prefix="hfedmoe-broker-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_guide_broker_starts_as_this_user(open_dir):
    """``hfedmoe certs`` + ``mosquitto -c`` exactly as in the guide, started by this process's
    user: as root it drops to ``mosquitto`` (which can read the broker key through its group,
    no key world-readable); as a normal user it stays that user."""
    port = free_port()
    _run_certs(open_dir, port)
    uid = _run_broker(open_dir, port)
    pki = open_dir / "trial-pki"
    for key in [pki / "ca.key", *(pki / "clients").glob("*.key"), pki / "broker.key"]:
        assert key.stat().st_mode & 0o007 == 0, f"{key} is world-readable"
    if os.geteuid() == 0:
        try:
            want = pwd.getpwnam("mosquitto")
        except KeyError:
            assert _conf_user(open_dir) == "root" and uid == 0
        else:
            assert _conf_user(open_dir) == "mosquitto" and uid == want.pw_uid
            assert (pki / "broker.key").stat().st_gid == want.pw_gid
            assert (pki / "broker.key").stat().st_mode & 0o777 == 0o640
            assert (pki / "ca.key").stat().st_mode & 0o777 == 0o600
    else:
        assert uid == os.geteuid()


def test_guide_broker_starts_as_root_from_unreachable_dir(tmp_path):
    """As root under a directory ``mosquitto`` cannot enter (pytest's 0700 tmp_path), the
    config keeps root instead of failing to read its files after the privilege drop."""
    if os.geteuid() != 0:
        pytest.skip("needs root: checks the privilege drop of a root-started broker")
    os.chmod(tmp_path, 0o700)
    port = free_port()
    _run_certs(tmp_path, port)
    uid = _run_broker(tmp_path, port)
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        pass
    assert _conf_user(tmp_path) == "root" and uid == 0


def _certs_as(uid: int, gid: int, cwd: Path, port: int) -> None:
    """``hfedmoe certs`` (the guide's arguments) run by another account, in a forked child."""
    from hfedmoe.transport import cli

    def child() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        os.chdir(cwd)
        import argparse

        parser = argparse.ArgumentParser()
        cli.register(parser.add_subparsers())
        args = parser.parse_args(_certs_args(port))
        os._exit(args.func(args))

    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=child)
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0


def test_guide_broker_starts_as_normal_user_and_as_root(open_dir):
    """Files made by a normal user (``nobody``): the broker starts as that user, and started
    as root it switches to that user (the ``user`` line) and can still read its files."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user (this run is already a normal user: "
                    "see test_guide_broker_starts_as_this_user)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not installed: cannot start mosquitto as nobody")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account")
    work = open_dir / "user"
    work.mkdir()
    os.chown(work, nobody.pw_uid, nobody.pw_gid)
    port = free_port()
    # in-process fork: this interpreter lives under /root, which nobody cannot execute from
    _certs_as(nobody.pw_uid, nobody.pw_gid, work, port)
    assert _conf_user(work) == "nobody"
    key = work / "trial-pki" / "broker.key"
    assert key.stat().st_uid == nobody.pw_uid and key.stat().st_mode & 0o777 == 0o600
    as_nobody = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                 "--clear-groups", "--"]
    assert _run_broker(work, port, as_nobody) == nobody.pw_uid
    assert _run_broker(work, port) == nobody.pw_uid  # as root: dropped to nobody
