"""Probes of the device: platform, CPU, memory, power, battery, temperature.

Each probe is a small function that returns a JSON-able value or raises; :class:`ProbeLog`
runs it and records ``{"ok": True, "value": ...}`` or ``{"ok": False, "error": ...}`` so that a
missing sensor is written in the report instead of failing the run.

Every file is read below an injected ``root`` (``Path("/")`` on a real device), so tests build
fake ``/proc`` and ``/sys`` trees for a Jetson or an Android phone in a temporary directory.
Probes that can only look at the running system (psutil, jtop, ``nvpmodel``) are the caller's
choice (``live``); commands go through an injected runner.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

CommandRunner = Callable[[Sequence[str]], str]

# cgroup v1 reports "no limit" as a huge page-aligned number.
_NO_LIMIT = 1 << 60


class ProbeUnavailable(Exception):
    """A probe has nothing to read on this device."""


class ProbeLog:
    """Runs probes and records, per name, whether each worked and what it found."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Call ``fn``; record and return its value, or record the error and return None."""
        try:
            value = fn()
        except Exception as exc:  # a probe failing must never fail the report
            self.results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            return None
        try:
            json.dumps(value)
            shown = value
        except (TypeError, ValueError):
            shown = repr(value)  # keep the report JSON-able whatever a probe returns
        self.results[name] = {"ok": True, "value": shown}
        return value

    def skip(self, name: str, why: str) -> None:
        self.results[name] = {"ok": False, "error": f"skipped: {why}"}


def read_text(root: Path, rel: str) -> str:
    """Read ``root/rel`` as text (``rel`` is an absolute-looking path such as ``/proc/x``)."""
    path = root / rel.lstrip("/")
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError as exc:
        raise ProbeUnavailable(f"{rel} not found") from exc


def default_runner(argv: Sequence[str], timeout: float = 5.0) -> str:
    """Run a command and return its stdout; raise ProbeUnavailable if it is not installed."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except FileNotFoundError as exc:
        raise ProbeUnavailable(f"{argv[0]} not installed") from exc
    if done.returncode != 0:
        raise ProbeUnavailable(f"{argv[0]} exited {done.returncode}: {done.stderr.strip()[:200]}")
    return done.stdout


def first_line_runner(argv: Sequence[str], timeout: float = 5.0) -> str:
    """Start a command that prints forever (``tegrastats``), return its first line, stop it."""
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    except FileNotFoundError as exc:
        raise ProbeUnavailable(f"{argv[0]} not installed") from exc
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    proc.kill()
    proc.wait()
    if not line or not line[0].strip():
        raise ProbeUnavailable(f"{argv[0]} printed nothing in {timeout} s")
    return line[0]


# ---------------------------------------------------------------------------------------------
# Platform and CPU


def device_tree_model(root: Path) -> str:
    """The board name from the device tree (Jetson, Raspberry Pi), without the trailing NUL."""
    return read_text(root, "/proc/device-tree/model").strip("\x00\n ")


def detect_platform(root: Path, env: Mapping[str, str], system: str) -> str:
    """``"jetson"``, ``"android"``, ``"linux"``, ``"macos"`` or ``"windows"``.

    Args:
        root: filesystem root to look under.
        env: environment variables (Termux sets ``PREFIX=/data/data/com.termux/files/usr``).
        system: ``platform.system()`` of the running interpreter.
    """
    if (root / "etc/nv_tegra_release").exists():
        return "jetson"
    try:
        if "NVIDIA Jetson" in device_tree_model(root):
            return "jetson"
    except (ProbeUnavailable, OSError):
        pass
    if "com.termux" in env.get("PREFIX", "") or (root / "system/build.prop").exists():
        return "android"
    return {"Darwin": "macos", "Windows": "windows"}.get(system, "linux")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model, logical and physical core counts from ``/proc/cpuinfo`` text.

    The model is ``model name`` (x86, most arm64 kernels), else ``Hardware`` (older Android
    kernels), else ``Model`` (Raspberry Pi). Physical cores count distinct
    ``(physical id, core id)`` pairs and are None where the kernel does not list them.
    """
    model = None
    fields: dict[str, str] = {}
    logical = 0
    cores: set[tuple[str, str]] = set()
    physical_id = core_id = None
    for line in text.splitlines() + [""]:
        if not line.strip():
            if physical_id is not None and core_id is not None:
                cores.add((physical_id, core_id))
            physical_id = core_id = None
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            logical += 1
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
        fields.setdefault(key, value)
    for key in ("model name", "Hardware", "Model"):
        if fields.get(key):
            model = fields[key]
            break
    return {"model": model, "logical": logical or None, "physical": len(cores) or None}


