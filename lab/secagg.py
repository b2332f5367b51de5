"""A secure-aggregation round in one process: the device and server sides over real bytes.

:func:`run_secure_round` drives :class:`device_agent.secagg.SecAggClient` and
:class:`server.secagg.SecAggServer` through the four phases, every message encoded and decoded
as it would be on the wire, with chosen clients dropping after sharing keys (their update is
lost) or after sending their masked input (their update counts; they give no shares). It
counts bytes and seconds per side. The simulator (``[secagg] enabled = true``), the tests
and ``benchmarks/secagg.py`` use it; :class:`SecureAggregator` gives it the streaming
aggregator's ``add`` / ``report`` / ``finalize`` shape.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from device_agent.secagg import SecAggClient
from hfedmoe.aggregation import AggregationRule, ClientReport, round_report
from hfedmoe.secagg import ROUND_KEY_BYTES, SecAggConfig
from hfedmoe.secagg_messages import Roster, ShareRelay, UnmaskRequest
from hfedmoe.update import SparseUpdate
from server.secagg import SecAggOutcome, SecAggServer


@dataclass
class RoundCost:
    """Bytes and seconds of one secure round. Client figures are totals over the clients
    (divide by ``clients`` for one device); ``up``: client -> server, ``down``: server ->
    client (the roster counts once per recipient)."""

    clients: int = 0
    up_bytes: int = 0
    down_bytes: int = 0
    client_s: float = 0.0
    server_s: float = 0.0
    phases: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"clients": self.clients, "up_bytes": self.up_bytes,
                "down_bytes": self.down_bytes, "client_s": round(self.client_s, 6),
                "server_s": round(self.server_s, 6), "phase_bytes": dict(self.phases)}


class _Clock:
    def __init__(self, cost: RoundCost) -> None:
        self.cost = cost

    def client(self, fn: Any, *args: Any) -> bytes:
        t0 = time.perf_counter()
        data = fn(*args).to_bytes()
        self.cost.client_s += time.perf_counter() - t0
        return data

    def server(self, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        self.cost.server_s += time.perf_counter() - t0
        return out

    def up(self, phase: str, data: bytes) -> bytes:
        self.cost.up_bytes += len(data)
        self.cost.phases[phase] = self.cost.phases.get(phase, 0) + len(data)
        return data

    def down(self, phase: str, data: bytes) -> bytes:
        self.cost.down_bytes += len(data)
        self.cost.phases[phase] = self.cost.phases.get(phase, 0) + len(data)
        return data


def run_secure_round(updates: Sequence[SparseUpdate], global_state: Mapping[str, torch.Tensor],
                     rule: AggregationRule, cfg: SecAggConfig, *,
                     drop_before_input: Collection[str] = (),
                     drop_before_unmask: Collection[str] = (),
                     seen_keys: set[bytes] | None = None,
                     round_key: bytes | None = None) -> tuple[SecAggOutcome, RoundCost]:
    """One secure round over ``updates``; the server's outcome and the round's cost.

    Clients in ``drop_before_input`` stop after sharing keys; those in ``drop_before_unmask``
    stop after sending their masked input.
    """
    round_key = round_key or os.urandom(ROUND_KEY_BYTES)
    cost = RoundCost(clients=len(updates))
    clock = _Clock(cost)
    shapes = {k: tuple(v.shape) for k, v in global_state.items()}
    server = SecAggServer(cfg, rule, round_key, shapes, seen_keys)
    clients = {u.client_id: SecAggClient(u, rule, cfg, round_key) for u in updates}
    for c in clients.values():
        clock.server(server.advertise, clock.up("advertise", clock.client(c.advertise)))
    roster = clock.server(lambda: server.roster().to_bytes())
    for c in clients.values():
        msg = Roster.from_bytes(clock.down("roster", roster))
        clock.server(server.share_keys, clock.up("share", clock.client(c.share_keys, msg)))
    relays = clock.server(lambda: {k: v.to_bytes() for k, v in server.relays().items()})
    for cid, data in relays.items():
        if cid in drop_before_input:
            continue
        relay = ShareRelay.from_bytes(clock.down("relay", data))
        sent = clock.client(clients[cid].masked_input, relay)
        clock.server(server.masked_input, clock.up("masked", sent))
    request = clock.server(lambda: server.unmask_request().to_bytes())
    for cid in UnmaskRequest.from_bytes(request).survivors:
        if cid in drop_before_unmask:
            continue
        req = UnmaskRequest.from_bytes(clock.down("request", request))
        clock.server(server.unmask_response, clock.up("unmask", clock.client(clients[cid].unmask,
                                                                                 req)))
    outcome = clock.server(server.finalize, global_state)
    return outcome, cost


class SecureAggregator:
    """The streaming aggregator's shape (``add`` / ``report`` / ``finalize``) over a secure
    round: updates are collected as the devices finish, and ``finalize`` runs the protocol
    with the configured simulated dropouts (the first clients in update order drop).

    ``report`` is computed from the updates themselves for the simulator's metrics rows; a
    live server under secure aggregation would not have these per-client figures.
    """

    def __init__(self, rule: AggregationRule, cfg: SecAggConfig,
                 seen_keys: set[bytes] | None = None) -> None:
        self.rule, self.cfg = rule, cfg
        self.seen_keys = seen_keys if seen_keys is not None else set()
        self._updates: list[SparseUpdate] = []
        self.outcome: SecAggOutcome | None = None
        self.cost: RoundCost | None = None

    @property
    def num_clients(self) -> int:
        return len(self._updates)

    def add(self, update: SparseUpdate) -> None:
        self._updates.append(update)

    def report(self) -> dict[str, ClientReport]:
        return round_report(self._updates, self.rule.tau)

    def finalize(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = [u.client_id for u in self._updates]
        n_in, n_un = self.cfg.sim_drop_before_input, self.cfg.sim_drop_before_unmask
        self.outcome, self.cost = run_secure_round(
            self._updates, global_state, self.rule, self.cfg, seen_keys=self.seen_keys,
            drop_before_input=ids[:n_in], drop_before_unmask=ids[n_in:n_in + n_un])
        return self.outcome.state

    def summary(self) -> dict[str, Any]:
        """What the round revealed and withheld, and its cost, for the metrics row."""
        if self.outcome is None or self.cost is None:
            return {}
        return {"revealed_units": len(self.outcome.revealed),
                "withheld": _count(self.outcome.withheld.values()),
                "withheld_units": dict(sorted(self.outcome.withheld.items())),
                "dropped": list(self.outcome.dropped), **self.cost.to_dict()}


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out

