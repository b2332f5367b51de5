"""The sparse update a client sends after a round: deltas of what it trained, plus statistics.

This is the value the algorithm core aggregates and the wire format encodes
(:mod:`hfedmoe.wire`). Tensor keys are canonical names (:mod:`hfedmoe.names`); only the experts a
client actually updated are present (METHOD.md section 5).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hfedmoe.names import ExpertId

_NUMBER = (int, float)
# the fields the kit writes and reads, and the JSON types each may hold on the wire
_META_TYPES: dict[str, tuple[type, ...]] = {
    "loss": _NUMBER, "steps": (int,), "stopped_by": (str,), "budget": (int,),
    "seconds": _NUMBER, "examples_processed": (int,), "selected": (int,),
    "optimizer_experts": (int,), "routing_s": _NUMBER, "runtime": (str,), "reselect": (str,),
    "ib_vs_importance": _NUMBER, "latency": (dict,), "frozen_dtype": (str,), "bucket": (int,),
    "capacity_factor": _NUMBER, "plan": (dict,), "dp_noise_std": _NUMBER, "dp_clip": _NUMBER,
    "budget_limit": (str,), "budget_reason": (str,), "predicted_step_s": _NUMBER,
    "emulated": (bool,), "bytes_down": (int,), "upload_prev": (dict,), "swarm": (bool,),
    "dp_noise_multiplier": _NUMBER, "withheld": (list,),
}
# the statistics a device may withhold (``meta.withheld``; device_agent.privacy)
WITHHOLDABLE = ("loss", "usage", "importance")
MAX_LATENCY_BYTES = 4096  # a device's timing summary the server records, at most
MAX_UPLOAD_PREV_BYTES = 512  # its previous upload's summary, at most


def _fits(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


@dataclass(frozen=True, eq=False)
class UpdateMeta(Mapping):
    """What an update says about its round besides the deltas (the wire header's ``meta``).

    The fields the kit writes and reads are typed; ``None`` means absent (and is left out of
    the header). Anything else a sender adds, and a known field whose value has the wrong
    type, is kept in ``extra`` and ignored by the kit, so :meth:`from_dict` then
    :meth:`to_dict` gives back the header's object unchanged. It reads like a mapping of the
    header's object (``meta["steps"]``, ``dict(meta)``)."""

    loss: float | None = None
    steps: int | None = None
    stopped_by: str | None = None
    budget: int | None = None
    seconds: float | None = None
    examples_processed: int | None = None
    selected: int | None = None
    optimizer_experts: int | None = None  # experts that held optimizer state
    routing_s: float | None = None
    runtime: str | None = None  # "eager" or "executorch"
    reselect: str | None = None
    ib_vs_importance: float | None = None  # ranking disagreement of the two scores
    latency: Mapping[str, Any] | None = None  # per-phase timing summary
    frozen_dtype: str | None = None
    bucket: int | None = None
    capacity_factor: float | None = None
    plan: Mapping[str, Any] | None = None  # the budget plan (limit, reason, step_seconds...)
    dp_noise_std: float | None = None
    dp_clip: float | None = None
    budget_limit: str | None = None  # what limited the budget (memory, time, ...)
    budget_reason: str | None = None
    predicted_step_s: float | None = None
    emulated: bool | None = None
    bytes_down: int | None = None
    upload_prev: Mapping[str, Any] | None = None  # the previous round's upload summary
    swarm: bool | None = None
    dp_noise_multiplier: float | None = None  # the noise the device actually applied
    withheld: list[str] | None = None  # statistics the device kept to itself (WITHHOLDABLE)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UpdateMeta:
        """A header's ``meta`` object, as received: known fields of their type, the rest in
        ``extra``."""
        known = {k: v for k, v in data.items()
                 if k in _META_TYPES and _fits(v, _META_TYPES[k])}
        return cls(**known, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for name in _META_TYPES:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def replace(self, **changes: Any) -> UpdateMeta:
        return dataclasses.replace(self, **changes)

    # -- what the server records, bounded ------------------------------------------------------
    @property
    def limit(self) -> Any:
        """What limited the budget: the plan's word, else the budget decision's."""
        return (self.plan or {}).get("limit") or self.budget_limit

    @property
    def reason(self) -> Any:
        return (self.plan or {}).get("reason") or self.budget_reason

    def recorded_latency(self) -> dict[str, Any] | None:
        """The timing summary with the previous upload, bounded in size (None: too large)."""
        if self.latency is None or len(json.dumps(self.latency)) > MAX_LATENCY_BYTES:
            return None
        prev = self.upload_prev
        if prev is not None and len(json.dumps(prev)) <= MAX_UPLOAD_PREV_BYTES:
            return {**self.latency, "upload_prev": prev}
        return dict(self.latency)

    # -- a read-only mapping of the header's object ---------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class SparseUpdate:
    """One client's update for one round.

    Attributes:
        run_id: the federated run this update belongs to.
        round_idx: the round it was trained in.
        client_id: the sending device.
        num_examples: |D_c|, the examples trained on this round (data-size weight).
        deltas: canonical key -> (trained - global) tensor; experts, gates, shared parts.
        usage: u_c(e) (Eq. 16) for every expert the client's data reached (absent: 0).
        importance: s^c(e), the mean of s_b(e) (Eq. 5) over the client's batches.
        routed: experts some token was routed to (forward).
        updated: experts that received gradients (backward), i.e. union of E_active.
        base_model_hash: hash of the global model the deltas are relative to.
        meta: what the round held (loss, steps, timings, budget); a plain mapping given
            here is read with :meth:`UpdateMeta.from_dict`.
    """

    run_id: str
    round_idx: int
    client_id: str
    num_examples: int
    deltas: Mapping[str, torch.Tensor]
    usage: Mapping[ExpertId, float] = field(default_factory=dict)
    importance: Mapping[ExpertId, float] = field(default_factory=dict)
    routed: frozenset[ExpertId] = frozenset()
    updated: frozenset[ExpertId] = frozenset()
    base_model_hash: str = ""
    meta: UpdateMeta = field(default_factory=UpdateMeta)

    def __post_init__(self) -> None:
        if not isinstance(self.meta, UpdateMeta):
            object.__setattr__(self, "meta", UpdateMeta.from_dict(self.meta))

    def withholds(self, name: str) -> bool:
        """Whether the device withheld statistic ``name`` (``"usage"``, ``"importance"``,
        ``"loss"``): an absent value then means "not said", not 0."""
        return name in (self.meta.withheld or ())

    def aggregated(self, tau: float) -> frozenset[ExpertId]:
        """Experts this client contributes to aggregation: updated and u_c(e) >= tau (Eq. 17).
        A client that withheld its usage contributes every expert it updated (it trained them
        on its data; the threshold cannot be checked)."""
        if self.withholds("usage"):
            return frozenset(self.updated)
        return frozenset(e for e in self.updated if self.usage.get(e, 0.0) >= tau)
