"""Measure the device: build a :class:`DeviceReport` from live probes and a matmul benchmark.

This is the "measure" half of METHOD.md section 4; :mod:`device_agent.budget` is the "decide"
half. The report holds what the budget needs (available memory, sustained throughput) and what
explains it (platform, power mode, battery, temperature, throttling hints). Probes that are not
available on a device are recorded as such in ``report.probes``; they never fail the report.

The timed forward/backward of the actual model's parts lives in
:func:`device_agent.throughput.measure_step_costs`; emulated devices come from
:func:`device_agent.profiles.load_profile`. Both are re-exported here.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform as _platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from device_agent import probes as pr
from device_agent.profiles import list_profiles, load_profile
from device_agent.report import DeviceReport, time_scale
from device_agent.throughput import (
    MatmulResult,
    StepCosts,
    measure_matmul,
    measure_step_costs,
    measure_throughput,
)

__all__ = [
    "DeviceReport", "MatmulResult", "StepCosts", "list_profiles", "load_profile",
    "measure_matmul", "measure_step_costs", "measure_throughput", "probe_device", "time_scale",
]


def _first(log: pr.ProbeLog, attempts: list[tuple[str, Any]]) -> Any:
    """Run probes in order until one returns a value."""
    for name, fn in attempts:
        value = log.run(name, fn)
        if value is not None:
            return value
    return None


def _psutil_memory() -> dict[str, int]:
    import psutil

    vm = psutil.virtual_memory()
    return {"total": int(vm.total), "available": int(vm.available)}


def _psutil_battery() -> dict[str, Any]:
    import psutil

    batt = psutil.sensors_battery()
    if batt is None:
        raise pr.ProbeUnavailable("psutil reports no battery")
    return {"percent": float(batt.percent), "plugged": batt.power_plugged}


def _psutil_temperatures() -> dict[str, float]:
    import psutil

    temps = getattr(psutil, "sensors_temperatures", lambda: {})()
    out = {f"{chip}/{t.label or i}": float(t.current)
           for chip, entries in temps.items() for i, t in enumerate(entries)}
    if not out:
        raise pr.ProbeUnavailable("psutil reports no temperature sensors")
    return out


def _psutil_cpufreq() -> dict[str, Any]:
    import psutil

    freq = psutil.cpu_freq()
    if freq is None or not freq.max:
        raise pr.ProbeUnavailable("psutil reports no maximum CPU frequency")
    return {"mean_cur_khz": freq.current * 1000, "mean_max_khz": freq.max * 1000,
            "ratio": freq.current / freq.max, "capped": None}


def _psutil_counts() -> dict[str, int | None]:
    import psutil

    return {"logical": psutil.cpu_count(logical=True), "physical": psutil.cpu_count(logical=False)}


def _cuda_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise pr.ProbeUnavailable("CUDA not available")
    free, total = torch.cuda.mem_get_info()
    return {"name": torch.cuda.get_device_name(), "free": int(free), "total": int(total),
            "held": int(torch.cuda.memory_allocated())}


def _cores(log: pr.ProbeLog, live: bool, cpu: Mapping[str, Any]) -> tuple[int | None, int | None]:
    logical, physical = cpu.get("logical"), cpu.get("physical")
    if live:
        counts = log.run("psutil.cpu_count", _psutil_counts)
        if counts:
            logical = counts["logical"] or logical
            physical = counts["physical"] or physical
    return logical, physical


def _memory(log: pr.ProbeLog, root: Path, live: bool, kind: str) -> tuple[int | None, int | None]:
    meminfo = ("meminfo", lambda: pr.parse_meminfo(pr.read_text(root, "/proc/meminfo")))
    attempts = [meminfo]
    if live:
        # psutil's helpers may fail on Android (restricted /proc); MemAvailable is read directly.
        attempts = [meminfo, ("psutil.virtual_memory", _psutil_memory)] if kind == "android" \
            else [("psutil.virtual_memory", _psutil_memory), meminfo]
    mem = _first(log, attempts)
    if mem is None:
        return None, None
    total, avail = mem["total"], mem["available"]
    cg = log.run("cgroup_memory", lambda: pr.cgroup_memory(root))
    if cg and cg["limit"] < total:
        total = cg["limit"]
        avail = min(avail, cg["limit"] - cg.get("usage", 0))
    return total, max(0, avail)


def _jetson(log: pr.ProbeLog, root: Path, live: bool, runner: pr.CommandRunner,
            first_line: pr.CommandRunner, use_jtop: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mode = None
    if live and use_jtop:
        sample = log.run("jtop", pr.jtop_sample)
        if sample:
            mode = sample.get("name")
    if mode is None and live:
        q = log.run("nvpmodel", lambda: pr.parse_nvpmodel(runner(["nvpmodel", "-q"])))
        mode = q and q["name"]
    if mode is None:
        status = log.run("nvpmodel_status", lambda: pr.nvpmodel_status(root))
        mode = status and f"mode {status['id']}"
    out["power_mode"] = mode
    if live:
        log.run("tegrastats", lambda: pr.parse_tegrastats(
            first_line(["tegrastats", "--interval", "200"])))
    log.run("gpu_load", lambda: pr.jetson_gpu_load(root))
    return out


UNIFIED_MEMORY_NOTE = ("unified memory: the GPU allocates from system RAM; "
                       "the budget uses system available memory")


def _compute(log: pr.ProbeLog, root: Path, env: Mapping[str, str], system: str,
             live: bool) -> dict[str, Any]:
    """Compute probes: the platform, the board, the CPU model and its core counts.

    Returns:
        The :class:`DeviceReport` fields ``platform``, ``board``, ``cpu_model``,
        ``logical_cores`` and ``physical_cores``.
    """
    kind = log.run("platform", lambda: pr.detect_platform(root, env, system)) or "linux"
    board = log.run("board", lambda: pr.device_tree_model(root))
    cpu = log.run("cpuinfo", lambda: pr.parse_cpuinfo(pr.read_text(root, "/proc/cpuinfo"))) or {}
    cpu_model = cpu.get("model") or (_platform.processor() if live else None) or None
    logical, physical = _cores(log, live, cpu)
    return {"platform": kind, "board": board, "cpu_model": cpu_model,
            "logical_cores": logical, "physical_cores": physical}


def _gpu(cuda: Mapping[str, Any] | None) -> dict[str, Any]:
    """The :class:`DeviceReport`'s GPU fields from the CUDA probe (None: no GPU)."""
    return {"gpu_name": cuda and cuda["name"], "gpu_memory_total_bytes": cuda and cuda["total"],
            "gpu_memory_free_bytes": cuda and cuda["free"],
            "gpu_memory_held_bytes": cuda and cuda.get("held")}


