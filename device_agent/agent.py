"""The device agent loop: measure, register, and take part in rounds until the run is done.

One thread owns everything: it pumps the transport (paho only enqueues), fetches the global
model's missing shards, trains with :func:`device_agent.train.train_round`, sends the sparse
update as a chunked transfer and waits for the server's ack, re-sending the manifest until it
comes. State that must survive a restart (last acknowledged round, a pending update, the fedmoe
assignment) lives in ``work_dir``; the MQTT client id is the device id, so the broker keeps its
session. SIGTERM stops cleanly between steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.capacity import Capacity, probe_host, quantize_base
from device_agent.conditions import ConditionsBroke, JoinGate, privacy_reason
from device_agent.config import AgentConfig
from device_agent.emulation import emulation_scale
from device_agent.link import AgentStopped, ServerLink
from device_agent.privacy import DevicePrivacy, LegacyCount, PrivacyLedger
from hfedmoe.config import MethodConfig, TrainConfig, from_dict
from hfedmoe.errors import PrivacyRefused, SecAggError, TransportError
from hfedmoe.modelsync import ShardCache
from hfedmoe.names import ExpertId
from hfedmoe.protocol import Registration, RoundAnnouncement
from hfedmoe.transport.base import Transport
from hfedmoe.wire import encode

log = logging.getLogger("hfedmoe.agent")


class DeviceAgent:
    """One device taking part in a federated run: the loop that composes what it measures and
    can train (:class:`Capacity`), when it joins (:class:`JoinGate`) and its link to the server
    (:class:`ServerLink`), and plays each round it joins (:meth:`play_round`)."""

    def __init__(self, cfg: AgentConfig, transport: Transport | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.dir = cfg.directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "agent_state.json"
        self.local = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.stop_requested = False
        self.rounds_done = 0
        self.link = ServerLink(cfg, transport, clock, stopped=lambda: self.stop_requested)
        # the device's own DP floor and its epsilon ledger (durable: privacy.sqlite)
        self.privacy = DevicePrivacy(cfg.privacy, PrivacyLedger(self.dir / "privacy.sqlite"),
                                     LegacyCount(int(self.local.get("dp_rounds", 0)),
                                                 self._drop_legacy_count))
        self.gate = JoinGate(cfg.device_id, cfg.eligibility, cfg.conditions_file, self.local,
                             self.link.publish_status, clock, privacy=self.privacy)
        self._round_idx: int | None = None  # the round being trained (conditions checks)

    # --- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Measure the device, load data and model, measure the model's costs."""
        cfg = self.cfg
        if cfg.train.threads:
            import torch

            torch.set_num_threads(cfg.train.threads)
        host, report = probe_host(cfg)  # before the model loads
        self.data, self.model = load_local(cfg)
        self.cache = ShardCache(self.model.spec())
        self.base_manifest = self.cache.add_state(self.model.state())
        params = sum(p.numel() for p in self.model.module.parameters())  # before quantizing
        scale = emulation_scale(cfg.model.name, params, cfg.emulate_reference,
                                "agent.emulate_reference")
        quantize_base(self.model, cfg)  # model.quantize: the frozen base stored quantized
        self.capacity = Capacity(cfg, self.model, len(self.data), host, report, scale)
        self.capacity.start()
        budget = self.capacity.budget
        log.info("%s: %d local examples, budget %d experts (%s; %s%s)", cfg.device_id,
                 len(self.data), budget.c_budget, budget.limit,
                 "emulated " + report.source if report.emulated else "measured",
                 f", emulation scale {scale.describe()}" if scale else "")

    def _registration(self) -> Registration:
        cap = self.capacity
        return Registration(
            device_id=self.cfg.device_id, budget=cap.budget.c_budget,
            report={**cap.report.to_dict(), "budget": cap.budget.to_dict(),
                    "local_examples": len(self.data),
                    "measured_step": dataclasses.asdict(cap.costs.steps)})

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Take part in rounds until the server says done (or ``max_rounds``); exit code."""
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm)
        link = self.link
        try:
            self.setup()
            link.connect(self._registration)
            while not (link.done or self.stop_requested):
                link.pump(timeout=0.2)
                ann = link.announcement
                if ann is not None and self.gate.admits(ann):
                    self.play_round(ann)
                    if self.cfg.max_rounds and self.rounds_done >= self.cfg.max_rounds:
                        break
        except AgentStopped:
            log.info("%s: stopped by SIGTERM", self.cfg.device_id)
        finally:
            link.close()
            self.privacy.ledger.close()
        return 0

    def _sigterm(self, *_: Any) -> None:
        self.stop_requested = True

    # --- one round ---------------------------------------------------------------------------
    def play_round(self, ann: RoundAnnouncement) -> None:
        """One round: fetch, train within the deadline, send, wait for the ack."""
        self._round_idx = ann.round_idx
        t0 = self.clock()
        pending = self.dir / f"pending_r{ann.round_idx}.bin"
        result, down, secure = None, 0, None
        if pending.exists() and not ann.secagg:  # trained before a restart; send it again
            blob = pending.read_bytes()
        else:
            down = self._fetch_global(ann)
            try:
                result, blob, secure = self._train(ann, down)
            except ConditionsBroke as exc:  # on_break = "drop": nothing leaves the device
                self._skip_round(ann.round_idx, exc.reasons)
                return
            except PrivacyRefused as exc:  # the gate admitted it; refused all the same
                self._skip_round(ann.round_idx, [privacy_reason(exc)])
                return
            if secure is None:  # a secure round cannot resume after a restart (fresh keys)
                _atomic_write(pending, blob)
        status, up = (self._send(ann, blob), len(blob)) if secure is None else \
            self._send_secure(ann, *secure)
        if result is not None and result.steps:
            self.capacity.watch(result)
        pending.unlink(missing_ok=True)
        self._finish_round(ann.round_idx)
        row = round_row(ann.round_idx, status, up, down, self.capacity.budget.c_budget,
                        self.clock() - t0, result)
        self._log_round(row)
        log.info("%s: round %d %s: %s", self.cfg.device_id, ann.round_idx, status,
                 ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items() if k not in ("round", "status")))

    def _fetch_global(self, ann: RoundAnnouncement) -> int:
        """The round's global model, fetched and loaded; the bytes downloaded."""
        manifest = ann.model  # its hash checked when the announcement was read
        down = self.link.fetch_model(self.cache, manifest, float(ann.deadline))
        self.model.load_state(self.cache.assemble(manifest))
        quantize_base(self.model, self.cfg)  # the round's weights, re-quantized (server: fp32)
        return down

    def _train(self, ann: RoundAnnouncement, down: int) -> tuple[Any, bytes, Any]:
        """Train the announced round within its deadline; the result, the encoded update and,
        for a secure round, ``(update, rule)`` (the update then never leaves in the clear)."""
        from device_agent.costs import make_planner
        from device_agent.train import RoundContext, RoundIds, train_round
        from hfedmoe.strategies import get_strategy

        # the stricter of the round's DP settings and the device's own (PrivacyRefused)
        self.privacy.admit_secagg(ann.secagg)
        method = self.privacy.admit(from_dict(MethodConfig, dict(ann.method)))
        strategy = get_strategy(ann.strategy, method)
        train = dataclasses.replace(self.cfg.train, **ann.server_train())
        max_length = ann.max_length or self.cfg.model.max_length
        train_window = self._size_round(ann, train, max_length)
        budget = self.capacity.budget
        assignment = self._assignment(strategy, train) if strategy.needs_assignment else None
        log.info("%s: round %d, budget %d (%s), %.1fs to train", self.cfg.device_id,
                 ann.round_idx, budget.c_budget, budget.limit, train_window)
        result = train_round(RoundContext(
            self.model, self.data, strategy=strategy, budget=budget.c_budget,
            train=train, method=method, ids=RoundIds(
                self.cfg.run_id, ann.round_idx, self.cfg.device_id, ann.model.state_hash),
            max_length=max_length, deadline_s=max(train_window, 0.0),
            assignment=assignment, on_step=self._on_step,
            # an emulated device plans in its own (scaled) memory: the host's RSS is not it
            planner=make_planner(budget, enforce=strategy.uses_budget,
                                 resident=0 if self.capacity.report.emulated else None,
                                 device=next(self.model.module.parameters()).device,
                                 unified_memory=self.capacity.report.unified_memory),
            runtime=self.cfg.runtime,
            prior={ExpertId.parse(e): v for e, v in ann.prior.items()} or None))
        update = self.privacy.release(self._stamped(result, down))  # the metadata policy
        blob = encode(update, method.tau, self.cfg.wire)
        self.privacy.record(ann.round_idx, method)  # committed before the update leaves
        return result, blob, ((update, strategy.rule) if ann.secagg else None)

    def _size_round(self, ann: RoundAnnouncement, train: TrainConfig, max_length: int) -> float:
        """Measure the announced shape, decide the round's budget (the server hears of a new
        one); the seconds left to train."""
        cap = self.capacity
        cap.fit_round(train, max_length)
        train_window = float(ann.deadline) - self.clock() - self.cfg.upload_margin_s
        window = float(ann.train_time_s or train_window)
        if cap.rebudget(window, train):  # tell the server the new budget
            self.link.register(self._registration())
        if not cap.report.emulated:  # an emulated device's window is in its own time
            train_window = min(train_window, window)
        return train_window

    def _stamped(self, result: Any, down: int) -> Any:
        """The round's update with what the server records of the device's round."""
        budget, meta = self.capacity.budget, result.update.meta
        return dataclasses.replace(result.update, meta=meta.replace(
            budget_limit=budget.limit, budget_reason=budget.reason,
            predicted_step_s=(result.plan or {}).get("step_seconds", budget.step_seconds),
            emulated=self.capacity.report.emulated, bytes_down=down,
            upload_prev=self.local.get("last_upload") or None))

    def _send(self, ann: RoundAnnouncement, blob: bytes) -> str:
        """Upload the update and wait for the ack; the ack's status (remembered: the next
        update tells the server how long this upload took)."""
        up0 = self.clock()
        status = self.link.send_update(ann.round_idx, blob, float(ann.deadline),
                                       whole_max=ann.whole_max_bytes)
        self.local["last_upload"] = {"round": ann.round_idx,
                                     "seconds": round(self.clock() - up0, 3),
                                     "bytes": len(blob), "status": status}
        return status

    def _send_secure(self, ann: RoundAnnouncement, update: Any, rule: Any) -> tuple[str, int]:
        """Take part in a secure round (:class:`SecureSession`) instead of sending the update;
        ``"accepted"`` or ``"secagg-failed"`` (logged) when a phase failed, and the bytes
        sent."""
        from device_agent.secure_session import SecureSession

        session = None
        try:
            session = SecureSession(self.link, ann, update, rule)
            return session.run(), session.bytes_up
        except (SecAggError, TransportError) as exc:
            log.warning("%s: secure round %d: %s", self.cfg.device_id, ann.round_idx, exc)
            return "secagg-failed", session.bytes_up if session is not None else 0

    def _finish_round(self, round_idx: int) -> None:
        self.local["last_round"] = round_idx
        self._save_state()
        self.rounds_done += 1

    def _log_round(self, row: dict[str, Any]) -> None:
        with open(self.dir / "agent.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _skip_round(self, round_idx: int, reasons: list[str]) -> None:
        """Conditions broke mid-round with ``on_break = "drop"``: the round is over for this
        device (its status already says why)."""
        self._finish_round(round_idx)
        self._log_round({"round": round_idx, "status": "dropped", "reasons": reasons})

    def _drop_legacy_count(self) -> None:
        self.local.pop("dp_rounds", None)  # now rows of the privacy ledger
        self._save_state()

    def _save_state(self) -> None:
        _atomic_write(self.state_path, json.dumps(self.local).encode())

    def _assignment(self, strategy: Any, train: TrainConfig) -> frozenset:
        """fedmoe: the fixed sub-model from a forward-only usage pass over the local data."""
        saved = self.local.get("assignment")
        if saved is not None:
            return frozenset(ExpertId.parse(s) for s in saved)
        from device_agent.train import usage_profile

        usage = usage_profile(self.model, self.data, strategy, train.batch_size,
                              self.cfg.model.max_length)
        chosen = strategy.assign(usage, self.capacity.budget.c_budget)
        self.local["assignment"] = sorted(str(e) for e in chosen)
        return chosen

    def _on_step(self, info: dict[str, Any]) -> None:
        if self.stop_requested:
            raise AgentStopped
        self.link.pump(timeout=0)  # keep acks and announcements flowing during training
        self.gate.check_training(self._round_idx)
        if sys.stderr.isatty() and info["step"] % 5 == 0:
            print(f"\r{self.cfg.device_id} step {info['step']} loss {info['loss']:.3f} "
                  f"experts {info['experts']}/{info['budget']} "
                  f"{info['tokens_per_s']:.0f} tok/s", end="", file=sys.stderr)


def round_row(round_idx: int, status: str, bytes_up: int, bytes_down: int, budget: int,
              seconds: float, result: Any = None) -> dict[str, Any]:
    """The device's row of a round in ``agent.jsonl`` (``result``: None when a pending update
    from before a restart was sent)."""
    row: dict[str, Any] = {"round": round_idx, "status": status, "bytes_up": bytes_up,
                           "bytes_down": bytes_down, "budget": budget, "seconds": seconds}
    if result is not None:
        row.update(steps=result.steps, loss=result.mean_loss, stopped_by=result.stopped_by,
                   experts=len(result.update.updated),
                   optimizer_experts=result.optimizer_experts, plan=result.plan)
    return row


def load_local(cfg: AgentConfig) -> tuple[Any, Any]:
    """``(data, model)``: this device's examples (:func:`local_data`) and the model, on
    ``train.device``."""
    from hfedmoe.data import PairDataset, fit_prompts
    from hfedmoe.models.registry import build_model

    data, num_labels = local_data(cfg)
    model = build_model(cfg.model, cfg.data.task, num_labels)
    if isinstance(data, PairDataset):  # every prompt must leave room for its response
        data = fit_prompts(data, model.require_tokenizer(), cfg.model.max_length,
                           cfg.data.long_prompts, "local")
    model.module.to(resolve_device(cfg.train.device))
    return data, model


def local_data(cfg: AgentConfig) -> tuple[Any, int]:
    """``(examples, num_labels)`` this device trains on: its shard of ``data.source`` in a
    simulation (``num_shards > 1``); else the whole source, except for a builtin one
    (``"chatterbot"``, ``"fortunes"``), which the server also holds its test and validation
    splits out of: a device then takes the training split only (the same ``data.test_fraction``,
    ``data.validation_fraction`` and ``data.seed`` as the server), so the held-out examples
    never train."""
    from hfedmoe.data import load_dataset, load_task
    from hfedmoe.data.task import BUILTIN_SOURCES

    if cfg.num_shards > 1:
        task = load_task(cfg.data)
        return task.client_datasets(cfg.num_shards)[cfg.shard], task.num_labels
    if cfg.data.source in BUILTIN_SOURCES:
        task = load_task(cfg.data)
        return task.train, task.num_labels
    data = load_dataset(cfg.data)
    return data, data.num_labels


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
