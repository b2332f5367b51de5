"""``hfedmoe simulate --backend ray``: the devices' local training on Ray actors.

Each actor builds the model and receives the task's client shards once, when it starts, and
trains with ``train.threads`` torch threads (1 when unset), reserving that many Ray CPUs. Every
round the driver puts the global state in Ray's object store once; an actor fetches it at its
first job of the round and, per job, does exactly what the sequential backend does
(:func:`lab.devices.train_device`: the device's seed, the global state loaded,
``model.quantize``, fedmoe's assignment pass, local training within the budget the driver
decided, the encoded update). Jobs go to whichever actor is free; results come back to the
driver in the order of the round's participants, so decoding and the streaming aggregation run
in the same order as the sequential backend and give the same bits.

Ray is an optional extra: ``pip install "hfedmoe[ray]"``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hfedmoe.errors import ConfigError

log = logging.getLogger("hfedmoe.simulate")


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("simulate --backend ray needs Ray, which is not installed: "
                          "pip install \"hfedmoe[ray]\"") from exc
    return ray


def _runtime_env() -> dict[str, Any]:
    """Workers import the kit from the same source checkout as the driver, if it runs from
    one (an installed kit is found on the workers' own path)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        return {}
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


class DeviceWorker:
    """A Ray actor: one model copy and every client shard, trains one device at a time."""

    def __init__(self, cfg: Any, num_labels: int, shards: list[Any], threads: int) -> None:
        from hfedmoe.models.registry import build_model
        from hfedmoe.strategies import get_strategy

        torch.set_num_threads(threads)
        torch.manual_seed(cfg.rounds.seed)  # as the driver builds its model
        self.cfg, self.shards = cfg, shards
        self.model = build_model(cfg.model, cfg.data.task, num_labels)
        self.strategy = get_strategy(cfg.method.strategy, cfg.method)
        self.round: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def ready(self) -> tuple[int, str]:
        """The actor's process id and the id of the Ray node it runs on."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def train(self, round_idx: int, state_box: list[Any], base_hash: str, job: Any) -> Any:
        """``state_box`` holds the round's state reference un-resolved, so an actor fetches
        the state once per round rather than once per job."""
        import ray

        from lab.devices import train_device

        if self.round != round_idx:
            self.state, self.round = None, None  # free the last round's state first
            self.state, self.round = ray.get(state_box[0]), round_idx
        other = self.shards[job.other] if job.other is not None else None
        return train_device(self.model, self.shards[job.index], job, self.state, round_idx,
                            base_hash, self.cfg, self.strategy, other)


class RayBackend:
    """Ray actors that train the round's devices in parallel (see the module doc)."""

    def __init__(self, cfg: Any, shards: list[Any], num_labels: int, participants: int,
                 address: str = "", workers: int = 0) -> None:
        ray = require_ray()
        self.ray = ray
        start = time.perf_counter()
        threads = cfg.train.threads or 1
        self.started = False
        if ray.is_initialized():
            log.info("ray: using this process's Ray (%s)", address or "already initialized")
        else:
            kwargs: dict[str, Any] = {"runtime_env": _runtime_env(), "log_to_driver": True,
                                      "logging_level": logging.WARNING}
            if address:
                ray.init(address=address, **kwargs)
            else:  # a new local Ray (never one already running on this machine, which
                # ray.init() would join): the CPUs the workers asked for, or the ones it detects
                ray.init(address="local", num_cpus=workers * threads or None,
                         include_dashboard=False, **kwargs)
            self.started = True
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            fit = max(1, cpus // threads)
            if workers > fit:
                log.warning("ray: %d worker(s) of %d CPU(s) each asked for, the cluster has "
                            "%d CPU(s): starting %d", workers, threads, cpus, fit)
            workers = max(1, min(workers or fit, fit, participants))
            actor = ray.remote(num_cpus=threads)(DeviceWorker)
            shards_ref = ray.put(shards)
            self.actors = [actor.remote(cfg, num_labels, shards_ref, threads)
                           for _ in range(workers)]
            placed = ray.get([a.ready.remote() for a in self.actors])
            self.nodes = sorted({node for _, node in placed})  # the nodes the actors run on
            log.info("ray: %d worker(s) with %d torch thread(s) each ready in %.1f s on %d "
                     "node(s) (pids %s)", workers, threads, time.perf_counter() - start,
                     len(self.nodes), [pid for pid, _ in placed])
        except BaseException:
            self.close()
            raise

    def run(self, round_idx: int, state: dict[str, torch.Tensor], base_hash: str,
            jobs: list[Any]) -> Iterator[Any]:
        """Train ``jobs`` on the actors; yield their results in the order of ``jobs``, each
        as soon as it and every one before it are done."""
        ray = self.ray
        box = [ray.put(state)]  # in a list: Ray passes the reference, not the value
        pending: dict[Any, tuple[int, Any]] = {}  # result ref -> (job position, its actor)
        done: dict[int, Any] = {}
        submitted = 0

        def submit(actor: Any) -> None:
            nonlocal submitted
            ref = actor.train.remote(round_idx, box, base_hash, jobs[submitted])
            pending[ref] = (submitted, actor)
            submitted += 1

        for actor in self.actors[:len(jobs)]:
            submit(actor)
        for position in range(len(jobs)):
            while position not in done:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    pos, actor = pending.pop(ref)
                    done[pos] = ref
                    if submitted < len(jobs):  # the free actor takes the next job
                        submit(actor)
            yield ray.get(done.pop(position))

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False


# measured: differ from run to run (the run directory holds the devices' step timings)
TIMING_FIELDS = frozenset({"time", "wall_s", "round_s", "aggregation_s", "run_dir_bytes"})
HEADER_ALIGN = 8  # bytes an update's size may move by: its header's safetensors alignment


def comparable_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without its timings and update sizes: every update's JSON header carries
    the device's measured seconds, so its size may move by the header's 8-byte alignment."""
    out = {k: v for k, v in row.items() if k not in TIMING_FIELDS | {"bytes_in"}}
    if "held" in out:
        out["held"] = {c: {k: v for k, v in h.items() if k != "bytes"}
                       for c, h in out["held"].items()}
    return out


def row_differences(rows: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[str]:
    """Where two runs' metrics rows differ, timings aside (empty: the same rows), e.g. the
    sequential and the Ray backend's for one seed and calibration: every field but the timings
    equal, each update's size within :data:`HEADER_ALIGN` bytes."""
    if len(rows) != len(other):
        return [f"{len(rows)} rows against {len(other)}"]
    out = []
    for a, b in zip(rows, other, strict=True):
        where = f"round {a.get('round')}"
        ca, cb = comparable_row(a), comparable_row(b)
        out += [f"{where}: {k}: {ca.get(k)!r} != {cb.get(k)!r}"
                for k in sorted(ca.keys() | cb.keys()) if ca.get(k) != cb.get(k)]
        held_a, held_b = a.get("held") or {}, b.get("held") or {}
        if abs(a.get("bytes_in", 0) - b.get("bytes_in", 0)) > HEADER_ALIGN * len(held_a):
            out.append(f"{where}: bytes_in: {a.get('bytes_in')} != {b.get('bytes_in')}")
        out += [f"{where}: held.{c}.bytes: {h.get('bytes')} != {held_b[c].get('bytes')}"
                for c, h in held_a.items() if c in held_b
                and abs(h.get("bytes", 0) - held_b[c].get("bytes", 0)) > HEADER_ALIGN]
    return out
