"""``hfedmoe simulate``: federated rounds in one process, for experiments.

The same parts as a live run — budgets from the cost model measured on the real expert shape
and scaled to each device's profile, :func:`device_agent.train.train_round`, the wire format
(every update is encoded and decoded, so bytes are real), the strategy's streaming aggregator,
held-out evaluation — with the devices run one after another instead of over a broker, or in
parallel on Ray actors (``--backend ray``, :mod:`lab.ray_backend`). Round time is reported
in emulated device time: the slowest participant's measured local time scaled to its profile.
The run directory has the same ``metrics.jsonl``/``run.db`` layout as a server's, so
``hfedmoe report`` works on it.

Its config is the server's plus ``[devices]`` (:class:`lab.device_privacy.SimulationConfig`):
each simulated device's own ``[privacy]`` section, applied through the live agent's
:class:`~device_agent.privacy.DevicePrivacy` (the stricter of it and the announced DP
settings, its metadata released as it says, a round it refuses sat out with the reason, its
epsilon over the noise of each update it sent).

Both backends give the same rows for the same seed and :class:`~lab.devices.Calibration`, timing fields
aside: the driver decides every budget (from the costs it measured) and every participant; a
device's training randomness depends only on ``(rounds.seed, round, device index)``
(:func:`lab.devices.device_seed`), never on which devices trained before it in the same process; and the
updates are decoded and added to the streaming aggregator in the same order. The bits match
when both backends train with the same torch thread count (``train.threads``; Ray workers use
1 when it is unset). An update's size can move by the 8-byte alignment of its safetensors
header, whose JSON carries the device's measured seconds, and DP noise comes from the OS's
randomness, in either backend.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from device_agent.conditions import privacy_reason
from device_agent.privacy import DevicePrivacy
from hfedmoe.errors import ConfigError, PrivacyRefused
from lab.attacks import Attack
from lab.device_privacy import (
    SimulationConfig,
    admit_round,
    check_overrides,
    devices_of,
    new_device_privacy,
)
from lab.devices import Calibration, DeviceJob, SequentialBackend, _lora, calibrate
from lab.secagg import SecureAggregator
from server.bounds import bound_norms, check_experts, round_strategy
from server.rounds import (
    choose_participants,
    dense_update_bytes,
    disagreement_of,
    evaluates,
    initial_row,
    participation_record,
    round_row,
    routing_prior,
)

log = logging.getLogger("hfedmoe.simulate")

BACKENDS = ("sequential", "ray")


def _profiles(spec: str, n: int, seed: int) -> list[str]:
    from device_agent.profiles import list_profiles

    if not spec:
        names = list_profiles()
    elif Path(spec).is_file():
        names = [x.strip() for x in Path(spec).read_text().splitlines()
                 if x.strip() and not x.startswith("#")]
    else:
        names = [x.strip() for x in spec.split(",") if x.strip()]
    rng = random.Random(seed)
    return [names[i % len(names)] if i < len(names) else rng.choice(names) for i in range(n)]


def run_simulation(args: argparse.Namespace) -> int:
    from hfedmoe.config import load_config

    cfg = load_config(SimulationConfig, args.config, args.overrides)
    if args.run_dir:
        cfg = dataclasses.replace(cfg, run_dir=args.run_dir)
    rows = simulate(cfg, args.devices, _profiles(args.profiles, args.devices, cfg.rounds.seed),
                    backend=getattr(args, "backend", "sequential"),
                    ray_address=getattr(args, "ray_address", "") or "",
                    ray_workers=getattr(args, "ray_workers", 0) or 0)
    final = rows[-1]
    print(json.dumps({k: v for k, v in final.items() if k != "devices"}))
    from server.report import write_report

    print(f"report: {write_report(cfg.run_dir)}")
    return 0


def simulate(cfg: Any, num_devices: int, profiles: list[str], measure_repeats: int = 3, *,
             backend: str = "sequential", ray_address: str = "", ray_workers: int = 0,
             calibration: Calibration | None = None, attack: Attack | None = None,
             timings: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Run ``cfg.rounds.rounds`` rounds with ``num_devices`` emulated devices; metrics rows.

    Args:
        backend: ``"sequential"`` (one process) or ``"ray"`` (devices train in parallel on Ray
            actors; needs ``pip install "hfedmoe[ray]"``). Same rows for the same seed and
            calibration, timing fields aside.
        ray_address: join this Ray cluster; empty: start a new local Ray (unless this process
            already has one), never one already running on this machine.
        ray_workers: Ray actors (0: the CPUs Ray has over the threads each worker uses), at
            most the participants of a round.
        calibration: the host probe and measured costs budgets are decided from (measured
            now when None); give one to rerun with the same budgets.
        attack: devices that poison their updates (:mod:`lab.attacks`; the simulator only).
        timings: filled, when given, with the seconds of the run's parts that no row holds:
            ``setup_s`` (task, model, calibration when not given, devices), ``start_s`` (the
            backend built: for Ray, its start and every actor ready) and ``close_s`` (the
            backend closed: for a Ray this run started, its shutdown).
    """
    _check_backend(backend, ray_workers)
    check_devices(cfg, num_devices, profiles)
    times = timings if timings is not None else {}
    t0 = time.perf_counter()
    sim = _setup(cfg, num_devices, profiles, measure_repeats, calibration)
    times["setup_s"] = time.perf_counter() - t0
    sim.attack = attack
    try:
        rows = [_write(sim.run_dir, initial_row(_evaluate(sim)))]
        # after the calibration: starting actors would skew its timings
        t0 = time.perf_counter()
        sim.runner = _runner(sim, backend, ray_address, ray_workers)
        times["start_s"] = time.perf_counter() - t0
        for r in range(cfg.rounds.rounds):
            row = _round(sim, r)
            rows.append(_write(sim.run_dir, row))
            log.info("round %d: %s", r, {k: v for k, v in row.items()
                                         if k not in ("devices", "budgets", "held")})
    finally:
        t0 = time.perf_counter()
        if sim.runner is not None:
            sim.runner.close()
            times["close_s"] = time.perf_counter() - t0
        sim.store.close()
        for d in sim.devices:
            d.privacy.ledger.close()
    return rows


