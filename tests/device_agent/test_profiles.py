"""Device profiles: they describe devices (memory, bandwidth, rates per dtype, each figure with
its source), never a model; a bad one is a ConfigError naming its key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from device_agent import profiles as profiles_module
from device_agent.profiles import load_profile
from hfedmoe.errors import ConfigError, DeviceError

GIB = 1024**3


def test_no_shipped_profile_has_a_model_specific_quota() -> None:
    for path in Path(profiles_module._profile_dir()).glob("*.toml"):
        assert "training_memory_mib" not in path.read_text(), path.name


def test_profile_rates_per_dtype_where_the_hardware_has_them() -> None:
    orin = load_profile("jetson-agx-orin-32gb")
    assert orin.gflops("bfloat16") > 5 * orin.gflops("float32")  # tensor cores
    assert set(orin.peak_gflops) == {"cpu", "gpu"}
    assert load_profile("phone-midrange-6gb").gflops("bfloat16") is None  # Armv8.2: no BF16
    assert load_profile("raspberry-pi-5-8gb").gflops("bfloat16") is None


TINY = """name = "tiny"
platform = "linux"
[memory]
total_gib = 2
available_gib = 1.5
app_limit_gib = 1.0
bandwidth_gbps = 10.0
source = "a data sheet"
[cpu]
source = "another data sheet"
peak_gflops = { float32 = 20.0 }
sustained_source = "an assumption"
sustained_gflops = { float32 = 10.0 }
"""


def test_profile_from_file_and_saved_report(tmp_path: Path) -> None:
    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY)
    tiny = load_profile(toml)
    assert tiny.emulated and tiny.source == str(toml)
    assert tiny.memory_available_bytes == int(1.5 * GIB)
    assert tiny.budget_memory_bytes == GIB  # the per-app limit is below what is available
    assert (tiny.gflops("float32"), tiny.peak_gflops, tiny.memory_bandwidth_gbps) == (
        10.0, {"cpu": {"float32": 20.0}}, 10.0)

    saved = tmp_path / "phone.json"
    load_profile("phone-midrange-6gb").save(saved)
    again = load_profile(saved)
    assert again.emulated and again.source == str(saved)

    toml.write_text(TINY + "ram = 3\n")  # lands in [cpu]
    with pytest.raises(ConfigError, match=r"unknown \['cpu.ram'\]"):
        load_profile(toml)
    with pytest.raises(DeviceError, match="no device profile"):
        load_profile("no-such-device")


@pytest.mark.parametrize(("old", "new", "field"), [
    ("available_gib = 1.5", "available_gib = 0", "memory.available_gib"),
    ("available_gib = 1.5\n", "", "memory.available_gib"),  # missing
    ("total_gib = 2", "total_gib = -4", "memory.total_gib"),
    ("bandwidth_gbps = 10.0", "bandwidth_gbps = 0", "memory.bandwidth_gbps"),
    ("sustained_gflops = { float32 = 10.0 }", "sustained_gflops = { float32 = 0 }",
     "sustained_gflops.float32"),
    ("sustained_gflops = { float32 = 10.0 }", "sustained_gflops = { bfloat16 = 10.0 }",
     "sustained_gflops"),  # no float32 rate
    ("sustained_gflops = { float32 = 10.0 }", "", "cpu.sustained_gflops"),  # missing
    ("sustained_gflops = { float32 = 10.0 }", "sustained_gflops = { float32 = 30.0 }",
     "cpu.sustained_gflops.float32"),  # above its peak
    ("peak_gflops = { float32 = 20.0 }", "peak_gflops = { float32 = 20.0, int3 = 1.0 }",
     "peak_gflops"),
    ('source = "a data sheet"', 'source = ""', "memory.source"),
    ('sustained_source = "an assumption"\n', "", "cpu.sustained_source"),
])
def test_bad_profile_is_a_config_error_naming_the_field(tmp_path: Path, old: str, new: str,
                                                        field: str) -> None:
    assert old in TINY
    path = tmp_path / "bad.toml"
    path.write_text(TINY.replace(old, new, 1))
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_profile(path)


def test_a_cuda_profile_needs_its_gpu_rates(tmp_path: Path) -> None:
    path = tmp_path / "gpu.toml"
    path.write_text(TINY.replace('platform = "linux"', 'platform = "linux"\naccelerator = "cuda"'))
    with pytest.raises(ConfigError, match=r"\[gpu\] must be a table"):
        load_profile(path)
