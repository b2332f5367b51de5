"""The device agent loop: measure, register, and take part in rounds until the run is done.

One thread owns everything: it pumps the transport (paho only enqueues), fetches the global
model's missing shards, trains with :func:`device_agent.train.train_round`, sends the sparse
update as a chunked transfer and waits for the server's ack, re-sending the manifest until it
comes. State that must survive a restart (last acknowledged round, a pending update, the fedmoe
assignment) lives in ``work_dir``; the MQTT client id is the device id, so the broker keeps its
session. SIGTERM stops cleanly between steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from device_agent.conditions import read_conditions
from device_agent.monitor import BudgetMonitor, Observation
from hfedmoe.config import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
    from_dict,
)
from hfedmoe.eligibility import EligibilityConfig, check, combine
from hfedmoe.errors import ConfigError, HFedMoEError, ProtocolError, TransportError
from hfedmoe.modelsync import ModelManifest, ShardCache
from hfedmoe.protocol import (
    DeviceStatus,
    Done,
    FetchRequest,
    Registered,
    Registration,
    RoundAnnouncement,
    UpdateAck,
    decode_ack,
    decode_round,
)
from hfedmoe.transport.base import Message, Transport
from hfedmoe.transport.chunks import BlobReceiver, send_blob
from hfedmoe.transport.config import TransportConfig
from hfedmoe.transport.topics import Topics, check_device_id, check_id
from hfedmoe.wire import WireConfig, encode

log = logging.getLogger("hfedmoe.agent")


@contextlib.contextmanager
def host_lock(path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block; "" holds none.

    Agents that share one host (the demo's emulated devices) take it while they time the host,
    one at a time, so no agent's step costs include another's measurement."""
    if not path:
        yield
        return
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``hfedmoe agent`` needs.

    Attributes:
        device_id: stable identity (also the MQTT client id).
        emulate: a device profile (name or file) standing in for live measurement.
        budget_cap: configured maximum experts per round (0: none); never raises the budget.
        training_memory_mib: memory training may add on top of the loaded model (an app's
            share; 0: the profile's figure, else no quota besides available memory).
        shard, num_shards: this device's part of ``data.source`` (simulation); with
            ``num_shards = 1`` the whole file is the device's data.
        upload_margin_s: training stops this long before the round deadline.
        measure_seq_len: sequence length of the cost measurement (0: the model's max_length;
            re-measured when a round announces another batch size or max_length).
        runtime: ``"eager"`` (PyTorch) or ``"executorch"`` (the training program a phone runs;
            classification models, one expert set per round).
        measure_lock: a file that the agents sharing one host lock while they measure it (the
            demo and emulated fleets set it), so one agent's timings do not include another's
            work; "" measures without a lock.
    """

    device_id: str = "device-0"
    run_id: str = "hfedmoe"
    work_dir: str = ""
    emulate: str = ""
    budget_cap: int = 0
    training_memory_mib: float = 0.0
    shard: int = 0
    num_shards: int = 1
    upload_margin_s: float = 5.0
    ack_timeout_s: float = 10.0
    measure_seq_len: int = 0
    matmul_seconds: float = 0.5
    max_rounds: int = 0
    runtime: Literal["eager", "executorch"] = "eager"
    measure_lock: str = ""
    conditions_file: str = ""  # emulated battery/charging/temperature/metered/idle (JSON)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    wire: WireConfig = field(default_factory=WireConfig)

    def __post_init__(self) -> None:
        check_device_id(self.device_id)  # ReservedIdError for "server" and the like
        check_id(self.run_id, "run id")
        if not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"agent.shard must be in [0, num_shards={self.num_shards})")
        if self.budget_cap < 0 or self.upload_margin_s < 0 or self.ack_timeout_s <= 0:
            raise ConfigError("budget_cap and upload_margin_s must be >= 0, ack_timeout_s > 0")
        if self.training_memory_mib < 0 or self.measure_seq_len < 0:
            raise ConfigError("training_memory_mib and measure_seq_len must be >= 0")

    @property
    def directory(self) -> Path:
        return Path(self.work_dir or f"runs/agents/{self.device_id}")


class AgentStopped(Exception):
    """Raised inside training when SIGTERM asked the agent to stop."""


class ConditionsBroke(Exception):
    """Raised inside training when the device stopped being eligible and drops its work."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class DeviceAgent:
    """One device taking part in a federated run."""

    def __init__(self, cfg: AgentConfig, transport: Transport | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.topics = Topics(cfg.run_id)
        self.dir = cfg.directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "agent_state.json"
        self.local = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.transport = transport
        self._owns_transport = transport is None
        self._broker = None
        self.stop_requested = False
        self.announcement: RoundAnnouncement | None = None
        self.acks: dict[str, UpdateAck] = {}
        self.done = False
        self.rounds_done = 0
        self.receivers: list[BlobReceiver] = []  # open model-shard transfers
        self.registered = False
        self._whole_max = 0  # the announcement's whole_max_bytes
        # the round's rules (the server's and this device's)
        self._rules = combine(EligibilityConfig(), cfg.eligibility)
        self._checked_at = -1e9  # last eligibility check (clock)
        self._eligible: tuple[int, tuple[str, ...]] | None = None  # (round, reasons) reported
        self._round_idx: int | None = None
        self._break: list[str] | None = None  # reasons conditions broke mid-round ("send")

    # --- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Measure the device, load data and model, measure the model's costs."""
        from device_agent.profiles import load_profile
        from device_agent.resources import probe_device
        from hfedmoe.data import load_dataset, load_task
        from hfedmoe.models.registry import build_model

        cfg = self.cfg
        if cfg.train.threads:
            import torch

            torch.set_num_threads(cfg.train.threads)
        # before the model loads; an emulated device times the host next to its step costs
        self.host = probe_device(matmul_seconds=0 if cfg.emulate else cfg.matmul_seconds)
        self.report = load_profile(cfg.emulate) if cfg.emulate else self.host
        if cfg.num_shards > 1:
            task = load_task(cfg.data)
            self.data = task.client_datasets(cfg.num_shards)[cfg.shard]
            num_labels = task.num_labels
        else:
            self.data = load_dataset(cfg.data)
            num_labels = self.data.num_labels
        self.model = build_model(cfg.model, cfg.data.task, num_labels)
        self.model.module.to(resolve_device(cfg.train.device))
        self.cache = ShardCache(self.model.spec())
        self.base_manifest = self.cache.add_state(self.model.state())
        self._quantize()  # model.quantize: the frozen base stored quantized from here on
        self._train = cfg.train  # the recipe of the last round (the server's settings)
        self.costs = self._measure(cfg.train.batch_size,
                                   cfg.measure_seq_len or cfg.model.max_length)
        self.budget = self._decide(deadline_s=60.0, train=cfg.train)
        self.monitor = BudgetMonitor(self.budget)
        log.info("%s: %d local examples, budget %d experts (%s; %s)", cfg.device_id,
                 len(self.data), self.budget.c_budget, self.budget.limit,
                 "emulated " + self.report.source if self.report.emulated else "measured")

    def _quantize(self) -> None:
        """Store the model's frozen base quantized (``model.quantize``; a no-op for "none" and
        for weights already quantized). Training over it needs ``train.adapter = "lora"``:
        :func:`device_agent.train.train_round` refuses a round announced otherwise."""
        from hfedmoe.models.quantize import quantize_model

        report = quantize_model(self.model, self.cfg.model.quantize)
        if report.experts or report.linears:
            log.info("%s: base stored %s: %d expert weights, %d linears, %.1f -> %.1f MB",
                     self.cfg.device_id, report.mode, report.experts, report.linears,
                     report.bytes_before / 1e6, report.bytes_after / 1e6)

    def _measure(self, batch_size: int, seq_len: int, train: TrainConfig | None = None) -> Any:
        from device_agent.costs import measure_costs
        from hfedmoe.lora import LoRASpec

        train = train or self.cfg.train
        with host_lock(self.cfg.measure_lock):
            log.info("%s: measuring step costs at batch %d x %d (%s experts)",
                     self.cfg.device_id, batch_size, seq_len, train.adapter)
            if self.cfg.emulate and self.cfg.matmul_seconds > 0:
                # the emulated device's times are the host's scaled by matmul throughput:
                # both taken under the same conditions, one right after the other
                from device_agent.resources import measure_throughput

                self.host = dataclasses.replace(self.host, matmul=measure_throughput(
                    next(self.model.module.parameters()).device, self.cfg.matmul_seconds))
            return measure_costs(self.model, batch_size, seq_len, train.optimizer,
                                 train.detach_frozen, adapter=train.adapter,
                                 lora=LoRASpec(train.lora_rank, train.lora_alpha))

    def _decide(self, deadline_s: float, train: TrainConfig) -> Any:
        from device_agent.costs import decide_budget, steps_per_round

        steps = steps_per_round(len(self.data), train.batch_size, train.local_epochs,
                                train.max_steps)
        quota = int(self.cfg.training_memory_mib * 2**20) or None
        return decide_budget(self.report, self.costs.cost, max(deadline_s, 1e-3), steps,
                             host=self.host, cap=self.cfg.budget_cap or None,
                             routing_batches=min(train.selection_batches or steps, steps),
                             min_experts=train.min_experts, quota_bytes=quota)

    def connect(self) -> None:
        if self.transport is None:
            from hfedmoe.transport.mqtt import open_transport

            self.transport, self._broker = open_transport(
                self.cfg.transport, self.cfg.device_id, self.topics.status(self.cfg.device_id))
        t = self.transport
        t.subscribe(self.topics.round(), self._on_round)
        t.subscribe(self.topics.ack_tree(self.cfg.device_id), self._on_ack)
        t.wait_subscribed()
        t.publish(self.topics.status(self.cfg.device_id), DeviceStatus("online").to_bytes(),
                  retain=True)
        # the server may start after this device: register until it answers
        while not self._pump_until(lambda: self.registered, self.clock() + 5.0):
            self.register()

    def register(self) -> None:
        self.registered = False
        reg = Registration(
            device_id=self.cfg.device_id, budget=self.budget.c_budget,
            report={**self.report.to_dict(), "budget": self.budget.to_dict(),
                    "local_examples": len(self.data),
                    "measured_step": dataclasses.asdict(self.costs.steps)})
        self.transport.publish(self.topics.register(self.cfg.device_id), reg.to_bytes())

    def close(self) -> None:
        if self.transport is not None and self._owns_transport:
            try:
                self.transport.publish(self.topics.status(self.cfg.device_id),
                                       DeviceStatus("offline").to_bytes(), retain=True)
                self.transport.close()
            except TransportError:
                pass
        if self._broker is not None:
            self._broker.stop()

    # --- messages ----------------------------------------------------------------------------
    def _on_round(self, message: Message) -> None:
        try:
            msg = decode_round(message.payload)
        except ProtocolError as exc:
            log.warning("%s: ignoring a malformed round announcement: %s", self.cfg.device_id, exc)
            return
        if isinstance(msg, Done):
            self.done = True
        else:
            self.announcement = msg

    def _on_ack(self, message: Message) -> None:
        try:
            ack = decode_ack(message.payload)
        except ProtocolError as exc:
            log.warning("%s: ignoring a malformed ack: %s", self.cfg.device_id, exc)
            return
        if isinstance(ack, Registered):
            self.registered = True
        elif ack.sha:
            self.acks[ack.sha] = ack
        elif ack.rejected:
            log.warning("server rejected a message: %s: %s", ack.error, ack.reason)

    def _on_shard(self, prefix: str, blob: bytes) -> None:
        sha = prefix.rsplit("/", 1)[-1]
        try:
            self.cache.add_blob(blob, sha)
        except HFedMoEError as exc:
            log.warning("dropping model shard %s: %s", sha[:12], exc)
            for receiver in self.receivers:
                receiver.forget(prefix)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Take part in rounds until the server says done (or ``max_rounds``); exit code."""
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm)
        try:
            self.setup()
            self.connect()
            while not (self.done or self.stop_requested):
                self.transport.pump(timeout=0.2)
                ann = self.announcement
                if ann is not None and self._should_join(ann):
                    self.play_round(ann)
                    if self.cfg.max_rounds and self.rounds_done >= self.cfg.max_rounds:
                        break
        except AgentStopped:
            log.info("%s: stopped by SIGTERM", self.cfg.device_id)
        finally:
            self.close()
        return 0

    def _sigterm(self, *_: Any) -> None:
        self.stop_requested = True

    def _should_join(self, ann: RoundAnnouncement) -> bool:
        join = (ann.takes_part(self.cfg.device_id)
                and ann.round_idx > self.local.get("last_round", -1)
                and ann.deadline > self.clock())
        return join and self._within_privacy_budget(ann) and self._eligible_now(ann)

    def _eligible_now(self, ann: RoundAnnouncement) -> bool:
        """The round's eligibility rules hold now (checked every ``check_every_s`` while the
        round is open: a device that was plugged in meanwhile joins late). The server hears
        of every change."""
        try:
            server = from_dict(EligibilityConfig, dict(ann.eligibility))
        except HFedMoEError:
            server = EligibilityConfig()
        self._rules = combine(server, self.cfg.eligibility)
        now = self.clock()
        last = self._eligible
        if last is not None and last[0] == ann.round_idx and last[1] \
                and now - self._checked_at < self._rules.check_every_s:
            return False
        self._checked_at = now
        cond = read_conditions(self.cfg.conditions_file)
        reasons = tuple(check(cond, self._rules))
        if last != (ann.round_idx, reasons):
            self._eligible = (ann.round_idx, reasons)
            self._report_eligibility(ann.round_idx, list(reasons), cond.to_dict())
            if reasons:
                log.warning("%s: sits out round %s: %s", self.cfg.device_id, ann.round_idx,
                            "; ".join(reasons))
        return not reasons

    def _report_eligibility(self, round_idx: int | None, reasons: list[str],
                            conditions: dict[str, Any], during_round: bool = False,
                            sending: bool = False) -> None:
        status = DeviceStatus("online", eligible=not reasons, reasons=tuple(reasons),
                              conditions=conditions, round_idx=round_idx,
                              during_round=during_round, sending=sending)
        try:
            self.transport.publish(self.topics.status(self.cfg.device_id), status.to_bytes(),
                                   retain=True)
        except TransportError as exc:
            log.warning("%s: cannot report eligibility: %s", self.cfg.device_id, exc)

    def _within_privacy_budget(self, ann: RoundAnnouncement) -> bool:
        """One more noised update must keep this device within ``method.dp_max_epsilon``;
        otherwise it sits the round out (once per round, logged) and sends nothing."""
        from hfedmoe.privacy import epsilon, may_take_part

        try:
            method = from_dict(MethodConfig, dict(ann.method))
        except HFedMoEError:
            return True  # play_round rejects a malformed announcement
        spent = int(self.local.get("dp_rounds", 0))
        if may_take_part(spent, method):
            return True
        if self.local.get("dp_refused_round") != ann.round_idx:
            self.local["dp_refused_round"] = ann.round_idx
            log.warning("%s: sits out round %s: its %d noised updates spent epsilon %.3f at "
                        "delta %g; one more would pass method.dp_max_epsilon = %g",
                        self.cfg.device_id, ann.round_idx, spent,
                        epsilon(method.dp_noise_multiplier, spent, method.dp_delta),
                        method.dp_delta, method.dp_max_epsilon)
        return False

    def _pump_until(self, predicate: Callable[[], bool], deadline: float) -> bool:
        while not predicate():
            if self.stop_requested:
                raise AgentStopped
            if self.clock() >= deadline:
                return False
            self.transport.pump(timeout=0.1)
            for receiver in self.receivers:
                receiver.poll()
        return True

    def fetch_model(self, manifest: ModelManifest, deadline: float) -> int:
        """Fetch the shards this device lacks; returns the bytes downloaded."""
        missing = self.cache.missing(manifest)
        t, device = self.transport, self.cfg.device_id
        # one subscription per needed shard: shards this device has never reach it
        self.receivers = [BlobReceiver(
            t, f"{self.topics.model(sha).prefix}/#", self._on_shard,
            request_topic=lambda prefix: self.topics.model_fetch(device, prefix.rsplit("/", 1)[-1]),
            retry_after=self.cfg.transport.retry_after,
            timeout=self.cfg.transport.transfer_timeout) for sha in missing]
        try:
            t.wait_subscribed()
            for sha in missing:
                t.publish(self.topics.model_fetch(device, sha),
                          FetchRequest(manifest=True).to_bytes())
            if not self._pump_until(lambda: not self.cache.missing(manifest), deadline):
                raise TransportError(f"{len(self.cache.missing(manifest))} model shard(s) did "
                                     f"not arrive before the deadline")
        finally:
            for receiver in self.receivers:
                receiver.close()
            self.receivers = []
        return self.cache.nbytes(missing)

    def play_round(self, ann: RoundAnnouncement) -> None:
        """One round: fetch, train within the deadline, send, wait for the ack."""
        from device_agent.train import RoundContext, RoundIds, train_round
        from hfedmoe.strategies import get_strategy

        round_idx = self._round_idx = ann.round_idx
        deadline = float(ann.deadline)
        t0 = self.clock()
        manifest = ann.model  # its hash checked when the announcement was read
        pending = self.dir / f"pending_r{round_idx}.bin"
        if pending.exists():  # trained before a restart; send it again
            blob = pending.read_bytes()
            result = None
            down = 0
        else:
            down = self.fetch_model(manifest, deadline)
            self.model.load_state(self.cache.assemble(manifest))
            self._quantize()  # the round's global weights, re-quantized (the server keeps fp32)
            method = from_dict(MethodConfig, dict(ann.method))
            strategy = get_strategy(ann.strategy, method)
            train = self._train = dataclasses.replace(self.cfg.train, **ann.server_train())
            max_length = ann.max_length or self.cfg.model.max_length
            if ((self.costs.batch_size, self.costs.seq_len, self.costs.adapter)
                    != (train.batch_size, max_length, train.adapter)
                    or (train.adapter == "lora" and self.costs.lora_rank != train.lora_rank)):
                # the announced shape and adapter
                self.costs = self._measure(train.batch_size, max_length, train)
            train_window = deadline - self.clock() - self.cfg.upload_margin_s
            window = float(ann.train_time_s or train_window)
            registered = self.budget.c_budget
            self.budget = self._decide(window, train)
            if self.budget.c_budget != registered:  # tell the server the new budget
                self.register()
            if not self.report.emulated:  # an emulated device's window is in its own time
                train_window = min(train_window, window)
            assignment = self._assignment(strategy, train) if strategy.needs_assignment else None
            log.info("%s: round %d, budget %d (%s), %.1fs to train", self.cfg.device_id,
                     round_idx, self.budget.c_budget, self.budget.limit, train_window)
            from device_agent.costs import make_planner

            try:
                result = train_round(RoundContext(
                    self.model, self.data, strategy=strategy, budget=self.budget.c_budget,
                    train=train, method=method, ids=RoundIds(
                        self.cfg.run_id, round_idx, self.cfg.device_id, manifest.state_hash),
                    max_length=max_length, deadline_s=max(train_window, 0.0),
                    assignment=assignment, on_step=self._on_step,
                    planner=make_planner(self.budget, enforce=strategy.uses_budget),
                    runtime=self.cfg.runtime))
            except ConditionsBroke as exc:  # on_break = "drop": nothing leaves the device
                self._skip_round(round_idx, exc.reasons)
                return
            update = dataclasses.replace(result.update, meta=result.update.meta.replace(
                budget_limit=self.budget.limit, budget_reason=self.budget.reason,
                predicted_step_s=(result.plan or {}).get("step_seconds",
                                                         self.budget.step_seconds),
                emulated=self.report.emulated, bytes_down=down,
                upload_prev=self.local.get("last_upload") or None))
            blob = encode(update, method.tau, self.cfg.wire)
            if method.dp_noise_multiplier > 0:  # a noised update is about to leave the device
                self.local["dp_rounds"] = int(self.local.get("dp_rounds", 0)) + 1
                _atomic_write(self.state_path, json.dumps(self.local).encode())
            _atomic_write(pending, blob)
        self._whole_max = ann.whole_max_bytes
        up0 = self.clock()
        status = self.send_update(round_idx, blob, deadline)
        self.local["last_upload"] = {"round": round_idx, "seconds": round(self.clock() - up0, 3),
                                     "bytes": len(blob), "status": status}
        if result is not None and result.steps:
            self._watch(result)
        pending.unlink(missing_ok=True)
        self.local["last_round"] = round_idx
        _atomic_write(self.state_path, json.dumps(self.local).encode())
        self.rounds_done += 1
        row = {"round": round_idx, "status": status, "bytes_up": len(blob), "bytes_down": down,
               "budget": self.budget.c_budget, "seconds": self.clock() - t0}
        if result is not None:
            row.update(steps=result.steps, loss=result.mean_loss, stopped_by=result.stopped_by,
                       experts=len(result.update.updated),
                       optimizer_experts=result.optimizer_experts,
                       plan=result.plan)
        with open(self.dir / "agent.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        log.info("%s: round %d %s: %s", self.cfg.device_id, round_idx, status,
                 ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items() if k not in ("round", "status")))

    def _skip_round(self, round_idx: int, reasons: list[str]) -> None:
        """Conditions broke mid-round with ``on_break = "drop"``: the round is over for this
        device (its status already says why)."""
        self.local["last_round"] = round_idx
        _atomic_write(self.state_path, json.dumps(self.local).encode())
        self.rounds_done += 1
        with open(self.dir / "agent.jsonl", "a") as fh:
            fh.write(json.dumps({"round": round_idx, "status": "dropped",
                                 "reasons": reasons}) + "\n")

    def _watch(self, result: Any) -> None:
        """Re-measure when the device changed: memory pressure, throttling, drifting steps."""
        if self.report.emulated:  # host timings say nothing about the emulated device
            return
        from device_agent.resources import probe_device

        live = probe_device(matmul_seconds=0)
        self.monitor.reset(self.budget)
        decision = self.monitor.observe(Observation(
            available_bytes=live.budget_memory_bytes, cpufreq_ratio=live.cpufreq_ratio,
            temperature_c=live.temperature_c, throttled=live.throttled,
            step_seconds=result.seconds / result.steps,
            trained_experts=len(result.selected)))
        if decision.remeasure:
            log.info("%s: re-measuring: %s", self.cfg.device_id, "; ".join(decision.reasons))
            self.report = self.host = probe_device(matmul_seconds=self.cfg.matmul_seconds)
            self.costs = self._measure(self.costs.batch_size, self.costs.seq_len,
                                       self._train)

    def send_update(self, round_idx: int, blob: bytes, deadline: float) -> str:
        """Chunked upload, re-announced until the server acks it (or the round is long gone)."""
        sha = hashlib.sha256(blob).hexdigest()
        # a blob the server takes as one message (whole_max_bytes of the announcement) goes
        # as one: with sharded ingestion it lands on a single ingest worker
        sender = send_blob(self.transport, self.topics.update(self.cfg.device_id, sha), blob,
                           chunk_size=self.cfg.transport.chunk_size,
                           whole_max=self._whole_max)
        give_up = max(deadline, self.clock()) + 3 * self.cfg.ack_timeout_s
        try:
            while not self._pump_until(lambda: sha in self.acks,
                                       min(self.clock() + self.cfg.ack_timeout_s, give_up)):
                if self.clock() >= give_up:
                    log.warning("%s: no ack for round %d update", self.cfg.device_id, round_idx)
                    return "unacknowledged"
                sender.publish_manifest()  # the server may have restarted: announce again
                sender.resend(range(len(sender.manifest.chunks)), count=False)
        finally:
            sender.close()
        ack = self.acks.pop(sha)
        if ack.rejected:
            log.warning("%s: update rejected: %s: %s", self.cfg.device_id, ack.error,
                        ack.reason)
        return ack.status

    def _assignment(self, strategy: Any, train: TrainConfig) -> frozenset:
        """fedmoe: the fixed sub-model from a forward-only usage pass over the local data."""
        saved = self.local.get("assignment")
        if saved is not None:
            from hfedmoe.names import ExpertId

            return frozenset(ExpertId.parse(s) for s in saved)
        from device_agent.train import usage_profile

        usage = usage_profile(self.model, self.data, strategy, train.batch_size,
                              self.cfg.model.max_length)
        chosen = strategy.assign(usage, self.budget.c_budget)
        self.local["assignment"] = sorted(str(e) for e in chosen)
        return chosen

    def _on_step(self, info: dict[str, Any]) -> None:
        if self.stop_requested:
            raise AgentStopped
        self.transport.pump(timeout=0)  # keep acks and announcements flowing during training
        now = self.clock()
        if now - self._checked_at >= self._rules.check_every_s:
            self._checked_at = now
            cond = read_conditions(self.cfg.conditions_file)
            reasons = check(cond, self._rules)
            if reasons:
                log.warning("%s: conditions broke during round %s (%s): %s the partial work",
                            self.cfg.device_id, self._round_idx, "; ".join(reasons),
                            "sending" if self._rules.on_break == "send" else "dropping")
                self._eligible = (self._round_idx, tuple(reasons))
                self._report_eligibility(self._round_idx, reasons, cond.to_dict(),
                                         during_round=True,
                                         sending=self._rules.on_break == "send")
                if self._rules.on_break == "drop":
                    raise ConditionsBroke(reasons)
                from hfedmoe.trainer import StopTraining

                raise StopTraining("; ".join(reasons))
        if sys.stderr.isatty() and info["step"] % 5 == 0:
            print(f"\r{self.cfg.device_id} step {info['step']} loss {info['loss']:.3f} "
                  f"experts {info['experts']}/{info['budget']} "
                  f"{info['tokens_per_s']:.0f} tok/s", end="", file=sys.stderr)


def resolve_device(name: str) -> str:
    """``"auto"``: CUDA when present (Jetson included), else the CPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def load_agent_config(path: str | None, overrides: list[str]) -> AgentConfig:
    from hfedmoe.config import load_config

    return load_config(AgentConfig, path, overrides)