@dataclasses.dataclass
class SimDevice:
    """An emulated device as the driver keeps it between rounds."""

    index: int  # its data shard and its seed
    id: str
    budget: Any  # device_agent.budget.Budget, decided once from the calibration
    scale: float  # its profile's time over this host's
    have: set[str]  # model shards it holds
    profile: str  # its profile's name
    # its own privacy settings ([devices] of the simulation config: lab.device_privacy) and
    # its ledger: the noise multiplier of each noised update it sent, accounted one by one
    privacy: DevicePrivacy
    assignment: frozenset | None = None  # fedmoe's fixed sub-model once known

    def dp_noises(self) -> list[float]:
        """The noise multiplier of each noised update it has sent, oldest first."""
        return [z for z, _ in self.privacy.ledger.rounds()]


@dataclasses.dataclass
class _Simulation:
    """What every round of a simulation uses."""

    cfg: Any
    run_dir: Path
    store: Any  # server.store.Store
    task: Any  # hfedmoe.data task: shards and the held-out split
    model: Any  # the server's model (aggregation, evaluation)
    strategy: Any
    spec: Any  # the wire's tensor spec (with LoRA factors when train.adapter = "lora")
    devices: list[SimDevice]
    shards: list[Any]
    global_state: dict[str, torch.Tensor]
    runner: Any = None  # SequentialBackend or lab.ray_backend.RayBackend
    attack: Attack | None = None  # poisoning devices (benchmarks/poisoning.py)
    prior: dict = dataclasses.field(default_factory=dict)  # server.rounds.routing_prior
    secagg_keys: set = dataclasses.field(default_factory=set)  # public keys of past rounds


