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


def test_a_run_evaluates_on_the_split_eval_split_names(tmp_path, minilm_available):
    """``data.eval_split = "validation"`` from a TOML file: every evaluation of the run is
    over the validation examples, and the rows say so."""
    if not minilm_available:
        pytest.skip("assets extra not installed")
    import json

    from hfedmoe.data import load_task
    from lab.simulate import simulate

    path = tmp_path / "sim.toml"
    path.write_text(f'run_dir = "{tmp_path / "sim"}"\nmax_eval_examples = 0\n'
                    "[model]\nnum_experts = 2\ntop_k = 1\nmax_length = 32\nupcycle = \"copy\"\n"
                    "[train]\nbatch_size = 8\nmax_steps = 1\nthreads = 1\n"
                    "[rounds]\nrounds = 1\ntrain_time_s = 5.0\n"
                    '[data]\nvalidation_fraction = 0.05\neval_split = "validation"\n')
    cfg = load_config(ServerConfig, path)
    task = load_task(cfg.data)
    assert len(task.validation) == 32 and len(task.test) == 129  # the counts tell them apart
    rows = simulate(cfg, 2, ["phone-midrange-6gb", "jetson-orin-nano-8gb"], measure_repeats=1)
    lines = (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()
    written = [json.loads(x) for x in lines]
    assert [r["phase"] for r in written] == [r["phase"] for r in rows] == ["initial", "round"]
    for r in (*rows, *written):
        assert r["eval_split"] == "validation" and r["examples"] == len(task.validation)
