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


STUDY_PROFILES = ("phone-midrange-6gb", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb",
                  "phone-flagship-12gb", "laptop-cpu-16gb", "jetson-agx-orin-32gb")


def _calibration(planned=None, scale=None):
    from types import SimpleNamespace

    from device_agent.budget import CostModel
    from device_agent.report import DeviceReport
    from device_agent.throughput import MatmulResult
    from lab.devices import Calibration

    # about what the fine-grained study measures: 192 experts, a 650 MB process, 0.6 MB each
    cost = CostModel(num_experts=192, non_expert_weight_bytes=0, expert_weight_bytes=0,
                     expert_state_bytes=590_000, expert_activation_bytes=0,
                     non_expert_activation_bytes=50_000_000, rest_step_seconds=0.2,
                     expert_frozen_seconds=0.001, expert_trained_seconds=0.002,
                     process_baseline_bytes=650_000_000)
    host = DeviceReport(platform="linux", matmul={"float32": MatmulResult(
        "float32", "cpu", 1024, 10, 1.0, 200.0)})
    return Calibration(host, SimpleNamespace(cost=cost), planned, scale)


def test_budget_share_keeps_the_study_budgets():
    """``benchmarks.learning --budget-share 0.25`` at 32 experts x 6 layers: a quarter of the
    192 experts x each profile's available memory over the largest (27 GiB), at least 1; the
    profiles' available memory is what it was, the emulation scale does not enter."""
    from device_agent.profiles import load_profile
    from lab.simulate import plan_budget

    cfg = load_config(ServerConfig, None, [
        "rounds.budget_share=0.25", "rounds.train_time_s=600", "rounds.deadline_s=600",
        "train.max_steps=5", "train.selection_batches=2"])
    reports = [load_profile(p) for p in STUDY_PROFILES]
    budgets = [plan_budget(cfg, r, _calibration(), 5, reports) for r in reports]
    assert [b.c_budget for b in budgets] == [4, 12, 11, 8, 16, 48]
    assert {b.limit for b in budgets} == {"cap"} and all(b.emulation is None for b in budgets)


def test_planned_budgets_refuse_a_window_shorter_than_one_step():
    from device_agent.budget import CostModel
    from device_agent.emulation import emulation_scale
    from device_agent.profiles import load_profile
    from device_agent.work import PlannedMode, StepWork
    from lab.simulate import plan_budget

    memory = CostModel(num_experts=8, non_expert_weight_bytes=1, expert_weight_bytes=1,
                       expert_state_bytes=1000, expert_activation_bytes=0)
    work = StepWork(1e9, 0, 0, 0, 0, 1e8, 0, 2e8, 0, 0)  # 1.8 GFLOP with no expert trained
    planned = PlannedMode("full", "fp32", "float32", memory, work, 10_000_000)
    calibration = _calibration(planned, emulation_scale("m", 10_000_000, "olmoe-1b-7b-0924"))
    phone = load_profile("phone-midrange-6gb")  # 60 GFLOP/s x 0.001445 = 87 MFLOP/s: 21 s
    ok = load_config(ServerConfig, None, ["rounds.train_time_s=120", "train.max_steps=2"])
    budget = plan_budget(ok, phone, calibration, 2, [phone])
    assert budget.emulation["reference"] == "OLMoE-1B-7B-0924" and budget.steps == 2
    short = load_config(ServerConfig, None, ["rounds.train_time_s=12", "train.max_steps=2"])
    with pytest.raises(ConfigError, match=r"rounds.train_time_s = 12 s is shorter than one step"):
        plan_budget(short, phone, calibration, 2, [phone])