# ---------------------------------------------------------------------------------------------
# Memory


def parse_meminfo(text: str) -> dict[str, int]:
    """``MemTotal`` and ``MemAvailable`` (bytes) from ``/proc/meminfo`` text.

    Kernels older than 3.14 lack ``MemAvailable``; it is then estimated as
    ``MemFree + Buffers + Cached``.
    """
    kib: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)", line)
        if m:
            kib[m.group(1)] = int(m.group(2))
    if "MemTotal" not in kib:
        raise ProbeUnavailable("MemTotal missing from /proc/meminfo")
    avail = kib.get("MemAvailable")
    if avail is None:
        avail = kib.get("MemFree", 0) + kib.get("Buffers", 0) + kib.get("Cached", 0)
    return {"total": kib["MemTotal"] * 1024, "available": avail * 1024}


def cgroup_memory(root: Path) -> dict[str, int]:
    """The memory limit and usage of this process's cgroup (v2 ``memory.max``, or v1).

    Raises:
        ProbeUnavailable: when no limit is set.
    """
    v2_path = v1_path = ""
    try:
        for line in read_text(root, "/proc/self/cgroup").splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0":
                v2_path = parts[2].strip("/")
            elif len(parts) == 3 and "memory" in parts[1].split(","):
                v1_path = parts[2].strip("/")
    except ProbeUnavailable:
        pass
    candidates = []
    for sub in dict.fromkeys((v2_path, "")):
        base = "/sys/fs/cgroup/" + (sub + "/" if sub else "")
        candidates.append((base + "memory.max", base + "memory.current"))
    for sub in dict.fromkeys((v1_path, "")):
        base = "/sys/fs/cgroup/memory/" + (sub + "/" if sub else "")
        candidates.append((base + "memory.limit_in_bytes", base + "memory.usage_in_bytes"))
    for limit_file, usage_file in candidates:
        try:
            raw = read_text(root, limit_file).strip()
        except ProbeUnavailable:
            continue
        if raw == "max" or int(raw) >= _NO_LIMIT:
            raise ProbeUnavailable(f"{limit_file}: no limit")
        out = {"limit": int(raw)}
        try:
            out["usage"] = int(read_text(root, usage_file).strip())
        except (ProbeUnavailable, ValueError):
            pass
        return out
    raise ProbeUnavailable("no cgroup memory limit file")


# ---------------------------------------------------------------------------------------------
# Power, battery, temperature


def parse_nvpmodel(text: str) -> dict[str, Any]:
    """``nvpmodel -q`` output (``NV Power Mode: 15W`` then the mode id) as name and id."""
    name = re.search(r"NV Power Mode:\s*(\S+)", text)
    ids = [ln.strip() for ln in text.splitlines() if ln.strip().isdigit()]
    if not name:
        raise ProbeUnavailable("no 'NV Power Mode' line")
    return {"name": name.group(1), "id": int(ids[0]) if ids else None}