@dataclasses.dataclass
class _Tally:
    """What the round's updates said, in the order of its jobs."""

    accepted: dict[str, int] = dataclasses.field(default_factory=dict)  # device -> bytes
    records: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    usage: dict[str, Any] = dataclasses.field(default_factory=dict)
    disagreement: dict[str, float] = dataclasses.field(default_factory=dict)
    device_s: list[float] = dataclasses.field(default_factory=list)  # emulated seconds
    rejected: int = 0  # updates the policy refused (server.bounds)


def _check_backend(backend: str, ray_workers: int) -> None:
    from hfedmoe.errors import ConfigError

    if backend not in BACKENDS:
        raise ConfigError(f"unknown simulate backend {backend!r}; one of {', '.join(BACKENDS)}")
    if ray_workers < 0:
        raise ConfigError(f"ray workers must be >= 0 (0: one per CPU), got {ray_workers}")
    if backend == "ray":
        from lab.ray_backend import require_ray

        require_ray()  # before anything slow: a missing extra fails at once


def check_devices(cfg: Any, num_devices: int, profiles: list[str]) -> None:
    """Refuse a simulation whose devices make no sense, before anything is built: no device,
    a profile list that does not give each device one, more updates asked of a round
    (``rounds.min_updates``) than there are devices, or a ``[[devices.overrides]]`` entry
    naming a device index or profile the run has none of."""
    from hfedmoe.errors import ConfigError

    if num_devices < 1:
        raise ConfigError(f"a simulation needs at least one device, got {num_devices}")
    if len(profiles) != num_devices:
        raise ConfigError(f"{len(profiles)} device profiles for {num_devices} devices")
    if cfg.rounds.min_updates > num_devices:
        raise ConfigError(f"rounds.min_updates = {cfg.rounds.min_updates} asks each round for "
                          f"more updates than the {num_devices} simulated devices")
    check_overrides(devices_of(cfg), num_devices, profiles)


def _setup(cfg: Any, num_devices: int, profiles: list[str], measure_repeats: int,
           calibration: Calibration | None) -> _Simulation:
    """A fresh run directory, the task, the model and the devices with their budgets."""
    from hfedmoe.data import fit_task, load_task
    from hfedmoe.lora import with_factors
    from hfedmoe.models.registry import build_model
    from hfedmoe.modelsync import build_shards
    from hfedmoe.wire import spec_from_state
    from server.store import Store

    torch.manual_seed(cfg.rounds.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run_dir)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    store = Store(run_dir)
    task = load_task(cfg.data)
    model = build_model(cfg.model, cfg.data.task, task.num_labels)
    task = fit_task(task, model.require_tokenizer(), cfg.model.max_length)
    shards = task.client_datasets(num_devices)
    spec = spec_from_state(model.state())
    if _lora(cfg) is not None:  # updates carry factors; the server averages their products
        spec = with_factors(spec, _lora(cfg), model.lora_bases)
    if calibration is None:
        calibration = calibrate(cfg, measure_repeats, model)
    devices = _register_devices(cfg, profiles, shards, calibration, store)
    base_manifest, _ = build_shards(model.state())
    for d in devices:
        d.have = set(base_manifest.shards.values())
    return _Simulation(cfg, run_dir, store, task, model,
                       round_strategy(cfg), spec, devices, shards,
                       model.state())


