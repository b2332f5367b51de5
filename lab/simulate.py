"""``hfedmoe simulate``: federated rounds in one process, for experiments.

The same parts as a live run — budgets from the cost model measured on the real expert shape
and scaled to each device's profile, :func:`device_agent.train.train_round`, the wire format
(every update is encoded and decoded, so bytes are real), the strategy's streaming aggregator,
held-out evaluation — with the devices run one after another instead of over a broker, or in
parallel on Ray actors (``--backend ray``, :mod:`lab.ray_backend`). Round time is reported
in emulated device time: the slowest participant's measured local time scaled to its profile.
The run directory has the same ``metrics.jsonl``/``run.db`` layout as a server's, so
``hfedmoe report`` works on it.

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
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from lab.devices import Calibration, DeviceJob, SequentialBackend, _lora, calibrate

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
    from server.config import ServerConfig

    cfg = load_config(ServerConfig, args.config, args.overrides)
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
             calibration: Calibration | None = None) -> list[dict[str, Any]]:
    """Run ``cfg.rounds.rounds`` rounds with ``num_devices`` emulated devices; metrics rows.

    Args:
        backend: ``"sequential"`` (one process) or ``"ray"`` (devices train in parallel on Ray
            actors; needs ``pip install "hfedmoe[ray]"``). Same rows for the same seed and
            calibration, timing fields aside.
        ray_address: join this Ray cluster; empty: start a local Ray (unless this process
            already has one).
        ray_workers: Ray actors (0: the CPUs Ray has over the threads each worker uses), at
            most the participants of a round.
        calibration: the host probe and measured costs budgets are decided from (measured
            now when None); give one to rerun with the same budgets.
    """
    from device_agent.costs import decide_budget, steps_per_round
    from device_agent.profiles import load_profile
    from device_agent.report import time_scale
    from hfedmoe.data import load_task
    from hfedmoe.errors import ConfigError
    from hfedmoe.lora import expand, with_factors
    from hfedmoe.models.registry import build_model
    from hfedmoe.modelsync import build_shards
    from hfedmoe.privacy import may_take_part, privacy_report
    from hfedmoe.signals import round_signals
    from hfedmoe.strategies import get_strategy
    from hfedmoe.wire import decode, spec_from_state
    from server.evaluate import evaluate
    from server.store import Store

    if backend not in BACKENDS:
        raise ConfigError(f"unknown simulate backend {backend!r}; one of {', '.join(BACKENDS)}")
    if ray_workers < 0:
        raise ConfigError(f"ray workers must be >= 0 (0: one per CPU), got {ray_workers}")
    if backend == "ray":
        from lab.ray_backend import require_ray

        require_ray()  # before anything slow: a missing extra fails at once
    torch.manual_seed(cfg.rounds.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run_dir)
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    store = Store(run_dir)
    task = load_task(cfg.data)
    shards = task.client_datasets(num_devices)
    model = build_model(cfg.model, cfg.data.task, task.num_labels)
    strategy = get_strategy(cfg.method.strategy, cfg.method)
    spec = spec_from_state(model.state())
    lora = _lora(cfg)
    if lora is not None:  # updates carry factors; the server averages their products
        spec = with_factors(spec, lora)
    if calibration is None:
        calibration = calibrate(cfg, measure_repeats, model)
    host, costs = calibration.host, calibration.costs
    window = cfg.rounds.train_time_s or cfg.rounds.deadline_s
    devices = []
    for i, name in enumerate(profiles):
        report = load_profile(name)
        steps = steps_per_round(len(shards[i]), cfg.train.batch_size, cfg.train.local_epochs,
                                cfg.train.max_steps)
        budget = decide_budget(report, costs.cost, window, steps, host=host,
                               routing_batches=min(cfg.train.selection_batches or steps, steps),
                               min_experts=cfg.train.min_experts)
        dev_id = f"sim{i:03d}-{name}"
        devices.append({"id": dev_id, "report": report, "budget": budget,
                        "scale": time_scale(host, report), "have": set(), "assignment": None,
                        "dp_rounds": 0})
        store.upsert_device(dev_id, {**report.to_dict(), "budget": budget.to_dict(),
                                     "local_examples": len(shards[i])}, budget.c_budget)
    global_state = model.state()
    dense_bytes = dense_update_bytes(global_state, cfg.wire)
    base_manifest, _ = build_shards(global_state)
    for d in devices:
        d["have"] = set(base_manifest.shards.values())
    rows = [_write(run_dir, {"round": -1, "phase": "initial", **evaluate(
        model, task.test, cfg.eval_batch_size, cfg.model.max_length, cfg.max_eval_examples)})]
    rng = random.Random(cfg.rounds.seed)
    participants = max(1, math.ceil(cfg.rounds.fraction * len(devices)))
    runner: Any = None
    try:
        if backend == "ray":  # after the calibration: starting actors would skew its timings
            from lab.ray_backend import RayBackend

            runner = RayBackend(cfg, shards, task.num_labels, participants,
                                address=ray_address, workers=ray_workers)
        else:
            # model.quantize: the devices' copy stores its frozen base quantized, re-quantized
            # from the fp32 global weights every round; the server's model (aggregation,
            # evaluation) stays fp32
            device_model = copy.deepcopy(model) if cfg.model.quantize != "none" else model
            runner = SequentialBackend(device_model, shards, cfg, strategy)
        for r in range(cfg.rounds.rounds):
            wall0 = time.perf_counter()
            manifest, blobs = build_shards(global_state)
            chosen = sorted(rng.sample(range(len(devices)), participants))
            store.open_round(r, 0.0, [devices[i]["id"] for i in chosen], manifest.state_hash)
            aggregator = strategy.make_aggregator()
            bytes_in = bytes_out = 0
            device_times = []
            held: dict[str, dict[str, Any]] = {}
            usages: dict[str, Any] = {}
            disagreement: dict[str, float] = {}
            jobs = []
            for i in chosen:
                d = devices[i]
                if not may_take_part(d["dp_rounds"], cfg.method):  # its epsilon budget is spent
                    log.warning("%s: sits out round %d: one more noised update would pass "
                                "method.dp_max_epsilon = %g", d["id"], r,
                                cfg.method.dp_max_epsilon)
                    continue
                missing = set(manifest.shards.values()) - d["have"]
                bytes_out += sum(len(blobs[s]) for s in missing)
                d["have"] |= missing
                jobs.append(DeviceJob(i, d["id"], d["budget"], d["assignment"]))
            # results come back in the order of ``jobs``, whatever order they trained in
            for out in runner.run(r, global_state, manifest.state_hash, jobs):
                d = devices[out.index]
                d["assignment"] = out.assignment
                bytes_in += len(out.blob)
                update = decode(out.blob, spec, cfg.wire, round_idx=r, client_id=d["id"])
                aggregator.add(expand(update, lora) if lora is not None else update)
                device_times.append(out.seconds * d["scale"])
                held[d["id"]] = h = out.held
                usages[d["id"]] = out.usage
                d["dp_rounds"] += int(cfg.method.dp_noise_multiplier > 0)
                disagreement[d["id"]] = out.disagreement
                # the device's step timings (measured on this host) for the latency report;
                # kept out of the metrics row, which backends must reproduce exactly
                store.record_participation(r, d["id"], h["budget"], h["experts_sent"],
                                           h["optimizer_experts"],
                                           {**h, "latency": update.meta.get("latency")})
            t0 = time.perf_counter()
            report = aggregator.report()
            if held:  # every device may sit out (privacy budgets spent): the model stays
                global_state = aggregator.finalize(global_state)
            agg_s = time.perf_counter() - t0
            model.load_state(global_state)
            metrics = evaluate(model, task.test, cfg.eval_batch_size, cfg.model.max_length,
                               cfg.max_eval_examples)
            row = {"round": r, "phase": "round", "participants": len(chosen),
                   "accepted": len(held), "rejected": 0, "late": 0,
                   "experts_updated": len({e for rep in report.values() for e in rep.aggregated}),
                   "bytes_in": bytes_in, "bytes_out": bytes_out, "aggregation_s": agg_s,
                   "round_s": max(device_times, default=0.0),
                   "wall_s": time.perf_counter() - wall0, **metrics,
                   "devices": {c: rep.to_dict() for c, rep in report.items()},
                   "budgets": {devices[i]["id"]: devices[i]["budget"].c_budget for i in chosen},
                   "held": held, "dense_bytes": dense_bytes * len(held),
                   "signals": round_signals({c: rep.to_dict() for c, rep in report.items()},
                                            usages, disagreement, cfg.method.tau)}
            privacy = privacy_report({d["id"]: d["dp_rounds"] for d in devices}, cfg.method)
            if privacy is not None:
                row["privacy"] = privacy
            new_manifest, _ = build_shards(global_state)
            store.save_checkpoint(r, global_state, {"accuracy": metrics.get("accuracy")},
                                  new_manifest.state_hash)
            ret = cfg.retention
            store.prune(r, ret.keep_updates, ret.keep_checkpoints, ret.keep_best)
            rows.append(_write(run_dir, row))
            log.info("round %d: %s", r, {k: v for k, v in row.items()
                                         if k not in ("devices", "budgets")})
    finally:
        if runner is not None:
            runner.close()
        store.close()
    return rows


def dense_update_bytes(state: dict[str, torch.Tensor], wire: Any) -> int:
    """Bytes of a dense (fedavg-full) update of ``state`` in the wire dtype, uncompressed."""
    width = {"float32": 4, "bfloat16": 2, "float16": 2}.get(getattr(wire, "dtype", "float32"), 4)
    return sum(t.numel() for t in state.values()) * width


def _write(run_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    row = {"time": time.time(), **row}
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row
