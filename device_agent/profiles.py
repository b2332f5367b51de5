"""Emulated devices: a device profile (TOML or JSON) stands in for a live measurement.

A profile describes a device the kit should plan for without running on it (a Jetson Orin Nano,
a mid-range phone) so that the simulator and the budget can be exercised with realistic
heterogeneity on one machine. A profile describes the device, never a model: its memory, its
memory bandwidth and its processors' rates per dtype, each figure with the source it comes from.
The profiles shipped in ``hfedmoe/profiles/*.toml`` derive their peak figures from vendor
specifications; their sustained rates and the memory left to an application are planning
assumptions, and each file says so.

Profile keys (unknown keys are rejected; a bad value is a :class:`~hfedmoe.errors.ConfigError`
that names its key)::

    name, description, basis            strings; basis says where the numbers come from
    platform                            jetson | android | linux | macos | windows
    accelerator                         cpu | cuda: the processor training runs on
    board, cpu_model, power_mode, gpu_name   strings (optional)
    logical_cores, physical_cores       integers (optional)
    unified_memory                      true when the GPU shares system memory
    training_memory_mib                 optional, user profiles only: a cap on what training
                                        may add on top of the loaded model (no shipped profile
                                        has one: it would describe a model, not the device)
    [memory]
      total_gib, available_gib          system memory; what an application can take (> 0)
      app_limit_gib                     the OS's per-application limit, where it has one
      bandwidth_gbps                    memory bandwidth, GB/s (> 0)
      source, available_source, app_limit_source   where each figure comes from
    [cpu], [gpu]                        the processors; the one training runs on (``gpu``
                                        with ``accelerator = "cuda"``, else ``cpu``) is required
      peak_gflops                       {dtype = GFLOP/s}: float32 required; bfloat16, float16
      sustained_gflops                  what training-shaped matmuls reach (the training
                                        processor only; float32 required, each <= its peak)
      source, sustained_source          where the figures come from
    [gpu] of a discrete GPU (accelerator = "cuda", unified_memory false) also has its own memory,
    planned as a pool of its own beside the host's ``[memory]``:
      memory_total_gib, memory_available_gib   the GPU's memory; what training can take (> 0)
      memory_source, memory_available_source   where each comes from

A dtype a processor has no rate for is one the device cannot run
(:func:`device_agent.plan.rate_for` refuses it).
"""

from __future__ import annotations

import json
import math
import sys
from importlib import resources as _resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib  # novermin (guarded)
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

from device_agent.report import PLATFORMS, DeviceReport
from device_agent.throughput import MatmulResult
from hfedmoe.errors import ConfigError, DeviceError

GIB = 1024**3

_TOP_REQUIRED = {"name", "platform", "memory"}
_TOP_OPTIONAL = {"description", "basis", "accelerator", "board", "cpu_model", "power_mode",
                 "logical_cores", "physical_cores", "unified_memory", "gpu_name",
                 "training_memory_mib", "cpu", "gpu"}
_MEMORY_REQUIRED = {"total_gib", "available_gib", "bandwidth_gbps", "source"}
_MEMORY_OPTIONAL = {"available_source", "app_limit_gib", "app_limit_source"}
_PROC_KEYS = {"peak_gflops", "sustained_gflops", "source", "sustained_source"}
_GPU_MEMORY_KEYS = {"memory_total_gib", "memory_available_gib", "memory_source",
                    "memory_available_source"}
DTYPES = ("float32", "bfloat16", "float16")


def _profile_dir() -> Path:
    return Path(str(_resources.files("hfedmoe") / "profiles"))


def list_profiles() -> list[str]:
    """Names of the profiles shipped with the package."""
    return sorted(p.stem for p in _profile_dir().glob("*.toml"))