def _register_devices(cfg: Any, profiles: list[str], shards: list[Any],
                      calibration: Calibration, store: Any) -> list[SimDevice]:
    """One device per profile, its budget decided from the calibration, registered in the
    store as a live device registers."""
    from device_agent.costs import steps_per_round
    from device_agent.profiles import load_profile
    from device_agent.report import time_scale

    reports = [load_profile(name) for name in profiles]
    own = devices_of(cfg)
    devices = []
    for i, (name, report) in enumerate(zip(profiles, reports, strict=True)):
        steps = steps_per_round(len(shards[i]), cfg.train.batch_size, cfg.train.local_epochs,
                                cfg.train.max_steps)
        budget = plan_budget(cfg, report, calibration, steps, reports)
        scale = time_scale(calibration.host, report)  # host seconds -> the device's
        if budget.emulation:  # the device's rates were scaled down by the emulation scale
            scale /= budget.emulation["factor"]
        dev = SimDevice(i, f"sim{i:03d}-{name}", budget, scale, set(), name,
                        new_device_privacy(own, i, name))
        store.upsert_device(dev.id, {**report.to_dict(), "budget": budget.to_dict(),
                                     "local_examples": len(shards[i])}, budget.c_budget)
        devices.append(dev)
    return devices


def share_cap(share: float, num_experts: int, report: Any, reports: Sequence[Any]) -> int:
    """``rounds.budget_share``'s cap: ``share`` x ``num_experts`` x the device's available
    memory over the largest of ``reports``', rounded, at least 1."""
    most = max(r.memory_available_bytes or 0 for r in reports)
    mine = report.memory_available_bytes or 0
    return max(1, round(share * num_experts * mine / most)) if most > 0 else 1


def plan_budget(cfg: Any, report: Any, calibration: Calibration, steps: int,
                reports: Sequence[Any]) -> Any:
    """An emulated device's budget: planned from its profile's memory and rates at the
    emulation scale (:func:`device_agent.emulation.planned_budget`: the same in every run), or
    with ``rounds.budget_share`` > 0 the share cap over the measured cost model's plan, the
    memory the profile's available memory unscaled (a quota lifted to it).

    Raises:
        ConfigError: naming the window's setting when it cannot hold one local step.
    """
    from device_agent.costs import decide_budget
    from device_agent.emulation import planned_budget

    window = cfg.rounds.train_time_s or cfg.rounds.deadline_s
    routing = min(cfg.train.selection_batches or steps, steps)
    if cfg.rounds.budget_share > 0:
        return decide_budget(
            report, calibration.costs.cost, window, steps, host=calibration.host,
            routing_batches=routing, min_experts=cfg.train.min_experts,
            cap=share_cap(cfg.rounds.budget_share, calibration.costs.cost.num_experts, report,
                          reports), quota_bytes=report.memory_available_bytes)
    if calibration.planned is None:
        raise ConfigError("this calibration has no planned model (lab.devices.plan_model)")
    field = "rounds.train_time_s" if cfg.rounds.train_time_s else "rounds.deadline_s"
    return planned_budget(calibration.planned, report, window_s=window, steps=steps,
                          scale=calibration.scale, routing_batches=routing,
                          min_experts=cfg.train.min_experts, window_field=field)


def _runner(sim: _Simulation, backend: str, ray_address: str, ray_workers: int) -> Any:
    cfg = sim.cfg
    if backend == "ray":
        from lab.ray_backend import RayBackend

        most = len(_choose(sim, 0))  # the participants of any round
        return RayBackend(cfg, sim.shards, sim.task.num_labels, most, address=ray_address,
                          workers=ray_workers)
    # model.quantize: the devices' copy stores its frozen base quantized, re-quantized from the
    # fp32 global weights every round; the server's model (aggregation, evaluation) stays fp32
    device_model = copy.deepcopy(sim.model) if cfg.model.quantize != "none" else sim.model
    return SequentialBackend(device_model, sim.shards, cfg, sim.strategy)


def _choose(sim: _Simulation, round_idx: int) -> list[SimDevice]:
    """The round's participants (:func:`server.rounds.choose_participants`), in device order.
    No over-selection: every chosen device reports, there are no stragglers to cover."""
    rc = sim.cfg.rounds
    by_id = {d.id: d for d in sim.devices}
    chosen = choose_participants(by_id, round_idx, fraction=rc.fraction, seed=rc.seed)
    return sorted((by_id[c] for c in chosen), key=lambda d: d.index)