def _power_and_heat(log: pr.ProbeLog, root: Path, live: bool) -> dict[str, Any]:
    """Power and thermal probes: the battery, the hottest sensor, the CPU frequency's cap.

    Live, psutil is asked first for the battery and after sysfs for temperatures and
    frequencies.

    Returns:
        The :class:`DeviceReport` fields ``battery_percent``, ``battery_plugged``,
        ``temperature_c``, ``cpufreq_ratio`` and ``throttled``.
    """
    batt_attempts = [("sysfs_battery", lambda: pr.sysfs_battery(root))]
    if live:
        batt_attempts.insert(0, ("psutil.sensors_battery", _psutil_battery))
    battery = _first(log, batt_attempts) or {}
    temp_attempts = [("thermal_zones", lambda: pr.thermal_zones(root))]
    freq_attempts = [("cpufreq", lambda: pr.cpufreq(root))]
    if live:
        temp_attempts.append(("psutil.sensors_temperatures", _psutil_temperatures))
        freq_attempts.append(("psutil.cpu_freq", _psutil_cpufreq))
    temps = _first(log, temp_attempts)
    freq = _first(log, freq_attempts) or {}
    return {"battery_percent": battery.get("percent"), "battery_plugged": battery.get("plugged"),
            "temperature_c": max(temps.values()) if temps else None,
            "cpufreq_ratio": freq.get("ratio"), "throttled": freq.get("capped")}


