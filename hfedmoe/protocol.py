"""The kit's control messages as typed values: one frozen dataclass per message, JSON on the wire.

Every message has ``to_bytes()`` and ``from_bytes(data)``; ``from_bytes`` takes untrusted bytes
and returns a validated value or raises :class:`~hfedmoe.errors.ProtocolError` (nothing else).
Unknown keys are ignored (a newer peer may send more); a key a reader needs must be present and
of its type. The JSON is what the kit has always sent, so old and new peers interoperate::

    device -> server   register/{device}          Registration
                       status/{device} (retained) DeviceStatus (online/offline, eligibility)
                       update/{device}/fetch/{sha} FetchRequest (also a chunk resend request)
    server -> device   ack/{device}               Registered, UpdateAck (ack or error)
                       round (retained)           RoundAnnouncement, Done
    worker -> server   ingest/event/{worker}      IngestEvent
                       ingest/partial/{worker}    PartialNotice
                       ingest/status/{worker}     DeviceStatus (online/offline)
    server -> workers  ingest/control             CloseRound

This module imports no torch: the transport and the swarm use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from hfedmoe.errors import ProtocolError

# Hyper-parameters the server decides for every device (the announcement's ``train`` table);
# the rest of a device's [train] stays local.
SERVER_TRAIN_KEYS = ("batch_size", "lr", "head_lr", "optimizer", "weight_decay", "local_epochs",
                     "max_steps", "selection_batches", "reselect", "adapter", "lora_rank",
                     "lora_alpha")

MAX_ID_CHARS = 256  # device, worker and run ids, shas, strategy names
MAX_REASON_CHARS, MAX_REASONS = 200, 10  # an eligibility report's reasons, truncated
MAX_ERROR_CHARS = 500  # a rejection's reason, truncated
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED: Any = object()


# --- reading untrusted JSON ---------------------------------------------------------------------


_EXPERT_ID = re.compile(r"\d{1,6}:\d{1,6}")


def _load(data: Any, max_bytes: int, what: str) -> dict[str, Any]:
    """``data`` as a JSON object of at most ``max_bytes`` bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what}: payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError(f"{what} is {len(data)} bytes > {max_bytes}")
    try:
        raw = json.loads(bytes(data))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return raw


def _get(raw: Mapping[str, Any], key: str, default: Any, what: str) -> Any:
    if key in raw:
        return raw[key]
    if default is _REQUIRED:
        raise ProtocolError(f"{what}: missing field {key!r}")
    return default


def _int(raw: Mapping[str, Any], key: str, what: str, default: Any = _REQUIRED,
         lo: int = 0, hi: int = 2**63 - 1, none: bool = False) -> Any:
    v = _get(raw, key, default, what)
    if v is None and none:
        return None
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"{what}: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _finite(v: Any) -> bool:
    """A JSON number that is not NaN or infinite (an integer of any size counts)."""
    return type(v) is int or (type(v) is float and math.isfinite(v))


def _num(raw: Mapping[str, Any], key: str, what: str, default: Any = _REQUIRED,
         none: bool = False) -> Any:
    v = _get(raw, key, default, what)
    if v is None and none:
        return None
    if not _finite(v):
        raise ProtocolError(f"{what}: {key} must be a finite number, got {v!r}")
    return v


def _str(raw: Mapping[str, Any], key: str, what: str, default: Any = _REQUIRED,
         max_chars: int = MAX_ID_CHARS) -> str:
    v = _get(raw, key, default, what)
    if not isinstance(v, str) or len(v) > max_chars:
        raise ProtocolError(f"{what}: {key} must be a string of <= {max_chars} characters")
    return v


def _bool(raw: Mapping[str, Any], key: str, what: str, default: Any = _REQUIRED) -> bool:
    v = _get(raw, key, default, what)
    if not isinstance(v, bool):
        raise ProtocolError(f"{what}: {key} must be true or false, got {v!r}")
    return v