def _round(sim: _Simulation, r: int) -> dict[str, Any]:
    """One round: choose, hand out the model, train, aggregate, evaluate; its metrics row."""
    from hfedmoe.modelsync import build_shards

    wall0 = time.perf_counter()
    manifest, blobs = build_shards(sim.global_state)
    chosen = _choose(sim, r)
    sim.store.open_round(r, 0.0, [d.id for d in chosen], manifest.state_hash)
    jobs, skipped, bytes_out = _jobs(sim, r, chosen, manifest, blobs)
    aggregator = _aggregator(sim)
    tally = _train(sim, r, manifest.state_hash, jobs, aggregator)
    t0 = time.perf_counter()
    report = aggregator.report()
    if tally.accepted:  # every device may sit out (privacy budgets spent): the model stays
        sim.global_state = aggregator.finalize(sim.global_state)
    if tally.accepted and not sim.cfg.secagg.enabled:  # the prior needs per-client usage
        sim.prior = routing_prior(sim.prior, tally.usage,
                                  {d.id: len(sim.shards[d.index]) for d in chosen})
    agg_s = time.perf_counter() - t0
    sim.model.load_state(sim.global_state)
    metrics = (_evaluate(sim) if evaluates(r, sim.cfg.rounds.rounds, sim.cfg.eval_every)
               else {})
    row = round_row(
        r, participants=[d.id for d in chosen], accepted=tally.accepted, report=report,
        metrics=metrics, budgets={d.id: d.budget.c_budget for d in sim.devices},
        records=tally.records, usage=tally.usage, disagreement=tally.disagreement,
        dense_bytes=dense_update_bytes(sim.global_state, sim.cfg.wire.dtype),
        method=sim.cfg.method, noised_updates={d.id: d.dp_noises() for d in sim.devices},
        aggregation_s=agg_s, round_s=max(tally.device_s, default=0.0), rejected=tally.rejected,
        wall_s=time.perf_counter() - wall0, num_experts=len(sim.model.expert_ids()),
        bytes_out=bytes_out, skipped=skipped)
    if sim.cfg.secagg.enabled:
        row["secagg"] = aggregator.summary()
    row["run_dir_bytes"] = _checkpoint(sim, r, metrics)
    return row


def _aggregator(sim: _Simulation) -> Any:
    """The strategy's streaming aggregator, or a secure round (``[secagg] enabled``,
    :class:`lab.secagg.SecureAggregator`) over the same rule."""
    if not sim.cfg.secagg.enabled:
        return sim.strategy.make_aggregator()
    return SecureAggregator(sim.strategy.rule, sim.cfg.secagg, sim.secagg_keys)


def _jobs(sim: _Simulation, r: int, chosen: list[SimDevice], manifest: Any,
          blobs: dict[str, bytes]) -> tuple[list[DeviceJob], dict[str, list[str]], int]:
    """The chosen devices' jobs, the devices that sit out and why, and the model bytes the
    jobs' devices fetch (the shards they lack).

    Each device takes the round's settings as a live agent does (:func:`lab.device_privacy.
    admit_round`: the stricter of its own and the announced); one that refuses the round sits
    it out, and the skip is recorded with the reason its status would give."""
    cfg = sim.cfg
    secagg = dataclasses.asdict(cfg.secagg) if cfg.secagg.enabled else {}
    jobs, skipped, bytes_out = [], {}, 0
    for d in chosen:
        try:
            method = admit_round(d.privacy, devices_of(cfg), d.index, d.profile, r, cfg.method,
                                 secagg)
        except PrivacyRefused as exc:
            why = privacy_reason(exc)
            log.warning("%s: sits out round %d: %s", d.id, r, why)
            skipped[d.id] = [why]
            sim.store.record_skip(r, d.id, [why], {})
            continue
        missing = set(manifest.shards.values()) - d.have
        bytes_out += sum(len(blobs[s]) for s in missing)
        d.have |= missing
        other = (d.index + 1) % len(sim.devices) if sim.strategy.other_data else None
        attack = sim.attack if sim.attack is not None and sim.attack.hits(d.index) else None
        jobs.append(DeviceJob(d.index, d.id, d.budget, d.assignment, dict(sim.prior), other,
                              attack, method=method, privacy=d.privacy.cfg))
    return jobs, skipped, bytes_out


