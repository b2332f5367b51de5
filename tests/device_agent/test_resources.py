"""Device probes on fake /proc and /sys trees, timed measurements, reports and profiles."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from device_agent import cli as profile_cli
from device_agent import probes as pr
from device_agent.profiles import list_profiles, load_profile
from device_agent.report import DeviceReport, time_scale
from device_agent.resources import probe_device
from device_agent.throughput import (
    PeakRSSSampler,
    measure_matmul,
    measure_step_costs,
    measure_throughput,
    supported_dtypes,
)
from hfedmoe.errors import DeviceError

GIB = 1024**3
MEMINFO = "MemTotal:        7800000 kB\nMemFree:          500000 kB\nMemAvailable:    6000000 kB\n"
TEGRASTATS = ("RAM 2446/7620MB (lfb 1x4MB) SWAP 0/3810MB CPU [12%@1510,8%@1510] "
              "GR3D_FREQ 37%@[624] cpu@47.5C soc2@45.1C gpu@46.0C VDD_IN 5123mW/5123mW")


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def no_command(argv: object) -> str:
    raise AssertionError(f"no command may run on a fake root: {argv}")


@pytest.fixture
def jetson_root(tmp_path: Path) -> Path:
    write(tmp_path, "/etc/nv_tegra_release", "# R36 (release), REVISION: 4.0\n")
    write(tmp_path, "/proc/device-tree/model", "NVIDIA Jetson Orin Nano Developer Kit\x00")
    write(tmp_path, "/proc/cpuinfo", "".join(
        f"processor\t: {i}\nBogoMIPS\t: 62.50\nCPU implementer\t: 0x41\n\n" for i in range(6)))
    write(tmp_path, "/proc/meminfo", MEMINFO)
    write(tmp_path, "/var/lib/nvpmodel/status", "pmode:0002 fmode:fanNull\n")
    write(tmp_path, "/sys/devices/gpu.0/load", "345\n")
    for i, (kind, milli) in enumerate([("cpu-thermal", 47500), ("gpu-thermal", 52250)]):
        write(tmp_path, f"/sys/class/thermal/thermal_zone{i}/type", kind + "\n")
        write(tmp_path, f"/sys/class/thermal/thermal_zone{i}/temp", f"{milli}\n")
    for i in range(6):
        base = f"/sys/devices/system/cpu/cpu{i}/cpufreq"
        write(tmp_path, f"{base}/scaling_cur_freq", "729600\n")
        write(tmp_path, f"{base}/cpuinfo_max_freq", "1459200\n")
        write(tmp_path, f"{base}/scaling_max_freq", "1459200\n" if i else "1036800\n")
    return tmp_path


@pytest.fixture
def android_root(tmp_path: Path) -> Path:
    write(tmp_path, "/system/build.prop", "ro.product.model=Pixel\n")
    write(tmp_path, "/proc/cpuinfo", "".join(f"processor\t: {i}\n\n" for i in range(8))
          + "Hardware\t: Qualcomm Technologies, Inc SM7325\n")
    write(tmp_path, "/proc/meminfo", "MemTotal:        5800000 kB\nMemAvailable:    2100000 kB\n")
    write(tmp_path, "/sys/class/power_supply/usb/type", "USB\n")
    write(tmp_path, "/sys/class/power_supply/battery/type", "Battery\n")
    write(tmp_path, "/sys/class/power_supply/battery/capacity", "73\n")
    write(tmp_path, "/sys/class/power_supply/battery/status", "Charging\n")
    return tmp_path


def test_fake_jetson_tree_parses(jetson_root: Path) -> None:
    report = probe_device(jetson_root, env={}, system="Linux", runner=no_command,
                          first_line=no_command, matmul_seconds=0)

    assert report.platform == "jetson"
    assert report.board == "NVIDIA Jetson Orin Nano Developer Kit"
    assert report.unified_memory and report.budget_memory_bytes == 6000000 * 1024
    assert (report.logical_cores, report.cpu_model) == (6, None)
    assert report.memory_total_bytes == 7800000 * 1024
    assert report.power_mode == "mode 2"
    assert report.probes["gpu_load"] == {"ok": True, "value": 34.5}
    assert report.temperature_c == 52.25
    assert report.cpufreq_ratio == pytest.approx(0.5) and report.throttled is True
    assert report.probes["matmul"]["ok"] is False and report.matmul == {}
    assert report.probes["cuda"]["error"].startswith("skipped")
    assert not report.emulated and report.source == "live"


def test_live_jetson_uses_nvpmodel_and_tegrastats(jetson_root: Path) -> None:
    calls: list[list[str]] = []

    def runner(argv: list[str]) -> str:
        calls.append(list(argv))
        return "NV Power Mode: 15W\n0\n"

    report = probe_device(jetson_root, live=True, env={}, system="Linux", runner=runner,
                          first_line=lambda argv: TEGRASTATS, use_jtop=False, matmul_seconds=0)

    assert calls == [["nvpmodel", "-q"]]
    assert report.power_mode == "15W"
    stats = report.probes["tegrastats"]["value"]
    assert stats["ram_used_mib"] == 2446 and stats["gpu_load_percent"] == 37
    assert stats["temperatures_c"]["gpu"] == 46.0 and stats["input_power_mw"] == 5123


def test_jtop_unavailable_is_recorded(jetson_root: Path) -> None:
    report = probe_device(jetson_root, live=True, env={}, system="Linux",
                          runner=lambda argv: "NV Power Mode: MAXN\n0\n",
                          first_line=lambda argv: TEGRASTATS, matmul_seconds=0)

    assert report.probes["jtop"]["ok"] is False  # no jetson-stats or no jtop service here
    assert report.power_mode == "MAXN"


def test_jtop_service_gives_power_mode(jetson_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeJtop:
        nvpmodel = types.SimpleNamespace(name="25W", id=1)
        stats = {"GPU": 12.5}

        def __enter__(self) -> FakeJtop:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setitem(sys.modules, "jtop", types.SimpleNamespace(jtop=FakeJtop))
    report = probe_device(jetson_root, live=True, env={}, system="Linux", runner=no_command,
                          first_line=lambda argv: TEGRASTATS, matmul_seconds=0)

    assert report.power_mode == "25W"
    assert report.probes["jtop"]["value"] == {"name": "25W", "id": 1, "gpu_load_percent": 12.5}


def test_fake_android_tree_parses(android_root: Path) -> None:
    env = {"PREFIX": "/data/data/com.termux/files/usr"}
    report = probe_device(android_root, live=True, env=env, system="Linux", matmul_seconds=0)

    assert report.platform == "android"
    assert report.cpu_model == "Qualcomm Technologies, Inc SM7325"
    # Android reads MemAvailable directly even on the live path.
    assert report.memory_available_bytes == 2100000 * 1024
    assert report.probes["meminfo"]["ok"] and "psutil.virtual_memory" not in report.probes


def test_android_battery_from_sysfs(android_root: Path) -> None:
    report = probe_device(android_root, env={}, system="Linux", matmul_seconds=0)

    assert report.platform == "android"
    assert (report.battery_percent, report.battery_plugged) == (73.0, True)


def test_termux_prefix_alone_means_android(tmp_path: Path) -> None:
    env = {"PREFIX": "/data/data/com.termux/files/usr"}
    assert pr.detect_platform(tmp_path, env, "Linux") == "android"
    assert pr.detect_platform(tmp_path, {}, "Darwin") == "macos"
    assert pr.detect_platform(tmp_path, {}, "Windows") == "windows"


def test_cgroup_limit_lowers_memory(tmp_path: Path) -> None:
    write(tmp_path, "/proc/meminfo", MEMINFO)
    write(tmp_path, "/proc/self/cgroup", "0::/jobs/a\n")
    write(tmp_path, "/sys/fs/cgroup/jobs/a/memory.max", f"{GIB}\n")
    write(tmp_path, "/sys/fs/cgroup/jobs/a/memory.current", f"{256 * 1024**2}\n")

    report = probe_device(tmp_path, env={}, system="Linux", matmul_seconds=0)

    assert report.memory_total_bytes == GIB
    assert report.memory_available_bytes == 768 * 1024**2


def test_cgroup_without_limit_is_unavailable(tmp_path: Path) -> None:
    write(tmp_path, "/sys/fs/cgroup/memory.max", "max\n")
    with pytest.raises(pr.ProbeUnavailable):
        pr.cgroup_memory(tmp_path)


def test_empty_root_reports_every_probe_unavailable(tmp_path: Path) -> None:
    report = probe_device(tmp_path, env={}, system="Darwin", matmul_seconds=0)

    assert report.platform == "macos"
    assert report.memory_available_bytes is None and report.budget_memory_bytes is None
    failed = {k for k, v in report.probes.items() if not v["ok"]}
    assert {"meminfo", "cpuinfo", "thermal_zones", "cpufreq", "sysfs_battery"} <= failed
    assert all("error" in report.probes[k] for k in failed)


def test_probe_log_records_errors_and_keeps_values_json_able() -> None:
    log = pr.ProbeLog()
    assert log.run("boom", lambda: 1 / 0) is None
    value = log.run("obj", lambda: {1, 2})

    assert log.results["boom"] == {"ok": False, "error": "ZeroDivisionError: division by zero"}
    assert value == {1, 2} and log.results["obj"] == {"ok": True, "value": "{1, 2}"}


def test_parsers() -> None:
    assert pr.parse_meminfo("MemTotal: 100 kB\nMemFree: 10 kB\nBuffers: 5 kB\nCached: 20 kB\n") \
        == {"total": 102400, "available": 35 * 1024}
    assert pr.parse_nvpmodel("NV Power Mode: MAXN_SUPER\n2\n") == {"name": "MAXN_SUPER", "id": 2}
    cpu = pr.parse_cpuinfo("processor: 0\nphysical id: 0\ncore id: 0\nmodel name: X\n\n"
                           "processor: 1\nphysical id: 0\ncore id: 0\nmodel name: X\n")
    assert cpu == {"model": "X", "logical": 2, "physical": 1}
    with pytest.raises(pr.ProbeUnavailable):
        pr.parse_tegrastats("nothing here")


def test_live_probe_and_json_round_trip(tmp_path: Path) -> None:
    report = probe_device(matmul_seconds=0.02, matmul_n=64)

    assert report.memory_available_bytes and report.memory_available_bytes > 0
    assert report.matmul["float32"].iterations >= 1
    loaded = DeviceReport.load(report.save(tmp_path / "r.json"))
    assert loaded == report
    assert json.loads((tmp_path / "r.json").read_text())["schema_version"] == 1


def test_report_rejects_bad_json() -> None:
    with pytest.raises(DeviceError, match="unknown"):
        DeviceReport.from_dict({"platform": "linux", "colour": "red"})
    with pytest.raises(DeviceError, match="schema"):
        DeviceReport.from_dict({"platform": "linux", "schema_version": 99})
    with pytest.raises(DeviceError, match="platform"):
        DeviceReport(platform="beos")


def test_matmul_measures_supported_dtypes() -> None:
    result = measure_matmul("float32", n=32, seconds=0.01, warmup=1)
    assert (result.dtype, result.n, result.device) == ("float32", 32, "cpu")
    assert result.iterations >= 1 and result.gflops > 0 and result.seconds > 0
    assert supported_dtypes("cpu")[0] == "float32"
    assert set(measure_throughput("cpu", seconds=0.01, n=32)) == set(supported_dtypes("cpu"))
    with pytest.raises(DeviceError):
        measure_matmul("int8")


def test_peak_sampler_sees_a_transient_peak() -> None:
    state = {"rss": 100}
    seen_high = threading.Event()

    def read() -> int:
        if state["rss"] == 1000:
            seen_high.set()
        return state["rss"]

    with PeakRSSSampler(interval=0.0005, read_rss=read) as sampler:
        state["rss"] = 1000
        assert seen_high.wait(5)
        state["rss"] = 100
    assert sampler.peak_bytes == 900


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak RSS only")
def test_peak_rss_catches_a_spike_between_samples() -> None:
    # a 64 MiB buffer written and freed while the sampling thread sleeps: only the kernel's
    # high-water mark sees it
    with PeakRSSSampler(interval=60.0) as sampler:
        big = torch.ones(16 * 1024 * 1024)
        del big
    with PeakRSSSampler(interval=60.0, kernel_peak=False) as sampled:
        big = torch.ones(16 * 1024 * 1024)
        del big
    assert sampler.peak_bytes >= 60 * 2**20
    assert sampled.peak_bytes < 60 * 2**20


def test_step_costs_of_an_mlp_closure() -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 32))
    x = torch.randn(16, 32)

    def run_expert() -> None:
        mlp.zero_grad()
        mlp(x).square().mean().backward()

    def run_rest() -> None:
        big = torch.ones(8 * 1024 * 1024)  # 32 MiB held briefly
        big.add_(1)

    def run_frozen() -> None:
        with torch.no_grad():
            mlp(x)

    costs = measure_step_costs(run_expert, run_rest, "cpu", repeats=3,
                               run_expert_frozen=run_frozen)

    assert len(costs.expert_samples) == len(costs.rest_samples) == 3
    assert costs.expert_seconds > 0 and costs.rest_seconds > 0
    assert costs.expert_frozen_seconds is not None and costs.expert_frozen_seconds > 0
    assert costs.memory_method == "rss-sampler"
    assert costs.expert_peak_bytes >= 0 and costs.rest_peak_bytes >= 0
    assert mlp[0].weight.grad is not None
    with pytest.raises(DeviceError):
        measure_step_costs(run_expert, run_rest, repeats=0)


@pytest.mark.parametrize("name", list_profiles())
def test_shipped_profiles_load_and_say_emulated(name: str) -> None:
    report = load_profile(name)

    assert report.emulated and report.source == name
    assert report.budget_memory_bytes and report.budget_memory_bytes > 0
    assert report.memory_available_bytes <= report.memory_total_bytes
    assert report.memory_bandwidth_gbps and report.memory_bandwidth_gbps > 0
    assert report.training_memory_quota_bytes is None  # a profile describes the device only
    trains_on = "gpu" if report.accelerator == "cuda" else "cpu"
    for dtype, m in report.matmul.items():  # sustained rates of the training processor
        assert 0 < m.gflops <= report.peak_gflops[trains_on][dtype], dtype
    assert report.gflops("float32")
    # every figure names its source: the memory, each processor, the sustained assumption
    assert {"memory", "memory_available", "memory_app_limit", trains_on,
            f"{trains_on}_sustained"} <= set(report.sources)
    assert all(len(v) > 20 for v in report.sources.values())
    assert any("not measurements" in n for n in report.notes)
    assert DeviceReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_profile_set_covers_the_planned_devices() -> None:
    assert {"jetson-orin-nano-8gb", "jetson-agx-orin-32gb", "phone-midrange-6gb",
            "phone-flagship-12gb", "laptop-cpu-16gb", "raspberry-pi-5-8gb"} <= set(list_profiles())
    assert load_profile("jetson-orin-nano-8gb").unified_memory


def test_time_scale_uses_throughput_ratio() -> None:
    host = load_profile("laptop-cpu-16gb")
    target = load_profile("raspberry-pi-5-8gb")
    assert time_scale(host, target) == pytest.approx(450.0 / 75.0)
    bare = DeviceReport(platform="linux")
    old_style = DeviceReport(platform="linux", speed_factor=0.36)  # a saved older report
    assert time_scale(bare, old_style) == pytest.approx(1 / 0.36)
    with pytest.raises(DeviceError):
        time_scale(bare, bare)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    profile_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_emulate_saves_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    args = _parser().parse_args(["profile", "--emulate", "phone-flagship-12gb", "--out", str(out)])

    assert args.func(args) == 0
    assert DeviceReport.load(out).source == "phone-flagship-12gb"
    assert "emulated: phone-flagship-12gb" in capsys.readouterr().out


def test_cli_live_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "live.json"
    args = _parser().parse_args(["profile", "--matmul-seconds", "0.02", "--matmul-size", "64",
                                 "--out", str(out)])
    assert args.func(args) == 0
    assert not DeviceReport.load(out).emulated
    assert "matmul float32" in capsys.readouterr().out

    args = _parser().parse_args(["profile", "--list-profiles"])
    assert args.func(args) == 0
    assert "raspberry-pi-5-8gb" in capsys.readouterr().out


def test_profile_command_is_registered_and_light() -> None:
    import subprocess

    from hfedmoe.cli import command_entry_points

    eps = {ep.name: ep.value for ep in command_entry_points()}
    assert eps["device"] == "device_agent.cli:register"
    code = "import sys, device_agent.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matmul_and_step_costs() -> None:
    assert "float16" in supported_dtypes("cuda")
    result = measure_matmul("float16", "cuda", n=256, seconds=0.05)
    assert result.device.startswith("cuda") and result.iterations >= 1

    def run_expert() -> None:
        torch.ones(1024, 1024, device="cuda").sum()

    costs = measure_step_costs(run_expert, run_expert, "cuda", repeats=2)
    assert costs.memory_method == "cuda-max-allocated"
    assert costs.expert_peak_bytes >= 4 * 1024 * 1024



def test_probe_order_and_report_of_a_fake_jetson_are_pinned(jetson_root: Path) -> None:
    report = probe_device(jetson_root, env={}, system="Linux", runner=no_command,
                          first_line=no_command, matmul_seconds=0)

    assert list(report.probes) == [
        "platform", "board", "cpuinfo", "meminfo", "cgroup_memory", "cuda", "nvpmodel_status",
        "gpu_load", "sysfs_battery", "thermal_zones", "cpufreq", "matmul", "cpu_capability"]
    assert report.probes["cuda"] == {"ok": False, "error": "skipped: not the live system"}
    assert report.probes["matmul"] == {"ok": False, "error": "skipped: matmul_seconds = 0"}
    host_dependent = {"probes", "torch_threads", "cpu_capability", "process_rss_bytes", "created"}
    assert {k: v for k, v in report.to_dict().items() if k not in host_dependent} == {
        "platform": "jetson", "cpu_model": None, "logical_cores": 6, "physical_cores": None,
        "memory_total_bytes": 7800000 * 1024, "memory_available_bytes": 6000000 * 1024,
        "accelerator": "cpu", "gpu_name": None, "gpu_memory_total_bytes": None,
        "gpu_memory_free_bytes": None, "gpu_memory_held_bytes": None, "unified_memory": True,
        "board": "NVIDIA Jetson Orin Nano Developer Kit", "power_mode": "mode 2",
        "battery_percent": None, "battery_plugged": None, "temperature_c": 52.25,
        "cpufreq_ratio": 0.5, "throttled": True, "matmul": {}, "emulated": False,
        "source": "live", "speed_factor": None, "training_memory_quota_bytes": None,
        "memory_bandwidth_gbps": None, "app_memory_limit_bytes": None, "peak_gflops": {},
        "sources": {}, "emulation": None,
        "notes": ["unified memory: the GPU allocates from system RAM; the budget uses system "
                  "available memory"], "schema_version": 1}


def test_probe_order_of_a_fake_android_is_pinned(android_root: Path) -> None:
    report = probe_device(android_root, env={}, system="Linux", matmul_seconds=0)

    assert list(report.probes) == [
        "platform", "board", "cpuinfo", "meminfo", "cgroup_memory", "cuda", "sysfs_battery",
        "thermal_zones", "cpufreq", "matmul", "cpu_capability"]
    assert (report.platform, report.unified_memory, report.notes) == ("android", False, ())