def _obj(raw: Mapping[str, Any], key: str, what: str, default: Any = _REQUIRED) -> dict:
    v = _get(raw, key, default, what)
    if not isinstance(v, dict):
        raise ProtocolError(f"{what}: {key} must be a JSON object")
    return v


def _list(raw: Mapping[str, Any], key: str, what: str, default: Any = _REQUIRED) -> list:
    v = _get(raw, key, default, what)
    if not isinstance(v, list):
        raise ProtocolError(f"{what}: {key} must be a JSON list")
    return v


def _type(raw: Mapping[str, Any], what: str, *allowed: str) -> str:
    kind = raw.get("type")
    if kind not in allowed:
        raise ProtocolError(f"{what}: type must be one of {allowed}, got {kind!r}")
    return kind


def _dumps(body: Mapping[str, Any], **kw: Any) -> bytes:
    return json.dumps(body, **kw).encode()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ProtocolError(message)


# --- the model a round announces ----------------------------------------------------------------


def manifest_hash(shards: Mapping[str, str]) -> str:
    """The state hash: sha256 over the sorted (group, shard sha) pairs."""
    return hashlib.sha256(json.dumps(sorted(shards.items())).encode()).hexdigest()


@dataclass(frozen=True)
class ModelManifest:
    """What the global model of a round is: group -> shard sha256, and the whole state's hash."""

    state_hash: str
    shards: Mapping[str, str]

    def to_dict(self) -> dict:
        return {"state_hash": self.state_hash, "shards": dict(sorted(self.shards.items()))}

    @classmethod
    def from_dict(cls, data: object) -> ModelManifest:
        if not isinstance(data, dict) or not isinstance(data.get("shards"), dict) \
                or not isinstance(data.get("state_hash"), str):
            raise ProtocolError("model manifest must have 'state_hash' and a 'shards' table")
        shards = data["shards"]
        if not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64
                   for k, v in shards.items()):
            raise ProtocolError("model manifest shards must map group names to sha256 strings")
        return cls(data["state_hash"], dict(shards))


