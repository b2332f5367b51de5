"""``hfedmoe simulate``: device settings that make no sense are refused before any work."""

from __future__ import annotations

import pytest

from hfedmoe.cli import main
from hfedmoe.config import load_config
from hfedmoe.errors import ConfigError
from lab.simulate import check_devices
from server.config import ServerConfig


@pytest.mark.parametrize(("devices", "profiles", "overrides", "match"), [
    (0, [], [], r"a simulation needs at least one device, got 0"),
    (2, ["phone-midrange-6gb"], [], r"1 device profiles for 2 devices"),
    (2, ["a", "b"], ["rounds.min_updates=3"],
     r"rounds.min_updates = 3 asks each round for more updates than the 2 simulated devices"),
])
def test_device_settings_that_make_no_sense(devices, profiles, overrides, match):
    cfg = load_config(ServerConfig, None, overrides)
    with pytest.raises(ConfigError, match=match):
        check_devices(cfg, devices, profiles)


def test_a_simulation_of_as_many_updates_as_devices_is_fine():
    check_devices(load_config(ServerConfig, None, ["rounds.min_updates=2"]), 2, ["a", "b"])


@pytest.mark.parametrize(("argv", "says"), [
    (["--devices", "0"], "a simulation needs at least one device, got 0"),
    (["--devices", "2", "--set", "rounds.seed=-4"], "rounds.seed must be >= 0, got -4"),
    (["--devices", "2", "--set", "rounds.fraction=2"], "must be in (0, 1], got 2"),
])
def test_the_cli_refuses_them_before_any_work(tmp_path, capsys, argv, says):
    run_dir = tmp_path / "sim"
    code = main(["simulate", *argv, "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code and "ConfigError" in err and says in err
    assert not (run_dir / "metrics.jsonl").exists()
