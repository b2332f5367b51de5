"""Emulated devices: a device profile (TOML or JSON) stands in for a live measurement.

A profile describes a device the kit should plan for without running on it (a Jetson Orin Nano,
a mid-range phone) so that the simulator and the budget can be exercised with realistic
heterogeneity on one machine. The profiles shipped in ``hfedmoe/profiles/*.toml`` are planning
estimates from public specifications, not measurements; each file cites its sources.

Profile keys (unknown keys are rejected)::

    name, description, basis            strings; basis says where the numbers come from
    platform                            jetson | android | linux | macos | windows
    accelerator                         cpu | cuda
    board, cpu_model, power_mode        strings (optional)
    logical_cores, physical_cores       integers (optional)
    memory_total_gib                    system memory
    memory_available_gib                what a training process can take
    unified_memory                      true when the GPU shares system memory
    gpu_name                            string (optional)
    gpu_memory_total_gib, gpu_memory_free_gib   discrete GPUs only (optional)
    training_memory_mib                 memory training may add on top of the loaded model
                                        (the app's share; optional)
    speed_factor                        fp32 matmul throughput / the reference's
    reference                           what speed_factor is relative to
    [matmul_gflops]                     sustained GFLOP/s per dtype: float32, bfloat16, float16
"""

from __future__ import annotations

import json
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
from hfedmoe.errors import DeviceError

GIB = 1024**3

_REQUIRED = {"name", "platform", "memory_total_gib", "memory_available_gib", "matmul_gflops"}
_OPTIONAL = {"description", "basis", "accelerator", "board", "cpu_model", "power_mode",
             "logical_cores", "physical_cores", "unified_memory", "gpu_name",
             "gpu_memory_total_gib", "gpu_memory_free_gib", "speed_factor", "reference",
             "training_memory_mib"}
_DTYPES = {"float32", "bfloat16", "float16"}


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
        raise DeviceError(f"{path}: invalid profile file: {exc}") from exc
    if not isinstance(data, dict):
        raise DeviceError(f"{path}: a profile is a table/object")
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


def _gib(data: dict[str, Any], key: str, where: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise DeviceError(f"{where}: {key} must be a non-negative number, got {value!r}")
    return int(value * GIB)


def profile_to_report(data: dict[str, Any], source: str) -> DeviceReport:
    """Build an emulated :class:`DeviceReport` from a parsed profile.

    Raises:
        DeviceError: on missing or unknown keys and malformed values.
    """
    missing = sorted(_REQUIRED - set(data))
    unknown = sorted(set(data) - _REQUIRED - _OPTIONAL)
    if missing or unknown:
        raise DeviceError(f"{source}: missing profile key(s) {missing}, unknown {unknown}")
    if data["platform"] not in PLATFORMS:
        raise DeviceError(f"{source}: platform must be one of {list(PLATFORMS)}")
    gflops = data["matmul_gflops"]
    if not isinstance(gflops, dict) or "float32" not in gflops or set(gflops) - _DTYPES:
        raise DeviceError(f"{source}: matmul_gflops needs float32 and only {sorted(_DTYPES)}")
    accelerator = data.get("accelerator", "cpu")
    device = "cuda" if accelerator == "cuda" else "cpu"
    matmul = {}
    for dtype, value in gflops.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise DeviceError(f"{source}: matmul_gflops.{dtype} must be > 0")
        matmul[dtype] = MatmulResult(dtype=dtype, device=device, n=0, iterations=0,
                                     seconds=0.0, gflops=float(value))
    total = _gib(data, "memory_total_gib", source)
    avail = _gib(data, "memory_available_gib", source)
    if avail is not None and total is not None and avail > total:
        raise DeviceError(f"{source}: memory_available_gib exceeds memory_total_gib")
    notes = [data.get("basis", "planning estimates from public specs, not measurements")]
    if data.get("reference"):
        notes.append(f"speed_factor reference: {data['reference']}")
    if data.get("description"):
        notes.insert(0, data["description"])
    return DeviceReport(
        platform=data["platform"], cpu_model=data.get("cpu_model"),
        logical_cores=data.get("logical_cores"), physical_cores=data.get("physical_cores"),
        memory_total_bytes=total, memory_available_bytes=avail, accelerator=accelerator,
        gpu_name=data.get("gpu_name"),
        gpu_memory_total_bytes=_gib(data, "gpu_memory_total_gib", source),
        gpu_memory_free_bytes=_gib(data, "gpu_memory_free_gib", source),
        unified_memory=bool(data.get("unified_memory", False)), board=data.get("board"),
        power_mode=data.get("power_mode"), matmul=matmul, emulated=True, source=source,
        speed_factor=data.get("speed_factor"), notes=tuple(notes),
        training_memory_quota_bytes=_quota(data, source),
        probes={"profile": {"ok": True, "value": data["name"]}},
    )


def _quota(data: dict[str, Any], source: str) -> int | None:
    value = data.get("training_memory_mib")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise DeviceError(f"{source}: training_memory_mib must be > 0")
    return int(value * 2**20)


def load_profile(name_or_path: str | Path) -> DeviceReport:
    """Load a device profile by shipped name (``jetson-orin-nano-8gb``) or file path.

    A ``.json`` file may also hold a saved :class:`DeviceReport` (it has ``schema_version``);
    it is then loaded as is and marked emulated.

    Returns:
        A report with ``emulated=True`` and ``source`` set to the name or path.

    Raises:
        DeviceError: if the profile does not exist or is malformed.
    """
    path, source = _resolve(name_or_path)
    data = _read(path)
    if "schema_version" in data:
        report = DeviceReport.from_dict(data)
        return DeviceReport.from_dict({**report.to_dict(), "emulated": True, "source": source})
    return profile_to_report(data, source)