# --- device -> server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """A device registers (again after a restart or a new budget): its expert budget C_budget
    and its device report (hardware, budget decision, ``local_examples``)."""

    budget: int
    report: Mapping[str, Any] = field(default_factory=dict)
    device_id: str = ""
    MAX_BYTES: ClassVar[int] = 1 << 20

    def __post_init__(self) -> None:
        _check(type(self.budget) is int and self.budget >= 0,
               f"registration: budget must be an integer >= 0, got {self.budget!r}")
        n = self.report.get("local_examples")
        _check(n is None or (type(n) is int and n >= 0),
               f"registration: local_examples must be an integer >= 0, got {n!r}")

    @property
    def local_examples(self) -> int | None:
        """The local examples the device declares (None: not declared)."""
        return self.report.get("local_examples")

    def to_bytes(self) -> bytes:
        # a report may hold values JSON has no type for (paths): sent as strings
        return _dumps({"device_id": self.device_id, "budget": self.budget,
                       "report": dict(self.report)}, default=str)

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int | None = None) -> Registration:
        w = "registration"
        raw = _load(data, max_bytes or cls.MAX_BYTES, w)
        return cls(_int(raw, "budget", w), _obj(raw, "report", w, {}),
                   _str(raw, "device_id", w, ""))


@dataclass(frozen=True)
class DeviceStatus:
    """A device's (or an ingest worker's) retained status: online or offline, and when
    ``eligible`` is set, its eligibility report for ``round_idx``.

    Reasons are truncated to ``MAX_REASON_CHARS`` characters and ``MAX_REASONS`` entries."""

    state: str
    eligible: bool | None = None
    reasons: tuple[str, ...] = ()
    conditions: Mapping[str, Any] = field(default_factory=dict)
    round_idx: int | None = None
    during_round: bool = False
    sending: bool = False
    MAX_BYTES: ClassVar[int] = 64 << 10
    STATES: ClassVar[tuple[str, ...]] = ("online", "offline")

    def __post_init__(self) -> None:
        _check(self.state in self.STATES, f"status: state must be one of {self.STATES}")
        object.__setattr__(self, "reasons", tuple(str(r)[:MAX_REASON_CHARS]
                                                  for r in self.reasons)[:MAX_REASONS])
        _check(self.round_idx is None or (type(self.round_idx) is int and self.round_idx >= 0),
               f"status: round must be an integer >= 0, got {self.round_idx!r}")

    def to_bytes(self) -> bytes:
        if self.eligible is None:
            return _dumps({"state": self.state})
        return _dumps({"state": self.state, "eligible": self.eligible,
                       "reasons": list(self.reasons), "conditions": dict(self.conditions),
                       "round": self.round_idx, "during_round": self.during_round,
                       "sending": self.sending})

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceStatus:
        w = "status"
        raw = _load(data, cls.MAX_BYTES, w)
        state = _str(raw, "state", w)
        if "eligible" not in raw:
            return cls(state)
        reasons = _list(raw, "reasons", w, [])
        _check(all(isinstance(r, str) for r in reasons), "status: reasons must be strings")
        return cls(state, _bool(raw, "eligible", w), tuple(reasons),
                   _obj(raw, "conditions", w, {}), _int(raw, "round", w, None, none=True),
                   _bool(raw, "during_round", w, False), _bool(raw, "sending", w, False))


@dataclass(frozen=True)
class FetchRequest:
    """Ask a sender for a transfer's manifest and/or chunks (a model shard, an update)."""

    manifest: bool = False
    chunks: tuple[int, ...] = ()
    MAX_BYTES: ClassVar[int] = 4 << 20
    MAX_CHUNKS: ClassVar[int] = 1 << 20

    def __post_init__(self) -> None:
        _check(len(self.chunks) <= self.MAX_CHUNKS, "fetch request lists too many chunks")
        _check(all(type(i) is int and i >= 0 for i in self.chunks),
               "fetch request: chunks must be integers >= 0")

    def fits(self, num_chunks: int) -> bool:
        """Every chunk listed exists in a transfer of ``num_chunks`` chunks."""
        return len(self.chunks) <= num_chunks and all(i < num_chunks for i in self.chunks)

    def to_bytes(self) -> bytes:
        return _dumps({"manifest": self.manifest, "chunks": list(self.chunks)})

    @classmethod
    def from_bytes(cls, data: bytes) -> FetchRequest:
        w = "fetch request"
        raw = _load(data, cls.MAX_BYTES, w)
        return cls(_bool(raw, "manifest", w, False), tuple(_list(raw, "chunks", w, [])))


# --- server -> device ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    """The server took a registration (durably)."""

    run_id: str
    MAX_BYTES: ClassVar[int] = 4096

    def to_bytes(self) -> bytes:
        return _dumps({"type": "registered", "run_id": self.run_id})

    @classmethod
    def from_bytes(cls, data: bytes) -> Registered:
        raw = _load(data, cls.MAX_BYTES, "registered ack")
        _type(raw, "registered ack", "registered")
        return cls(_str(raw, "run_id", "registered ack"))