def _matmul(log: pr.ProbeLog, dev: str, seconds: float,
            n: int | None) -> dict[str, MatmulResult]:
    """The throughput probe: sustained matmul rate per dtype on ``dev`` (``seconds`` 0: skip)."""
    if seconds > 0:
        matmul = log.run("matmul", lambda: measure_throughput(dev, seconds, n)) or {}
        if matmul:
            log.results["matmul"]["value"] = sorted(matmul)
        return matmul
    log.skip("matmul", "matmul_seconds = 0")
    return {}


def probe_device(root: str | Path = "/", *, live: bool | None = None,
                 env: Mapping[str, str] | None = None, system: str | None = None,
                 runner: pr.CommandRunner | None = None,
                 first_line: pr.CommandRunner | None = None, use_jtop: bool = True,
                 device: str | None = None, matmul_seconds: float = 1.0,
                 matmul_n: int | None = None) -> DeviceReport:
    """Probe the device and measure sustained matmul throughput.

    Args:
        root: filesystem root that ``/proc``, ``/sys``, ``/etc`` are read under.
        live: whether this is the running system, so psutil, CUDA, jtop and commands may be
            asked too; defaults to ``root == "/"``.
        env: environment variables (default ``os.environ``).
        system: ``platform.system()`` override.
        runner: runs a command and returns its stdout (``nvpmodel -q``).
        first_line: runs a command and returns its first output line (``tegrastats``).
        use_jtop: ask jtop's service on Jetson (jetson-stats, imported lazily).
        device: ``"cpu"`` or ``"cuda"`` for the matmul benchmark; default CUDA if present.
        matmul_seconds: timed window per dtype; 0 skips the benchmark.
        matmul_n: matrix size (default 1024 on CPU, 4096 on CUDA).

    Returns:
        The report; ``emulated`` is False and ``source`` is ``"live"``.
    """
    import torch

    root = Path(root)
    live = root == Path("/") if live is None else live
    log = pr.ProbeLog()
    compute = _compute(log, root, os.environ if env is None else env,
                       _platform.system() if system is None else system, live)
    jetson = compute["platform"] == "jetson"
    total, avail = _memory(log, root, live, compute["platform"])
    cuda = log.run("cuda", _cuda_info) if live else log.skip("cuda", "not the live system")
    power_mode = None
    if jetson:
        power_mode = _jetson(log, root, live, runner or pr.default_runner,
                             first_line or pr.first_line_runner, use_jtop).get("power_mode")
    sensors = _power_and_heat(log, root, live)
    dev = device or ("cuda" if cuda else "cpu")
    matmul = _matmul(log, dev, matmul_seconds, matmul_n)
    return DeviceReport(
        **compute, torch_threads=torch.get_num_threads(),
        cpu_capability=log.run("cpu_capability", torch.backends.cpu.get_cpu_capability),
        memory_total_bytes=total, memory_available_bytes=avail,
        accelerator="cuda" if dev.startswith("cuda") else "cpu", **_gpu(cuda),
        unified_memory=jetson, power_mode=power_mode, **sensors, matmul=matmul,
        notes=(UNIFIED_MEMORY_NOTE,) if jetson else (), probes=log.results,
        process_rss_bytes=_rss(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _rss() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - an unavailable probe is not fatal
        return None


def probe_battery_temperature(root: Path = Path("/")) -> tuple[float | None, bool | None,
                                                              float | None]:
    """(battery %, charging, hottest temperature in deg C) now, each None when unreadable;
    cheap enough to call every few seconds during training (eligibility checks)."""
    log = pr.ProbeLog()
    battery = _first(log, [("psutil.sensors_battery", _psutil_battery),
                           ("sysfs_battery", lambda: pr.sysfs_battery(root))]) or {}
    temps = _first(log, [("thermal_zones", lambda: pr.thermal_zones(root)),
                         ("psutil.sensors_temperatures", _psutil_temperatures)])
    return (battery.get("percent"), battery.get("plugged"),
            max(temps.values()) if temps else None)
