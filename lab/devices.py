"""One device's round in the simulator, as both backends run it (sequentially in this process,
or on Ray actors: :mod:`lab.ray_backend`): the job the driver decides, the device's seed, local
training within the job's budget and the encoded update; and the calibration budgets come from.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import torch

from device_agent.costs import make_planner, measure_costs
from device_agent.emulation import emulation_scale
from device_agent.privacy import release_metadata
from device_agent.resources import probe_device
from device_agent.train import RoundContext, RoundIds, train_round, usage_profile
from device_agent.work import base_for, planned_mode
from hfedmoe.data import load_task
from hfedmoe.lora import LoRASpec
from hfedmoe.models.quantize import quantize_model
from hfedmoe.models.registry import build_model
from hfedmoe.wire import encode


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What the budgets are decided from: the model counted at the configured shape with the
    emulation scale (budgets planned from the profiles, the same in every run), and the host's
    probe and the costs measured on it (``rounds.budget_share`` > 0 and the emulated round
    times: timing measurements, so two runs agree only when they share one calibration:
    :func:`calibrate`, ``simulate(..., calibration=...)``)."""

    host: Any  # device_agent.resources.DeviceReport of this machine
    costs: Any  # device_agent.costs.measure_costs(...) of the model at the configured shape
    planned: Any = None  # device_agent.work.PlannedMode of the configured mode
    scale: Any = None  # device_agent.emulation.EmulationScale (rounds.emulate_reference)


def plan_model(cfg: Any, model: Any) -> tuple[Any, Any]:
    """``(planned mode, emulation scale)`` of ``cfg``'s model: its memory and work counted at
    the configured shape and mode, and the scale of ``rounds.emulate_reference`` (None: "")."""
    base = base_for(cfg.model.quantize, cfg.train.dtype)
    dtype = "bfloat16" if base == "int4" else cfg.train.dtype  # int4's kernel runs on bf16
    planned = planned_mode(model, cfg.train.adapter, base, cfg.train.batch_size,
                           cfg.model.max_length, cfg.train.optimizer, cfg.train.lora_rank, dtype)
    scale = emulation_scale(cfg.model.name, sum(p.numel() for p in model.module.parameters()),
                            cfg.rounds.emulate_reference, "rounds.emulate_reference")
    return planned, scale


def calibrate(cfg: Any, measure_repeats: int = 3, model: Any = None) -> Calibration:
    """Probe this host, measure the training costs of ``cfg``'s model (built if not given) and
    count it (:func:`plan_model`)."""
    if model is None:
        torch.manual_seed(cfg.rounds.seed)
        model = build_model(cfg.model, cfg.data.task, load_task(cfg.data).num_labels)
    host = probe_device(matmul_seconds=0.5)
    costs = measure_costs(model, cfg.train.batch_size, cfg.model.max_length, cfg.train.optimizer,
                          cfg.train.detach_frozen, repeats=measure_repeats,
                          adapter=cfg.train.adapter, lora=_lora(cfg))
    return Calibration(host, costs, *plan_model(cfg, model))


def device_seed(seed: int, round_idx: int, device_idx: int) -> int:
    """The torch seed of one device's work in one round, from a stable hash (SHA-256) of
    ``(seed, round, device index)``: the same in every process and in any execution order."""
    digest = hashlib.sha256(f"{seed}:{round_idx}:{device_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclasses.dataclass(frozen=True)
class DeviceJob:
    """One device's work in a round, as the driver decided it."""

    index: int  # the device's index: its data shard and its seed
    device_id: str
    budget: Any  # device_agent.budget.Budget, decided once by the driver
    assignment: frozenset | None  # fedmoe's fixed sub-model once known, else None
    prior: dict | None = None  # the global routing prior (server.rounds.routing_prior)
    other: int | None = None  # the shard the hfedmoe-other control ranks experts on
    attack: Any = None  # lab.attacks.Attack: this device poisons its update (simulator only)
    # the round's method as this device applies it (the stricter of its own privacy and the
    # announced: lab.device_privacy.admit_round); None: the config's
    method: Any = None  # hfedmoe.config.MethodConfig
    privacy: Any = None  # device_agent.privacy.DevicePrivacyConfig: how its metadata leaves


@dataclasses.dataclass(frozen=True)
class DeviceResult:
    """What a device's round gives the driver: the encoded update (the driver decodes it and
    reads the round's record from it, as the coordinator does) and the time it took."""

    index: int
    blob: bytes
    seconds: float  # measured local time on this host (the driver scales it to the profile)
    assignment: frozenset | None  # the job's, or the one computed in this round


def _lora(cfg: Any) -> Any:
    return (LoRASpec(cfg.train.lora_rank, cfg.train.lora_alpha)
            if cfg.train.adapter == "lora" else None)


def train_device(model: Any, data: Any, job: DeviceJob, state: dict[str, torch.Tensor],
                 round_idx: int, base_hash: str, cfg: Any, strategy: Any,
                 other_data: Any = None) -> DeviceResult:
    """One device's round on ``model`` (the device's copy, overwritten with ``state``): the
    fedmoe assignment pass if it needs one, local training within the driver's budget, the
    encoded update. Its randomness is seeded from ``(seed, round, device index)`` first.
    ``other_data`` is the shard ``job.other`` (the hfedmoe-other control ranks on it). The
    update is clipped and noised at ``job.method``'s DP settings and its loss, usage and
    importance leave as ``job.privacy`` says (:func:`device_agent.privacy.release_metadata`),
    before it is encoded, as on a live device."""
    torch.manual_seed(device_seed(cfg.rounds.seed, round_idx, job.index))
    budget = job.budget
    method = job.method if job.method is not None else cfg.method
    model.load_state(state)
    quantize_model(model, cfg.model.quantize)  # "none": nothing
    assignment = job.assignment
    if strategy.needs_assignment and assignment is None:
        usage = usage_profile(model, data, strategy, cfg.train.batch_size, cfg.model.max_length)
        assignment = strategy.assign(usage, budget.c_budget)
    res = train_round(RoundContext(
        model, data, strategy=strategy, budget=budget.c_budget, train=cfg.train,
        method=method, ids=RoundIds(cfg.run_id, round_idx, job.device_id, base_hash),
        max_length=cfg.model.max_length, assignment=assignment,
        planner=make_planner(budget, enforce=strategy.uses_budget, resident=0),
        prior=job.prior, selection_data=other_data))
    meta = res.update.meta.replace(budget_limit=budget.limit, budget_reason=budget.reason)
    update = dataclasses.replace(res.update, meta=meta)
    if job.privacy is not None:  # its metadata policy
        update = release_metadata(job.privacy, update)
    if job.attack is not None:  # a poisoning device of benchmarks/poisoning.py
        update = job.attack.apply(update)
    blob = encode(update, method.tau, cfg.wire)
    return DeviceResult(job.index, blob, res.seconds, assignment)


class SequentialBackend:
    """The devices one after another on one model copy, in this process."""

    def __init__(self, model: Any, shards: list[Any], cfg: Any, strategy: Any) -> None:
        self.model, self.shards, self.cfg, self.strategy = model, shards, cfg, strategy

    def run(self, round_idx: int, state: dict[str, torch.Tensor], base_hash: str,
            jobs: list[DeviceJob]) -> Iterator[DeviceResult]:
        for job in jobs:  # lazily: the driver adds each update before the next device trains
            other = self.shards[job.other] if job.other is not None else None
            yield train_device(self.model, self.shards[job.index], job, state, round_idx,
                               base_hash, self.cfg, self.strategy, other)

    def close(self) -> None:
        pass
