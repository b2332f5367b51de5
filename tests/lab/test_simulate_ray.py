"""``hfedmoe simulate --backend ray``: the devices train in parallel on Ray actors and the run
gives the sequential backend's rows; a device's round does not depend on the devices trained
before it; without Ray the backend fails with a typed error that names the extra."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from hfedmoe.config import from_dict

PROFILES = ["phone-midrange-6gb", "jetson-orin-nano-8gb", "raspberry-pi-5-8gb"]


def _cfg(run_dir):
    from server.config import ServerConfig

    # fedmoe: budgets, and the assignment pass a device runs on its first round
    return from_dict(ServerConfig, {
        "run_dir": str(run_dir), "max_eval_examples": 16,
        "model": {"num_experts": 2, "top_k": 1, "max_length": 32},
        "train": {"batch_size": 8, "max_steps": 2, "threads": 1},
        "rounds": {"rounds": 2, "train_time_s": 5.0, "fraction": 1.0},
        "method": {"strategy": "fedmoe"}})


@pytest.fixture(scope="module")
def calibration(minilm_available, tmp_path_factory):
    """One host probe and cost measurement for every run here: budgets are decided from these
    timings, so runs compared with each other must share them."""
    if not minilm_available:
        pytest.skip("assets extra not installed")
    from lab.devices import calibrate

    return calibrate(_cfg(tmp_path_factory.mktemp("cal")), measure_repeats=1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_backend_gives_the_sequential_rows(tmp_path, calibration):
    ray = pytest.importorskip("ray")
    from hfedmoe.cli import main
    from lab.ray_backend import row_differences
    from lab.simulate import simulate

    seq = simulate(_cfg(tmp_path / "seq"), 3, PROFILES, calibration=calibration)
    times: dict[str, float] = {}
    try:
        par = simulate(_cfg(tmp_path / "ray"), 3, PROFILES, calibration=calibration,
                       backend="ray", ray_workers=2, timings=times)
        assert not ray.is_initialized()  # the local Ray it started is shut down
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert [r["round"] for r in par] == [-1, 0, 1]
    assert all(r["accepted"] == 3 for r in par[1:])
    assert row_differences(seq, par) == []
    assert set(times) == {"setup_s", "start_s", "close_s"}
    assert all(v > 0 for v in times.values())  # Ray's start and shutdown, timed apart
    run_dir = tmp_path / "ray"
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "run.db").is_file()
    assert main(["report", str(run_dir)]) == 0
    assert "Held-out evaluation" in (run_dir / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # each actor builds the model; on a loaded 2-core host, minutes
def test_a_run_across_a_two_node_ray_cluster_gives_the_sequential_rows(tmp_path, calibration,
                                                                       caplog):
    """``--ray-address``: the simulator joins a running cluster of two nodes (a head and a
    worker node, each its own raylet with one CPU, so the two actors land on different nodes)
    and gives the rows of the sequential backend."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from lab.ray_backend import row_differences
    from lab.simulate import simulate

    seq = simulate(_cfg(tmp_path / "seq"), 3, PROFILES, calibration=calibration)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        with caplog.at_level(logging.INFO, logger="hfedmoe.simulate"):
            par = simulate(_cfg(tmp_path / "ray"), 3, PROFILES, calibration=calibration,
                           backend="ray", ray_address=cluster.address, ray_workers=2)
        assert not ray.is_initialized()  # the driver left the cluster; the cluster runs on
        assert len([n for n in ray_nodes(cluster.address) if n["Alive"]]) == 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    assert "2 worker(s) with 1 torch thread(s) each" in caplog.text
    assert "on 2 node(s)" in caplog.text  # one actor on each node
    assert [r["round"] for r in par] == [-1, 0, 1]
    assert row_differences(seq, par) == []