def nvpmodel_status(root: Path) -> dict[str, Any]:
    """The power mode id nvpmodel last set, from ``/var/lib/nvpmodel/status`` (``pmode:0002``)."""
    m = re.search(r"pmode:(\d+)", read_text(root, "/var/lib/nvpmodel/status"))
    if not m:
        raise ProbeUnavailable("no pmode in /var/lib/nvpmodel/status")
    return {"name": None, "id": int(m.group(1))}


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One ``tegrastats`` line: RAM used/total MiB, GPU load %, temperatures, input power."""
    out: dict[str, Any] = {}
    if m := re.search(r"RAM (\d+)/(\d+)MB", line):
        out["ram_used_mib"], out["ram_total_mib"] = int(m.group(1)), int(m.group(2))
    if m := re.search(r"GR3D_FREQ (\d+)%", line):
        out["gpu_load_percent"] = int(m.group(1))
    temps = {k.lower(): float(v) for k, v in re.findall(r"(\w+)@(-?[\d.]+)C\b", line)}
    if temps:
        out["temperatures_c"] = temps
    if m := re.search(r"(?:VDD_IN|POM_5V_IN) (\d+)mW", line):
        out["input_power_mw"] = int(m.group(1))
    if not out:
        raise ProbeUnavailable("unrecognised tegrastats line")
    return out


def jetson_gpu_load(root: Path) -> float:
    """GPU load in percent from the Jetson sysfs node (per-mille in the file)."""
    for rel in ("/sys/devices/gpu.0/load", "/sys/devices/platform/gpu.0/load"):
        try:
            return int(read_text(root, rel).strip()) / 10.0
        except ProbeUnavailable:
            continue
    for path in sorted((root / "sys/devices/platform").glob("*.gpu/load")):
        return int(path.read_text().strip()) / 10.0
    raise ProbeUnavailable("no GPU load node")


def jtop_sample() -> dict[str, Any]:
    """Power mode and GPU load from jtop's service (``pip install jetson-stats``)."""
    from jtop import jtop  # lazy: jetson-stats is an optional dependency

    with jtop() as jetson:
        mode = jetson.nvpmodel  # None where nvpmodel is not installed
        out: dict[str, Any] = {"name": getattr(mode, "name", None), "id": getattr(mode, "id", None)}
        stats = dict(jetson.stats)
    out["gpu_load_percent"] = stats.get("GPU")
    return out


def sysfs_battery(root: Path) -> dict[str, Any]:
    """Percent and charging state of the first battery under ``/sys/class/power_supply``."""
    base = root / "sys/class/power_supply"
    for supply in sorted(base.glob("*")):
        kind = supply / "type"
        if kind.exists() and kind.read_text().strip() != "Battery":
            continue
        cap = supply / "capacity"
        if not cap.exists():
            continue
        status_file = supply / "status"
        status = status_file.read_text().strip() if status_file.exists() else None
        return {"percent": float(cap.read_text().strip()), "status": status,
                "plugged": None if status is None else status in ("Charging", "Full")}
    raise ProbeUnavailable("no battery under /sys/class/power_supply")


def thermal_zones(root: Path) -> dict[str, float]:
    """Temperature in deg C per thermal zone (``type`` or zone name -> value)."""
    out: dict[str, float] = {}
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        try:
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        kind = zone / "type"
        name = kind.read_text().strip() if kind.exists() else zone.name
        if name in out:
            name = f"{name}-{zone.name}"
        out[name] = milli / 1000.0
    if not out:
        raise ProbeUnavailable("no readable thermal zone")
    return out


def cpufreq(root: Path) -> dict[str, Any]:
    """Current vs maximum CPU frequency over all cores (kHz), and whether the max is capped.

    ``ratio`` is mean current / mean hardware max. Governors lower the clock when idle, so a
    low ratio only means throttling while the device is busy; ``capped`` (the policy max below
    the hardware max, which thermal cooling devices do) is a hint even when idle.
    """
    cur = hw_max = 0
    capped = False
    count = 0
    for node in sorted((root / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq")):
        try:
            c = int((node / "scaling_cur_freq").read_text())
            m = int((node / "cpuinfo_max_freq").read_text())
        except (OSError, ValueError):
            continue
        policy_max = node / "scaling_max_freq"
        if policy_max.exists() and int(policy_max.read_text()) < m:
            capped = True
        cur, hw_max, count = cur + c, hw_max + m, count + 1
    if not count or not hw_max:
        raise ProbeUnavailable("no cpufreq nodes")
    return {"cpus": count, "mean_cur_khz": cur / count, "mean_max_khz": hw_max / count,
            "ratio": cur / hw_max, "capped": capped}
