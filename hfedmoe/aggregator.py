"""Streaming aggregation: consume one :class:`SparseUpdate` at a time, then ``finalize``.

The result equals :func:`hfedmoe.aggregation.aggregate` (up to float rounding) while peak
memory does not grow with the number of clients: per tensor key the aggregator keeps one
running weighted sum and its total weight, plus per client only a few scalars and expert-id
sets (:class:`~hfedmoe.aggregation.ClientSummary`).

Why every weight is known on arrival:

- expert keys (Eq. 17) need only ``|D_c|`` and whether the client qualifies for the expert
  (updated it and ``u_c(e) >= tau``), both in the update itself;
- gate keys (Eq. 20-21): the normalised ``alpha(c) = P(c) / sum_c' P(c')`` with the gate mass
  ``P(c) = sum_{e in S_c} u_c(e) s^c(e)``. The ``1/|S_global|`` factor of Eq. 20, which depends on
  all clients, cancels in the normalisation, so each gate delta is added with weight ``P(c)``
  and the sum divided by the senders' total ``P`` at the end. For the data-size fallback (all
  senders of a key have ``P = 0``) a second sum is kept for a gate key only until its first
  sender with ``P > 0`` arrives, then dropped;
- shared keys: ``|D_c|``.

r(c) of Eq. 18 needs S_global, so :meth:`Aggregator.report` computes it from the stored
per-client sets at the end.

A robust rule (``AggregationRule.robust`` other than ``"none"``: a coordinate-wise trimmed mean
or a norm-bounded mean per key, :mod:`hfedmoe.robust`) needs every contributor's delta of a key
at once, so the aggregator then *buffers* the round's updates (memory grows with the number of
clients) and :meth:`Aggregator.finalize` runs the batch :func:`~hfedmoe.aggregation.aggregate`
on them. A buffered aggregator merges with another buffered one but does not travel between
processes (:meth:`Aggregator.to_bytes` refuses), so sharded ingestion cannot use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hfedmoe.aggregation import (
    ALL_KINDS,
    AggregationRule,
    ClientReport,
    ClientSummary,
    KeyKind,
    acc_dtype,
    aggregate,
    build_report,
    check_against_global,
    raw_weight,
    summarize,
)
from hfedmoe.errors import AlgorithmError
from hfedmoe.names import ExpertId, parse_key
from hfedmoe.update import SparseUpdate

Tensor = torch.Tensor


@dataclass
class _KeySum:
    """Running sums of one key: primary weights and (gates only) the data-size fallback."""

    total: Tensor | None = None  # (*param_shape) sum_c w_c * delta_c
    weight: float = 0.0
    fb_total: Tensor | None = None  # (*param_shape) sum_c |D_c| * delta_c while all P(c) = 0
    fb_weight: float = 0.0


def _add_into(total: Tensor | None, w: float, delta: Tensor) -> Tensor:
    term = delta.detach().to(acc_dtype(delta)) * w  # (*param_shape)
    if total is None:
        return term
    return total.add_(term.to(device=total.device))


class Aggregator:
    """Streaming form of :func:`hfedmoe.aggregation.aggregate` (Eq. 17-21, FedAvg for shared).

    Args:
        rule: the weighting (:class:`~hfedmoe.aggregation.AggregationRule`).
        kinds: key kinds to aggregate; keys of other kinds keep their global value.
    """

    def __init__(self, rule: AggregationRule, kinds: Iterable[KeyKind] = ALL_KINDS) -> None:
        self.rule = rule
        self.kinds = frozenset(kinds)
        self._sums: dict[str, _KeySum] = {}
        self._shapes: dict[str, torch.Size] = {}
        self._summaries: dict[str, ClientSummary] = {}
        # a robust rule: the updates themselves, aggregated in one batch by finalize
        self._buffer: list[SparseUpdate] | None = [] if rule.robust != "none" else None

    @property
    def buffered(self) -> bool:
        """True when the rule is robust and the updates are kept until :meth:`finalize`."""
        return self._buffer is not None

    @property
    def num_clients(self) -> int:
        """Updates added so far."""
        return len(self._summaries)

    @property
    def summaries(self) -> Mapping[str, ClientSummary]:
        """client_id -> :class:`~hfedmoe.aggregation.ClientSummary` of every update added."""
        return dict(self._summaries)

    def add(self, update: SparseUpdate) -> None:
        """Fold one client's update into the running sums.

        Raises:
            AlgorithmError: duplicate client, inconsistent update, or a delta shaped differently
                from an earlier client's delta for the same key.
        """
        summary = self.check(update)
        if self._buffer is not None:
            self._shapes.update({k: d.shape for k, d in update.deltas.items()})
            self._buffer.append(update)
            self._summaries[update.client_id] = summary
            return
        for key in sorted(update.deltas):
            delta = update.deltas[key]
            self._shapes[key] = delta.shape
            parsed = parse_key(key)
            if parsed.kind not in self.kinds:
                continue
            slot = self._sums.setdefault(key, _KeySum())
            w, fallback = raw_weight(summary, parsed, self.rule)
            if w > 0:
                slot.total = _add_into(slot.total, w, delta)
                slot.weight += w
                slot.fb_total, slot.fb_weight = None, 0.0
            elif fallback is not None and fallback > 0 and slot.weight == 0:
                slot.fb_total = _add_into(slot.fb_total, fallback, delta)
                slot.fb_weight += fallback
        self._summaries[update.client_id] = summary

    def check(self, update: SparseUpdate) -> ClientSummary:
        """Raise what :meth:`add` would raise for ``update``, changing nothing (so a caller
        can keep an update durably before folding it in); returns its summary."""
        if update.client_id in self._summaries:
            raise AlgorithmError(f"two updates from client {update.client_id!r}")
        summary = summarize(update, self.rule.tau)
        for key, delta in update.deltas.items():
            known = self._shapes.get(key)
            if known is not None and known != delta.shape:
                raise AlgorithmError(f"{key}: client {update.client_id} sent shape "
                                     f"{tuple(delta.shape)}, earlier clients {tuple(known)}")
        return summary

    def finalize(self, global_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The new global state: ``global[key] + sum_c w_c delta_c[key] / sum_c w_c`` per key.

        Keys nobody qualified for hold the very same tensors as ``global_state``. The
        aggregator's sums are not modified, so ``finalize`` may be called again.

        Raises:
            AlgorithmError: a sent key is missing from ``global_state`` or shaped differently.
        """
        for key, shape in self._shapes.items():
            check_against_global(key, shape, global_state)
        if self._buffer is not None:
            return aggregate(global_state, self._buffer, self.rule, self.kinds)
        new_state = dict(global_state)
        for key, slot in self._sums.items():
            if slot.weight > 0 and slot.total is not None:
                total, weight = slot.total, slot.weight
            elif slot.fb_weight > 0 and slot.fb_total is not None:
                total, weight = slot.fb_total, slot.fb_weight
            else:
                continue
            ref = global_state[key]
            acc = ref.detach().to(acc_dtype(ref))  # (*param_shape)
            mean_delta = total.to(device=acc.device, dtype=acc.dtype) / weight  # (*param_shape)
            new_state[key] = (acc + mean_delta).to(ref.dtype)
        return new_state

    def report(self) -> dict[str, ClientReport]:
        """Per-client routed / updated / aggregated sets, r(c) (Eq. 18) and alpha(c) (Eq. 20)."""
        return build_report(self._summaries.values())

    # --- partial aggregates (sharded ingestion) ---------------------------------------------
    def merge(self, other: Aggregator) -> None:
        """Fold in another aggregator's sums over *other* clients: the running sums are
        associative, so aggregating disjoint shards and merging equals aggregating everything
        in one place (up to float rounding). The data-size fallback of a gate key survives only
        while no shard has a sender with ``P > 0`` for it, as in :meth:`add`.

        Raises:
            AlgorithmError: a client in both, or a key shaped differently.
        """
        both = set(self._summaries) & set(other._summaries)
        if both:
            raise AlgorithmError(f"clients in two partial aggregates: {sorted(both)[:5]}")
        for key, shape in other._shapes.items():
            known = self._shapes.get(key)
            if known is not None and known != shape:
                raise AlgorithmError(f"{key}: partial aggregates disagree on the shape "
                                     f"({tuple(known)} vs {tuple(shape)})")
        if self.buffered != other.buffered:
            raise AlgorithmError("cannot merge a buffered (robust) aggregator with a summing one")
        self._shapes.update(other._shapes)
        if self._buffer is not None and other._buffer is not None:
            self._buffer.extend(other._buffer)
        for key, theirs in other._sums.items():
            slot = self._sums.setdefault(key, _KeySum())
            if theirs.weight > 0 and theirs.total is not None:
                slot.total = _add_into(slot.total, 1.0, theirs.total)
                slot.weight += theirs.weight
                slot.fb_total, slot.fb_weight = None, 0.0
            elif slot.weight == 0 and theirs.fb_weight > 0 and theirs.fb_total is not None:
                slot.fb_total = _add_into(slot.fb_total, 1.0, theirs.fb_total)
                slot.fb_weight += theirs.fb_weight
        self._summaries.update(other._summaries)

    def to_bytes(self) -> bytes:
        """The running sums and client summaries as safetensors (no pickle), for
        :meth:`from_bytes` in another process."""
        from safetensors.torch import save

        if self._buffer is not None:
            raise AlgorithmError(f"a robust aggregator ({self.rule.robust}) buffers whole "
                                 f"updates and is not written as a partial aggregate")
        tensors: dict[str, Tensor] = {}
        sums = {}
        for key, slot in self._sums.items():
            if slot.total is not None:
                tensors[f"total/{key}"] = slot.total.detach().cpu().contiguous()
            if slot.fb_total is not None:
                tensors[f"fb/{key}"] = slot.fb_total.detach().cpu().contiguous()
            sums[key] = [slot.weight, slot.fb_weight]
        meta = {"sums": sums, "shapes": {k: list(v) for k, v in self._shapes.items()},
                "clients": [_summary_dict(c) for c in self._summaries.values()]}
        return save(tensors, metadata={"hfedmoe_partial": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes, rule: AggregationRule,
                   kinds: Iterable[KeyKind] = ALL_KINDS) -> Aggregator:
        """An aggregator holding the sums :meth:`to_bytes` wrote.

        Raises:
            AlgorithmError: not a partial aggregate of this format.
        """
        from safetensors.torch import load

        try:
            n = int.from_bytes(data[:8], "little")
            meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["hfedmoe_partial"])
            tensors = load(data)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise AlgorithmError(f"not a partial aggregate: {exc}") from exc
        agg = cls(rule, kinds)
        agg._shapes = {k: torch.Size(v) for k, v in meta["shapes"].items()}
        for key, (weight, fb_weight) in meta["sums"].items():
            agg._sums[key] = _KeySum(tensors.get(f"total/{key}"), float(weight),
                                     tensors.get(f"fb/{key}"), float(fb_weight))
        for c in meta["clients"]:
            summary = _summary_from(c)
            agg._summaries[summary.client_id] = summary
        return agg


def _summary_dict(c: ClientSummary) -> dict[str, Any]:
    return {"client_id": c.client_id, "num_examples": c.num_examples,
            "routed": sorted(map(str, c.routed)), "updated": sorted(map(str, c.updated)),
            "aggregated": sorted(map(str, c.aggregated)),
            "usage_set": sorted(map(str, c.usage_set)), "gate_mass": c.gate_mass}


def _summary_from(d: dict[str, Any]) -> ClientSummary:
    ids = {k: frozenset(ExpertId.parse(x) for x in d[k])
           for k in ("routed", "updated", "aggregated", "usage_set")}
    return ClientSummary(client_id=str(d["client_id"]), num_examples=int(d["num_examples"]),
                         gate_mass=float(d["gate_mass"]), **ids)