def ray_nodes(address: str) -> list[dict]:
    """The cluster's nodes as a fresh driver sees them."""
    import ray

    ray.init(address=address, logging_level=logging.WARNING)
    try:
        return ray.nodes()
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_devices_round_does_not_depend_on_the_devices_before_it(tmp_path, calibration):
    """The sequential backend trains the devices in reverse order, after the process's random
    state was moved: every device sends the same update."""
    from device_agent.costs import decide_budget, steps_per_round
    from device_agent.profiles import load_profile
    from hfedmoe.data import load_task
    from hfedmoe.models.registry import build_model
    from hfedmoe.strategies import get_strategy
    from hfedmoe.wire import decode, spec_from_state
    from lab.devices import DeviceJob, SequentialBackend
    from server.rounds import held_entry, participation_record

    cfg = _cfg(tmp_path / "sim")
    task = load_task(cfg.data)
    shards = task.client_datasets(len(PROFILES))
    torch.manual_seed(cfg.rounds.seed)
    model = build_model(cfg.model, cfg.data.task, task.num_labels)
    strategy = get_strategy(cfg.method.strategy, cfg.method)
    state, spec = model.state(), spec_from_state(model.state())
    jobs = []
    for i, name in enumerate(PROFILES):
        steps = steps_per_round(len(shards[i]), cfg.train.batch_size, 1, cfg.train.max_steps)
        budget = decide_budget(load_profile(name), calibration.costs.cost,
                               cfg.rounds.train_time_s, steps, host=calibration.host,
                               routing_batches=min(cfg.train.selection_batches, steps))
        jobs.append(DeviceJob(i, f"d{i}", budget, None))
    backend = SequentialBackend(model, shards, cfg, strategy)
    forward = {o.index: o for o in backend.run(0, state, "base", jobs)}
    torch.manual_seed(1234)
    torch.rand(1000)
    backward = {o.index: o for o in backend.run(0, state, "base", jobs[::-1])}
    for i, job in enumerate(jobs):
        a, b = forward[i], backward[i]
        ua = decode(a.blob, spec, cfg.wire, round_idx=0, client_id=job.device_id)
        ub = decode(b.blob, spec, cfg.wire, round_idx=0, client_id=job.device_id)
        assert a.assignment == b.assignment and ua.usage == ub.usage
        held_a, held_b = (held_entry(participation_record(1, u, 0).to_dict()) for u in (ua, ub))
        assert held_a == held_b
        da, db = ua.deltas, ub.deltas
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da), i


def test_backend_ray_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    from hfedmoe.cli import main
    from hfedmoe.errors import ConfigError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    run_dir = tmp_path / "sim"
    code = main(["simulate", "--backend", "ray", "--devices", "2", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code and "ConfigError" in err
    assert 'pip install "hfedmoe[ray]"' in err
    assert not (run_dir / "metrics.jsonl").exists()  # failed before any work


def test_row_differences_ignore_timings_and_header_alignment_only():
    from lab.ray_backend import row_differences

    held = {"d0": {"bytes": 1000, "experts": 3}, "d1": {"bytes": 2000, "experts": 2}}
    row = {"round": 0, "phase": "round", "accuracy": 0.5, "wall_s": 1.0, "round_s": 2.0,
           "bytes_in": 3000, "held": held}
    timed = {**row, "wall_s": 9.0, "round_s": 0.1, "bytes_in": 3016,
             "held": {"d0": {"bytes": 1008, "experts": 3}, "d1": {"bytes": 2008, "experts": 2}}}
    assert row_differences([row], [timed]) == []

    other = {**row, "accuracy": 0.6, "held": {**held, "d1": {"bytes": 2016, "experts": 2}}}
    assert row_differences([row], [other]) == ["round 0: accuracy: 0.5 != 0.6",
                                               "round 0: held.d1.bytes: 2000 != 2016"]
    assert row_differences([row], [row, row]) == ["1 rows against 2"]


def test_without_an_address_the_backend_starts_a_new_local_ray(monkeypatch):
    """A Ray already running on the machine (which ``ray.init()`` would join, its address read
    from Ray's temp directory) is left alone: the backend asks for a new local one."""
    from types import SimpleNamespace

    from lab.ray_backend import RayBackend

    calls = []

    class Stop(Exception):
        pass

    def init(**kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False,
                                                            init=init))
    cfg = SimpleNamespace(train=SimpleNamespace(threads=1))
    with pytest.raises(Stop):
        RayBackend(cfg, [], 2, participants=2, workers=2)
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 2