def _train(sim: _Simulation, r: int, base_hash: str, jobs: list[DeviceJob],
           aggregator: Any) -> _Tally:
    """Train the jobs on the backend; decode each update, add it to ``aggregator`` and record
    what it says, as the coordinator does with an accepted update."""
    from hfedmoe.lora import expand
    from hfedmoe.wire import decode

    lora, tally = _lora(sim.cfg), _Tally()
    methods = {job.index: job.method for job in jobs}
    # results come back in the order of ``jobs``, whatever order they trained in
    for out in sim.runner.run(r, sim.global_state, base_hash, jobs):
        d = sim.devices[out.index]
        d.assignment = out.assignment
        d.privacy.record(r, methods[out.index])  # the noise it applied, in its ledger
        update = decode(out.blob, sim.spec, sim.cfg.wire, round_idx=r, client_id=d.id)
        update = expand(update, lora) if lora is not None else update
        tally.device_s.append(out.seconds * d.scale)
        update = _held_to_policy(sim, r, d, update)
        if update is None:
            tally.rejected += 1
            continue
        aggregator.add(update)
        rec = participation_record(d.budget.c_budget, update, len(out.blob))
        sim.store.record_participation(r, d.id, rec.budget, rec.experts_sent,
                                       rec.optimizer_experts, rec.info())
        tally.accepted[d.id] = len(out.blob)
        tally.records[d.id] = rec.to_dict()
        tally.usage[d.id] = update.usage
        dis = disagreement_of(update)
        if dis is not None:
            tally.disagreement[d.id] = dis
    return tally


def _held_to_policy(sim: _Simulation, r: int, d: SimDevice, update: Any) -> Any:
    """The update as the server's intake would take it (:mod:`server.bounds`: the class cap,
    the norm bounds), or None when it would refuse it (the refusal is stored as the server
    stores one)."""
    from hfedmoe.errors import BudgetExceededError, PolicyError

    policy = sim.cfg.policy
    try:
        check_experts(policy, sim.store.devices()[d.id].get("report"), d.budget.c_budget,
                      update, sim.strategy.uses_budget)
        return bound_norms(policy, d.id, update)
    except (BudgetExceededError, PolicyError) as exc:
        log.warning("round %d: rejected update from %s: %s: %s", r, d.id,
                    type(exc).__name__, exc)
        sim.store.reject(r, d.id, type(exc).__name__, str(exc)[:500])
        return None


def _evaluate(sim: _Simulation) -> dict[str, Any]:
    """The held-out evaluation (``data.eval_split``), with the split's name."""
    from server.evaluate import held_out_metrics

    return held_out_metrics(sim.model, sim.task.held_out, sim.cfg)


def _checkpoint(sim: _Simulation, r: int, metrics: dict[str, float]) -> int:
    """Checkpoint the round and apply the retention settings; the run directory's bytes."""
    from hfedmoe.modelsync import build_shards

    new_manifest, _ = build_shards(sim.global_state)
    sim.store.save_checkpoint(r, sim.global_state, {"accuracy": metrics.get("accuracy"),
                                                    "loss": metrics.get("loss")},
                              new_manifest.state_hash)
    ret = sim.cfg.retention
    sim.store.prune(r, ret.keep_updates, ret.keep_checkpoints, ret.keep_best)
    return sim.store.size_bytes()


def _write(run_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    row = {"time": time.time(), **row}
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row