@dataclass(frozen=True)
class UpdateAck:
    """The server's answer to an update (``sha``) or to a rejected message (``sha`` empty).

    ``status`` is ``accepted``, ``late-folded`` or ``late-dropped`` (``"type": "ack"`` on the
    wire), or ``rejected`` (``"type": "error"``, with the error's class name and reason)."""

    round_idx: int | None
    sha: str
    status: str
    error: str = ""
    reason: str = ""
    STATUSES: ClassVar[tuple[str, ...]] = ("accepted", "late-folded", "late-dropped", "rejected")
    MAX_BYTES: ClassVar[int] = 64 << 10

    def __post_init__(self) -> None:
        _check(self.status in self.STATUSES, f"ack: status must be one of {self.STATUSES}")
        _check(self.rejected or (self.sha and not self.error and not self.reason),
               "ack: an accepted or late update names its sha and no error")
        _check(self.round_idx is None or (type(self.round_idx) is int and self.round_idx >= 0),
               f"ack: round must be an integer >= 0, got {self.round_idx!r}")
        object.__setattr__(self, "reason", self.reason[:MAX_ERROR_CHARS])

    @property
    def rejected(self) -> bool:
        return self.status == "rejected"

    def to_bytes(self) -> bytes:
        body = {"type": "error" if self.rejected else "ack", "round": self.round_idx,
                "sha": self.sha, "status": self.status}
        if self.rejected:
            body.update(error=self.error, reason=self.reason)
        return _dumps(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> UpdateAck:
        w = "ack"
        raw = _load(data, cls.MAX_BYTES, w)
        kind = _type(raw, w, "ack", "error")
        status = _str(raw, "status", w)
        _check((kind == "error") == (status == "rejected"), "ack: type and status disagree")
        return cls(_int(raw, "round", w, none=kind == "error"), _str(raw, "sha", w), status,
                   _str(raw, "error", w, "") if kind == "error" else "",
                   _str(raw, "reason", w, "", MAX_ERROR_CHARS) if kind == "error" else "")


def decode_ack(data: bytes) -> Registered | UpdateAck:
    """A message on a device's ack topic."""
    raw = _load(data, UpdateAck.MAX_BYTES, "ack")
    kind = _type(raw, "ack", "registered", "ack", "error")
    return Registered.from_bytes(data) if kind == "registered" else UpdateAck.from_bytes(data)


@dataclass(frozen=True)
class RoundAnnouncement:
    """A round is open (retained): who takes part, until when, with which model and settings.

    ``method`` and ``train`` are the server's config tables; a device takes the ``train`` keys
    in :data:`SERVER_TRAIN_KEYS` (:meth:`server_train`) and keeps the rest of its own."""

    round_idx: int
    deadline: float
    strategy: str
    method: Mapping[str, Any]
    train: Mapping[str, Any]
    participants: tuple[str, ...]
    model: ModelManifest
    opened_at: float = 0.0
    deadline_s: float = 0.0
    train_time_s: float | None = None
    max_length: int | None = None
    whole_max_bytes: int = 0
    eligibility: Mapping[str, Any] = field(default_factory=dict)
    budgets: Mapping[str, int] = field(default_factory=dict)
    # the global routing prior u_global(e) by expert id "layer:expert" (server.rounds.
    # routing_prior); empty before the first round closes
    prior: Mapping[str, float] = field(default_factory=dict)
    # secure aggregation (hfedmoe.secagg): the [secagg] settings and the round's fresh key
    # ("round_key", hex); empty: a plain round
    secagg: Mapping[str, Any] = field(default_factory=dict)
    MAX_BYTES: ClassVar[int] = 64 << 20

    def __post_init__(self) -> None:
        _check(manifest_hash(self.model.shards) == self.model.state_hash,
               "round announcement: model manifest hash mismatch")

    def server_train(self) -> dict[str, Any]:
        """The announced ``[train]`` settings the server decides."""
        return {k: self.train[k] for k in SERVER_TRAIN_KEYS if k in self.train}

    @cached_property
    def _participant_set(self) -> frozenset[str]:
        return frozenset(self.participants)

    def takes_part(self, device: str) -> bool:
        return device in self._participant_set

    def to_bytes(self) -> bytes:
        return _dumps({
            "type": "round", "round": self.round_idx, "deadline": self.deadline,
            "opened_at": self.opened_at, "deadline_s": self.deadline_s,
            **({"train_time_s": self.train_time_s} if self.train_time_s is not None else {}),
            "strategy": self.strategy, "method": dict(self.method), "train": dict(self.train),
            **({"max_length": self.max_length} if self.max_length is not None else {}),
            "participants": list(self.participants), "whole_max_bytes": self.whole_max_bytes,
            "eligibility": dict(self.eligibility), "budgets": dict(self.budgets),
            **({"prior": dict(self.prior)} if self.prior else {}),
            **({"secagg": dict(self.secagg)} if self.secagg else {}),
            "model": self.model.to_dict()})

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundAnnouncement:
        w = "round announcement"
        raw = _load(data, cls.MAX_BYTES, w)
        _type(raw, w, "round")
        return cls._from_raw(raw, w)

    @classmethod
    def _from_raw(cls, raw: dict[str, Any], w: str) -> RoundAnnouncement:
        participants = _list(raw, "participants", w)
        _check(all(isinstance(p, str) and len(p) <= MAX_ID_CHARS for p in participants),
               f"{w}: participants must be device ids")
        budgets = _obj(raw, "budgets", w, {})
        _check(all(type(b) is int and b >= 0 for b in budgets.values()),
               f"{w}: budgets must be integers >= 0")
        prior = _obj(raw, "prior", w, {})
        _check(all(isinstance(k, str) and _EXPERT_ID.fullmatch(k) and type(v) in (int, float)
                   and _finite(v) and 0.0 <= v <= 1.0 for k, v in prior.items()),
               f"{w}: prior must map expert ids 'layer:expert' to usage in [0, 1]")
        return cls(
            round_idx=_int(raw, "round", w), deadline=_num(raw, "deadline", w),
            strategy=_str(raw, "strategy", w), method=_obj(raw, "method", w),
            train=_obj(raw, "train", w), participants=tuple(participants),
            model=ModelManifest.from_dict(raw.get("model")),
            opened_at=_num(raw, "opened_at", w, 0.0), deadline_s=_num(raw, "deadline_s", w, 0.0),
            train_time_s=_num(raw, "train_time_s", w, None, none=True),
            max_length=_int(raw, "max_length", w, None, lo=1, none=True),
            whole_max_bytes=_int(raw, "whole_max_bytes", w, 0),
            eligibility=_obj(raw, "eligibility", w, {}), budgets=budgets,
            prior={k: float(v) for k, v in prior.items()}, secagg=_obj(raw, "secagg", w, {}))


@dataclass(frozen=True)
class Done:
    """The run is over after ``rounds`` rounds (retained on the round topic)."""

    rounds: int
    MAX_BYTES: ClassVar[int] = 4096

    def to_bytes(self) -> bytes:
        return _dumps({"type": "done", "rounds": self.rounds})

    @classmethod
    def from_bytes(cls, data: bytes) -> Done:
        raw = _load(data, cls.MAX_BYTES, "done")
        _type(raw, "done", "done")
        return cls(_int(raw, "rounds", "done"))


def decode_round(data: bytes) -> RoundAnnouncement | Done:
    """A message on the round topic."""
    raw = _load(data, RoundAnnouncement.MAX_BYTES, "round topic")
    if _type(raw, "round topic", "round", "done") == "done":
        return Done(_int(raw, "rounds", "done"))
    return RoundAnnouncement._from_raw(raw, "round announcement")


# --- ingest workers <-> server ------------------------------------------------------------------


@dataclass(frozen=True)
class IngestEvent:
    """An ingest worker accepted, rejected or took a late update (the round's progress).

    ``accepted`` carries ``nbytes``, ``usage`` (expert id -> u_c(e)) and ``disagreement``;
    ``rejected`` carries ``sha`` (empty for a rejected message) and may lack a round."""

    kind: str
    device: str
    round_idx: int | None
    sha: str = ""
    nbytes: int = 0
    usage: Mapping[str, float] = field(default_factory=dict)
    disagreement: float | None = None
    MAX_BYTES: ClassVar[int] = 1 << 20
    KINDS: ClassVar[tuple[str, ...]] = ("accepted", "late", "rejected")

    def __post_init__(self) -> None:
        _check(self.kind in self.KINDS, f"ingest event: type must be one of {self.KINDS}")
        _check(self.round_idx is not None or self.kind == "rejected",
               "ingest event: only a rejection may lack a round")
        _check(self.kind == "accepted" or (not self.nbytes and not self.usage
                                           and self.disagreement is None),
               f"ingest event: a {self.kind} event carries no bytes, usage or disagreement")
        _check(self.kind == "rejected" or not self.sha,
               f"ingest event: a {self.kind} event carries no sha")

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {"type": self.kind, "round": self.round_idx, "device": self.device}
        if self.kind == "accepted":
            body.update(bytes=self.nbytes, usage=dict(self.usage),
                        disagreement=self.disagreement)
        elif self.kind == "rejected":
            body["sha"] = self.sha
        return _dumps(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> IngestEvent:
        w = "ingest event"
        raw = _load(data, cls.MAX_BYTES, w)
        kind = _type(raw, w, *cls.KINDS)
        device = _str(raw, "device", w)
        round_idx = _int(raw, "round", w, none=kind == "rejected")
        if kind == "rejected":
            return cls(kind, device, round_idx, sha=_str(raw, "sha", w, ""))
        if kind == "late":
            return cls(kind, device, round_idx)
        usage = _obj(raw, "usage", w, {})
        _check(all(_finite(v) for v in usage.values()),
               f"{w}: usage values must be finite numbers")
        return cls(kind, device, round_idx, nbytes=_int(raw, "bytes", w, 0), usage=usage,
                   disagreement=_num(raw, "disagreement", w, None, none=True))


@dataclass(frozen=True)
class PartialNotice:
    """An ingest worker wrote its partial aggregate of a round under the run directory."""

    round_idx: int
    path: str
    sha256: str
    clients: int = 0
    MAX_BYTES: ClassVar[int] = 64 << 10

    def __post_init__(self) -> None:
        _check(bool(_HEX64.fullmatch(self.sha256)), "partial notice: sha256 must be 64 hex digits")
        _check(0 < len(self.path) <= 4096, "partial notice: path must be 1-4096 characters")

    def to_bytes(self) -> bytes:
        return _dumps({"round": self.round_idx, "path": self.path, "sha256": self.sha256,
                       "clients": self.clients})

    @classmethod
    def from_bytes(cls, data: bytes) -> PartialNotice:
        w = "partial notice"
        raw = _load(data, cls.MAX_BYTES, w)
        return cls(_int(raw, "round", w), _str(raw, "path", w, max_chars=4096),
                   _str(raw, "sha256", w), _int(raw, "clients", w, 0))


@dataclass(frozen=True)
class CloseRound:
    """The coordinator closes a round on its ingest workers: each writes its partial."""

    round_idx: int
    MAX_BYTES: ClassVar[int] = 4096

    def to_bytes(self) -> bytes:
        return _dumps({"type": "close", "round": self.round_idx})

    @classmethod
    def from_bytes(cls, data: bytes) -> CloseRound:
        raw = _load(data, cls.MAX_BYTES, "ingest control")
        _type(raw, "ingest control", "close")
        return cls(_int(raw, "round", "ingest control"))


MESSAGES = (Registration, DeviceStatus, FetchRequest, Registered, UpdateAck, RoundAnnouncement,
            Done, IngestEvent, PartialNotice, CloseRound)

__all__ = [
    "MESSAGES", "SERVER_TRAIN_KEYS", "CloseRound", "DeviceStatus", "Done", "FetchRequest",
    "IngestEvent", "ModelManifest", "PartialNotice", "Registered", "Registration",
    "RoundAnnouncement", "UpdateAck", "decode_ack", "decode_round", "manifest_hash",
]