def _read(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: invalid profile file: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile is a table/object")
    return data


def _resolve(name_or_path: str | Path) -> tuple[Path, str]:
    path = Path(name_or_path)
    if path.is_file():
        return path, str(path)
    shipped = _profile_dir() / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped, str(name_or_path)
    raise DeviceError(f"no device profile {str(name_or_path)!r}: not a file and not one of "
                      f"{list_profiles()}")


def _positive(value: Any, key: str, where: str) -> float:
    """``value`` as a float > 0, else a ConfigError naming ``key``."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0):
        raise ConfigError(f"{where}: {key} must be a number > 0, got {value!r}")
    return float(value)


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key} must name where its figures come from (a non-empty "
                          f"string), got {value!r}")
    return value


def _table(data: dict[str, Any], key: str, required: set[str], optional: set[str],
           where: str) -> dict[str, Any]:
    table = data.get(key)
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
    missing = sorted(f"{key}.{k}" for k in required - set(table))
    unknown = sorted(f"{key}.{k}" for k in set(table) - required - optional)
    if missing or unknown:
        raise ConfigError(f"{where}: missing profile key(s) {missing}, unknown {unknown}")
    return table


def _rates(table: dict[str, Any], key: str, where: str) -> dict[str, float]:
    rates = table.get(key)
    if not isinstance(rates, dict) or "float32" not in rates:
        raise ConfigError(f"{where}: {key} must be a table with at least float32 "
                          f"(GFLOP/s per dtype: {', '.join(DTYPES)})")
    unknown = sorted(set(rates) - set(DTYPES))
    if unknown:
        raise ConfigError(f"{where}: {key} has unknown dtype(s) {unknown}; known: {DTYPES}")
    return {dtype: _positive(v, f"{key}.{dtype}", where) for dtype, v in rates.items()}


def _processor(data: dict[str, Any], name: str, trains: bool, where: str
               ) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """``(peak, sustained, sources)`` of the ``[cpu]`` or ``[gpu]`` table (sustained rates
    only for the processor training runs on)."""
    required = {"peak_gflops", "source"} | ({"sustained_gflops"} if trains else set())
    optional = _PROC_KEYS - required | (_GPU_MEMORY_KEYS if name == "gpu" else set())
    table = _table(data, name, required, optional, where)
    peak = _rates(table, "peak_gflops", f"{where} [{name}]")
    sources = {name: _text(table["source"], f"{name}.source", where)}
    sustained: dict[str, float] = {}
    if trains:
        sustained = _rates(table, "sustained_gflops", f"{where} [{name}]")
        sources[f"{name}_sustained"] = _text(table.get("sustained_source"),
                                             f"{name}.sustained_source", where)
        for dtype, rate in sustained.items():
            if dtype not in peak or rate > peak[dtype]:
                raise ConfigError(f"{where}: {name}.sustained_gflops.{dtype} = {rate:g} needs "
                                  f"a peak_gflops.{dtype} at least as high")
    elif "sustained_gflops" in table:
        raise ConfigError(f"{where}: {name}.sustained_gflops is for the processor training runs "
                          f"on (accelerator = {'cpu' if name == 'gpu' else 'cuda'})")
    return peak, sustained, sources


def _memory(data: dict[str, Any], where: str) -> tuple[dict[str, float], dict[str, str]]:
    mem = _table(data, "memory", _MEMORY_REQUIRED, _MEMORY_OPTIONAL, where)
    out = {k: _positive(mem[k], f"memory.{k}", where)
           for k in ("total_gib", "available_gib", "bandwidth_gbps")}
    if out["available_gib"] > out["total_gib"]:
        raise ConfigError(f"{where}: memory.available_gib exceeds memory.total_gib")
    if "app_limit_gib" in mem:
        out["app_limit_gib"] = _positive(mem["app_limit_gib"], "memory.app_limit_gib", where)
    sources = {"memory": _text(mem["source"], "memory.source", where)}
    for key in ("available_source", "app_limit_source"):
        if key in mem:
            sources[f"memory_{key.removesuffix('_source')}"] = _text(mem[key], f"memory.{key}",
                                                                     where)
    return out, sources


def _gpu_memory(data: dict[str, Any], where: str) -> tuple[dict[str, int], dict[str, str]]:
    """A discrete GPU's own memory (``[gpu] memory_*``) as report fields, and its sources;
    nothing for a CPU or a unified-memory device (whose GPU allocates from ``[memory]``)."""
    gpu = data.get("gpu") if isinstance(data.get("gpu"), dict) else {}
    if data.get("accelerator", "cpu") != "cuda" or data.get("unified_memory", False):
        given = sorted(f"gpu.{k}" for k in _GPU_MEMORY_KEYS & set(gpu))
        if given:
            raise ConfigError(f"{where}: {given} describe a discrete GPU's own memory "
                              f"(accelerator = 'cuda', unified_memory = false)")
        return {}, {}
    for key in ("memory_total_gib", "memory_available_gib", "memory_source"):
        if key not in gpu:
            raise ConfigError(f"{where}: gpu.{key} is required for a discrete GPU "
                              f"(accelerator = 'cuda', unified_memory = false): its own memory "
                              f"is planned as a pool beside the host's")
    total = _positive(gpu["memory_total_gib"], "gpu.memory_total_gib", where)
    free = _positive(gpu["memory_available_gib"], "gpu.memory_available_gib", where)
    if free > total:
        raise ConfigError(f"{where}: gpu.memory_available_gib exceeds gpu.memory_total_gib")
    sources = {"gpu_memory": _text(gpu["memory_source"], "gpu.memory_source", where)}
    if "memory_available_source" in gpu:
        sources["gpu_memory_available"] = _text(gpu["memory_available_source"],
                                                "gpu.memory_available_source", where)
    return ({"gpu_memory_total_bytes": int(total * GIB),
             "gpu_memory_free_bytes": int(free * GIB)}, sources)


def _top_level(data: dict[str, Any], where: str) -> str:
    """Check the top-level keys; the processor training runs on (``cpu`` or ``gpu``)."""
    missing = sorted(_TOP_REQUIRED - set(data))
    unknown = sorted(set(data) - _TOP_REQUIRED - _TOP_OPTIONAL)
    if missing or unknown:
        raise ConfigError(f"{where}: missing profile key(s) {missing}, unknown {unknown}")
    if data["platform"] not in PLATFORMS:
        raise ConfigError(f"{where}: platform must be one of {list(PLATFORMS)}")
    accelerator = data.get("accelerator", "cpu")
    if accelerator not in ("cpu", "cuda"):
        raise ConfigError(f"{where}: accelerator must be 'cpu' or 'cuda', got {accelerator!r}")
    return "gpu" if accelerator == "cuda" else "cpu"


def profile_to_report(data: dict[str, Any], source: str) -> DeviceReport:
    """Build an emulated :class:`DeviceReport` from a parsed profile.

    Raises:
        ConfigError: on missing or unknown keys and malformed values, naming the key.
    """
    trains_on = _top_level(data, source)
    memory, sources = _memory(data, source)
    peaks: dict[str, dict[str, float]] = {}
    sustained: dict[str, float] = {}
    for proc in sorted(("cpu", "gpu"), key=lambda p: p != trains_on):  # the training one first
        if proc in data or proc == trains_on:
            peak, rates, srcs = _processor(data, proc, proc == trains_on, source)
            peaks[proc] = peak
            sustained = rates or sustained
            sources.update(srcs)
    gpu_memory, gpu_sources = _gpu_memory(data, source)
    sources.update(gpu_sources)
    device = "cuda" if trains_on == "gpu" else "cpu"
    matmul = {dtype: MatmulResult(dtype=dtype, device=device, n=0, iterations=0, seconds=0.0,
                                  gflops=rate) for dtype, rate in sustained.items()}
    notes = [data.get("basis", "planning estimates from public specs, not measurements")]
    if data.get("description"):
        notes.insert(0, data["description"])
    app_limit = memory.get("app_limit_gib")
    return DeviceReport(
        platform=data["platform"], cpu_model=data.get("cpu_model"),
        logical_cores=data.get("logical_cores"), physical_cores=data.get("physical_cores"),
        memory_total_bytes=int(memory["total_gib"] * GIB),
        memory_available_bytes=int(memory["available_gib"] * GIB),
        accelerator=data.get("accelerator", "cpu"), gpu_name=data.get("gpu_name"),
        unified_memory=bool(data.get("unified_memory", False)), board=data.get("board"),
        power_mode=data.get("power_mode"), matmul=matmul, emulated=True, source=source,
        notes=tuple(notes), training_memory_quota_bytes=_quota(data, source),
        memory_bandwidth_gbps=memory["bandwidth_gbps"],
        app_memory_limit_bytes=None if app_limit is None else int(app_limit * GIB),
        peak_gflops=peaks, sources=sources,
        probes={"profile": {"ok": True, "value": data["name"]}}, **gpu_memory,
    )


def _quota(data: dict[str, Any], source: str) -> int | None:
    value = data.get("training_memory_mib")
    if value is None:
        return None
    return int(_positive(value, "training_memory_mib", source) * 2**20)


def load_profile(name_or_path: str | Path) -> DeviceReport:
    """Load a device profile by shipped name (``jetson-orin-nano-8gb``) or file path.

    A ``.json`` file may also hold a saved :class:`DeviceReport` (it has ``schema_version``);
    it is then loaded as is and marked emulated.

    Returns:
        A report with ``emulated=True`` and ``source`` set to the name or path.

    Raises:
        DeviceError: if the profile does not exist.
        ConfigError: if it is malformed (the message names the key).
    """
    path, source = _resolve(name_or_path)
    data = _read(path)
    if "schema_version" in data:
        report = DeviceReport.from_dict(data)
        return DeviceReport.from_dict({**report.to_dict(), "emulated": True, "source": source})
    return profile_to_report(data, source)
