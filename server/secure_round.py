"""A live secure-aggregation round over the run's topics: the coordinator's side.

:class:`SecureRound` wraps :class:`server.secagg.SecAggServer` with the transport. Devices send
their four messages (AdvertiseKeys, ShareKeys, MaskedInput, UnmaskResponse) as ordinary update
transfers on their own ``update/{device}/{sha}`` topics (so the broker's ACLs do not change and
megabytes of masked vectors travel chunked), told apart from plain updates by their magic
bytes; each is acknowledged like an update. The server's messages (Roster, ShareRelay,
UnmaskRequest) go to each device on ``ack/{device}/secagg``. Phases close when every expected
device has answered, or at a deadline: the round's deadline for the advertisements (devices
advertise after training), then ``secagg.phase_timeout_s`` for each later phase. A device that
misses a phase counts as dropped. Nothing of a secure round is durable: a coordinator that
restarts mid-round opens the round again as a new one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hfedmoe.aggregation import AggregationRule
from hfedmoe.errors import SecAggError
from hfedmoe.protocol import UpdateAck
from hfedmoe.secagg import ROUND_KEY_BYTES
from hfedmoe.secagg_config import SecAggConfig
from hfedmoe.secagg_messages import MAGIC, AdvertiseKeys, MaskedInput, ShareKeys, UnmaskResponse
from hfedmoe.transport.base import Transport
from hfedmoe.transport.topics import Topics
from server.secagg import SecAggOutcome, SecAggServer

log = logging.getLogger("hfedmoe.server")
_TAKES = {"advertise": AdvertiseKeys, "share": ShareKeys, "masked": MaskedInput,
          "unmask": UnmaskResponse}


def is_secagg(blob: bytes) -> bool:
    """Whether an update transfer carries a secure-aggregation message."""
    return blob[:len(MAGIC)] == MAGIC


class SecureRound:
    """One secure round of the live coordinator.

    Args:
        cfg: the ``[secagg]`` settings.
        rule: the aggregation rule the devices weigh by.
        transport, topics: where the server's messages go.
        round_idx, participants: the open round.
        shapes: canonical key -> shape of the global state.
        deadline: the round's deadline (advertisements are due by then).
        clock: wall clock.
        seen_keys: public keys of earlier rounds (kept by the coordinator between rounds).
    """

    def __init__(self, cfg: SecAggConfig, rule: AggregationRule, transport: Transport,
                 topics: Topics, round_idx: int, participants: Sequence[str],
                 shapes: Mapping[str, Sequence[int]], deadline: float,
                 clock: Callable[[], float], seen_keys: set[bytes]) -> None:
        self.cfg, self.transport, self.topics = cfg, transport, topics
        self.round_idx, self.clock = round_idx, clock
        self.participants = frozenset(participants)
        self.round_key = os.urandom(ROUND_KEY_BYTES)
        self.server = SecAggServer(cfg, rule, self.round_key, shapes, seen_keys)
        self.phase_deadline = deadline
        self.expected: frozenset[str] = self.participants
        self.answered: set[str] = set()
        self.bytes_in: dict[str, int] = {}
        self.outcome: SecAggOutcome | None = None

    def announced(self) -> dict[str, Any]:
        """The announcement's ``secagg`` table: the settings and this round's key."""
        return {**dataclasses.asdict(self.cfg), "round_key": self.round_key.hex()}

    @property
    def done(self) -> bool:
        """Every phase closed (the unmasking's answers are in, or its deadline passed)."""
        return self.server.phase == "unmask" and (self.answered >= self.expected
                                                  or self.clock() >= self.phase_deadline)

    def receive(self, device: str, sha: str, blob: bytes) -> None:
        """Take one device message (its ``sha`` is acknowledged when it is taken).

        Raises:
            SecAggError: the message does not belong to the open phase, is malformed or is
                refused by the protocol (the round is unchanged; the caller rejects it).
        """
        if device not in self.participants:
            raise SecAggError(f"{device} is not a participant of round {self.round_idx}")
        phase = self.server.phase
        cls = _TAKES.get(phase)
        if cls is None or len(blob) < 5 or blob[4] != cls.KIND:
            raise SecAggError(f"{device}: not the {phase} message the round waits for")
        msg = cls.from_bytes(blob)
        if msg.client != device:
            raise SecAggError(f"{device}: a message that names {msg.client}")
        getattr(self.server, {"advertise": "advertise", "share": "share_keys",
                              "masked": "masked_input", "unmask": "unmask_response"}[phase])(msg)
        self.answered.add(device)
        self.bytes_in[device] = self.bytes_in.get(device, 0) + len(blob)
        self.transport.publish(self.topics.ack(device),
                               UpdateAck(self.round_idx, sha, "accepted").to_bytes())

    def refuse_plain(self, device: str) -> None:
        """A plain update during a secure round: refused (raises SecAggError)."""
        self.server.refuse_plain(device)

    def step(self) -> None:
        """Close the open phase when every expected device answered or its deadline passed,
        and send the next phase's messages."""
        if self.server.phase == "unmask" or not (
                self.answered >= self.expected or self.clock() >= self.phase_deadline):
            return
        phase, sent = self.server.phase, 0
        if phase == "advertise":
            roster = self.server.roster().to_bytes()
            expected = {c.client for c in self.server.roster_value.clients}
            for device in sorted(expected):
                sent += self._send(device, roster)
        elif phase == "share":
            relays = self.server.relays()
            expected = set(relays)
            for device, relay in relays.items():
                sent += self._send(device, relay.to_bytes())
        else:
            request = self.server.unmask_request()
            expected = set(request.survivors)
            data = request.to_bytes()
            for device in request.survivors:
                sent += self._send(device, data)
        log.info("round %d: secure aggregation: %s closed with %d of %d; %d bytes out",
                 self.round_idx, phase, len(self.answered & self.expected), len(self.expected),
                 sent)
        self.expected, self.answered = frozenset(expected), set()
        self.phase_deadline = self.clock() + self.cfg.phase_timeout_s

    def _send(self, device: str, data: bytes) -> int:
        self.transport.publish(self.topics.secagg(device), data)
        return len(data)

    def finalize(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new global state (revealed units only); logs what was withheld and why."""
        if self.server.phase != "unmask":  # closed before the unmasking: nothing is revealed
            self.outcome = SecAggOutcome(dict(global_state), withheld=dict(self.server.withheld))
        else:
            self.outcome = self.server.finalize(global_state)
        for unit, why in sorted(self.outcome.withheld.items()):
            log.info("round %d: secure aggregation: %s withheld (%s)", self.round_idx, unit, why)
        return self.outcome.state

    def summary(self) -> dict[str, Any]:
        """What the round revealed and withheld, for the metrics row."""
        out = self.outcome
        if out is None:
            return {}
        reasons: dict[str, int] = {}
        for why in out.withheld.values():
            reasons[why] = reasons.get(why, 0) + 1
        return {"revealed_units": len(out.revealed), "withheld": reasons,
                "withheld_units": dict(sorted(out.withheld.items())),
                "revealed": dict(sorted(out.revealed.items())),
                "survivors": list(out.survivors), "dropped": list(out.dropped),
                "up_bytes": sum(self.bytes_in.values())}


class SecureRounds:
    """The coordinator's secure rounds (``[secagg] enabled``): one :class:`SecureRound` per
    open round, the update receiver's routing, and the round's row. Off: every call is a
    no-op and the coordinator runs plain rounds.

    Args:
        reject: the intake's ``reject(device, round_idx, exc, sha)`` (counts, logs, acks).
    """

    def __init__(self, cfg: SecAggConfig, rule: AggregationRule, transport: Transport,
                 topics: Topics, clock: Callable[[], float],
                 reject: Callable[[str, int | None, Exception, str], None]) -> None:
        self.cfg, self.rule, self.transport, self.topics = cfg, rule, transport, topics
        self.clock, self.reject = clock, reject
        self.round: SecureRound | None = None
        self.seen_keys: set[bytes] = set()

    @property
    def active(self) -> bool:
        return self.round is not None

    def open(self, round_idx: int, participants: Sequence[str], deadline: float,
             state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Start a secure round (when enabled); the announcement's ``secagg`` table."""
        if not self.cfg.enabled:
            return {}
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.round = SecureRound(self.cfg, self.rule, self.transport, self.topics, round_idx,
                                 participants, shapes, deadline, self.clock, self.seen_keys)
        return self.round.announced()

    def receiver(self, plain: Callable[[str, bytes], None]) -> Callable[[str, bytes], None]:
        """The update receiver's callback: secure-round messages to the open secure round, a
        plain update during one refused, everything else to ``plain`` (the intake)."""
        def receive(prefix: str, blob: bytes) -> None:
            sr = self.round
            if sr is None:
                return plain(prefix, blob)
            device, sha = self.topics.parse_update_prefix(prefix)
            try:
                if is_secagg(blob):
                    sr.receive(device, sha, blob)
                else:
                    sr.refuse_plain(device)
            except SecAggError as exc:
                self.reject(device, sr.round_idx, exc, sha)
        return receive

    def finished(self) -> bool:
        """Advance the open secure round; whether all its phases are closed."""
        assert self.round is not None
        self.round.step()
        return self.round.done

    def finalize(self, state: Mapping[str, torch.Tensor],
                 accepted: dict[str, int]) -> dict[str, torch.Tensor]:
        """The new global state; ``accepted`` gets each surviving device's bytes."""
        assert self.round is not None
        new_state = self.round.finalize(state)
        assert self.round.outcome is not None
        accepted.update({d: self.round.bytes_in.get(d, 0) for d in self.round.outcome.survivors})
        return new_state

    def row(self) -> dict[str, Any]:
        """The closed secure round's part of the metrics row (``{}`` for a plain round)."""
        if self.round is None:
            return {}
        summary = self.round.summary()
        self.round = None  # experts aggregated: the revealed experts' sums
        return {"secagg": summary,
                "experts_updated": sum(1 for u in summary.get("revealed", {}) if u[:2] == "e:")}
