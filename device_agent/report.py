"""The device report: what the agent measured (or emulated) about its device, as a JSON value.

A :class:`DeviceReport` is built by :func:`device_agent.resources.probe_device` on a live device
or by :func:`device_agent.profiles.load_profile` from a device profile; it is saved next to a
run, logged, and sent to the server with the budget derived from it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.throughput import MatmulResult
from hfedmoe.errors import DeviceError

SCHEMA_VERSION = 1

PLATFORMS = ("jetson", "android", "linux", "macos", "windows")


@dataclass(frozen=True)
class DeviceReport:
    """Measured or emulated facts about one device.

    Memory is in bytes. Fields a probe could not fill are None; ``probes`` says, per probe,
    whether it worked and what it found or why not.

    Attributes:
        platform: one of :data:`PLATFORMS`.
        cpu_model: CPU name from ``/proc/cpuinfo`` or the OS.
        logical_cores: logical CPUs.
        physical_cores: physical cores, where the OS tells.
        torch_threads: ``torch.get_num_threads()`` when measured.
        cpu_capability: ``torch.backends.cpu.get_cpu_capability()`` (e.g. ``AVX512``).
        memory_total_bytes: system memory, lowered to the cgroup limit when that is smaller.
        memory_available_bytes: memory the kit can still take (MemAvailable, cgroup-aware).
        accelerator: ``"cpu"`` or ``"cuda"``.
        gpu_name: CUDA device name.
        gpu_memory_total_bytes: CUDA memory in total.
        gpu_memory_free_bytes: CUDA memory free at probe time.
        gpu_memory_held_bytes: CUDA memory this process's allocator held at probe time (live).
        unified_memory: the GPU shares system memory (Jetson): budget against system memory.
        board: board name from the device tree (Jetson, Raspberry Pi).
        power_mode: Jetson nvpmodel mode name or id.
        battery_percent: battery charge, when there is a battery.
        battery_plugged: on external power.
        temperature_c: the hottest thermal zone.
        cpufreq_ratio: mean current / mean maximum CPU clock.
        throttled: a throttling hint (CPU policy max below hardware max).
        matmul: sustained matmul throughput per dtype name.
        emulated: True when the report comes from a device profile, not a measurement.
        source: ``"live"`` or the profile name/path.
        speed_factor: profiles only: fp32 matmul throughput relative to the reference
            measurement named in the profile (see :func:`time_scale`).
        notes: free-text remarks (unified memory, estimate basis).
        probes: probe name -> ``{"ok": bool, "value" | "error": ...}``.
        created: ISO-8601 time of the measurement ("" for profiles).
        training_memory_quota_bytes: memory training may add on top of the loaded model
            (a user profile's ``training_memory_mib``; no shipped profile has one); None: no
            quota.
        process_rss_bytes: this process's resident memory when the report was taken (live).
        memory_bandwidth_gbps: memory bandwidth in GB/s (profiles; None where unknown).
        app_memory_limit_bytes: the OS's per-application memory limit, where it has one
            (profiles: ``memory.app_limit_gib``); the budget plans with the lower of it and
            the available memory.
        peak_gflops: processor (``cpu``, ``gpu``) -> dtype -> peak GFLOP/s (profiles).
        sources: figure -> where it comes from (profiles: vendor data sheets, estimates).
        emulation: the emulation scale the report's memory and rates were multiplied by
            (:class:`device_agent.emulation.EmulationScale` as a dict); None: not scaled.
        schema_version: version of this JSON layout.
    """

    platform: str
    cpu_model: str | None = None
    logical_cores: int | None = None
    physical_cores: int | None = None
    torch_threads: int | None = None
    cpu_capability: str | None = None
    memory_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    accelerator: str = "cpu"
    gpu_name: str | None = None
    gpu_memory_total_bytes: int | None = None
    gpu_memory_free_bytes: int | None = None
    gpu_memory_held_bytes: int | None = None
    unified_memory: bool = False
    board: str | None = None
    power_mode: str | None = None
    battery_percent: float | None = None
    battery_plugged: bool | None = None
    temperature_c: float | None = None
    cpufreq_ratio: float | None = None
    throttled: bool | None = None
    matmul: dict[str, MatmulResult] = field(default_factory=dict)
    emulated: bool = False
    source: str = "live"
    speed_factor: float | None = None
    training_memory_quota_bytes: int | None = None
    process_rss_bytes: int | None = None
    memory_bandwidth_gbps: float | None = None
    app_memory_limit_bytes: int | None = None
    peak_gflops: dict[str, dict[str, float]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    emulation: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise DeviceError(f"platform {self.platform!r} is not one of {list(PLATFORMS)}")
        if self.accelerator not in ("cpu", "cuda"):
            raise DeviceError(f"accelerator {self.accelerator!r} must be 'cpu' or 'cuda'")

    @property
    def budget_memory_bytes(self) -> int | None:
        """The memory a training budget may plan with.

        Free GPU memory on a discrete CUDA GPU; system available memory on CPU and on
        unified-memory devices (Jetson), where the GPU allocates from system RAM; never more
        than the OS's per-application limit where it has one.
        """
        if (self.accelerator == "cuda" and not self.unified_memory
                and self.gpu_memory_free_bytes is not None):
            return self.gpu_memory_free_bytes
        return self.host_memory_bytes

    @property
    def host_memory_bytes(self) -> int | None:
        """The host memory the process may take: system available memory, never more than
        the OS's per-application limit. On a discrete GPU this is the host pool, beside the
        GPU's own (:attr:`budget_memory_bytes`); elsewhere the two are the same."""
        if self.app_memory_limit_bytes is not None and self.memory_available_bytes is not None:
            return min(self.memory_available_bytes, self.app_memory_limit_bytes)
        return self.memory_available_bytes

    @property
    def discrete_gpu(self) -> bool:
        """Training runs on a GPU with memory of its own (not a Jetson's shared RAM)."""
        return self.accelerator == "cuda" and not self.unified_memory

    def held_bytes(self) -> int | None:
        """What this process held at probe time in the memory a budget plans with: its CUDA
        allocations on a discrete GPU; its resident memory plus its CUDA allocations (which
        come from the same RAM) elsewhere."""
        if self.discrete_gpu and self.gpu_memory_free_bytes is not None:
            return self.gpu_memory_held_bytes or 0
        if self.process_rss_bytes is None:
            return None
        return self.process_rss_bytes + (self.gpu_memory_held_bytes or 0)

    def gflops(self, dtype: str = "float32") -> float | None:
        """Sustained matmul GFLOP/s for ``dtype``, or None if not measured."""
        result = self.matmul.get(dtype)
        return result.gflops if result is not None else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form (dicts, lists, numbers, strings)."""
        out = dataclasses.asdict(self)
        out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceReport:
        """Rebuild a report from :meth:`to_dict` output.

        Raises:
            DeviceError: on an unknown schema version, unknown keys or malformed values.
        """
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise DeviceError(f"device report schema {version} is not {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DeviceError(f"unknown device report key(s): {', '.join(unknown)}")
        kwargs = dict(data)
        try:
            kwargs["matmul"] = {k: MatmulResult(**v) for k, v in data.get("matmul", {}).items()}
            kwargs["notes"] = tuple(data.get("notes", ()))
            return cls(**kwargs)
        except TypeError as exc:
            raise DeviceError(f"malformed device report: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write the report as indented JSON; returns the path."""
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> DeviceReport:
        """Read a report written by :meth:`save`.

        Raises:
            DeviceError: if the file is missing or not a valid report.
        """
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError as exc:
            raise DeviceError(f"device report not found: {p}") from exc
        except json.JSONDecodeError as exc:
            raise DeviceError(f"{p}: invalid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise DeviceError(f"{p}: a device report is a JSON object")
        return cls.from_dict(data)


def time_scale(host: DeviceReport, target: DeviceReport, dtype: str = "float32") -> float:
    """Factor turning a time measured on ``host`` into the time expected on ``target``.

    Uses the ratio of sustained matmul throughput for ``dtype`` when both reports have it,
    else the target's ``speed_factor`` (its fp32 throughput relative to the reference host
    its profile names). Compute-bound steps scale like this; memory-bound ones do not, so
    the result is a planning figure for emulation.

    Raises:
        DeviceError: when neither is available.
    """
    host_g, target_g = host.gflops(dtype), target.gflops(dtype)
    if host_g and target_g:
        return host_g / target_g
    if target.speed_factor:
        return 1.0 / target.speed_factor
    raise DeviceError(f"no {dtype} throughput or speed_factor to scale times by")
