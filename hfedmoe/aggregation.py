"""Sparsity-aware aggregation of experts (Eq. 16-17) and importance-weighted gates (Eq. 18-21).

Everything works on *deltas* and normalises weights *per tensor key*::

    new_global[key] = global[key] + sum_c w_c(key) * delta_c[key],   sum_c w_c(key) = 1

over the clients that sent ``key`` and qualify for it. A key missing from an update means "not
trained here", never a zero delta; a key nobody qualifies for keeps its previous global tensor
(the same object, bit-identical). Per key kind:

- **expert** ``layers.l.experts.e.*`` (Eq. 17 + Decision): clients that updated e *and* have
  ``u_c(e) >= tau``, weights ``|D_c|`` renormalised per expert.
- **gate** ``layers.l.gate.*`` (Eq. 18-21): ``p_c(e) = u_c(e) s^c(e)`` for e in S_c (Eq. 19),
  ``alpha(c) = sum_{e in S_c} p_c(e) / |S_global|`` (Eq. 20), normalised to sum to 1 over the
  clients that sent the key (documented deviation: the paper's alpha does not sum to 1, which
  would rescale the gate). The ``1/|S_global|`` factor cancels in that normalisation, so the
  weight used is the *gate mass* ``P(c) = sum_{e in S_c} p_c(e)``; this is what lets the
  streaming :class:`~hfedmoe.aggregator.Aggregator` weight each gate delta on arrival. When every
  sender of a gate key has ``P(c) = 0`` the key falls back to data-size weights.
  r(c) of Eq. 18 does not enter alpha; it is computed for logging (:func:`round_report`).
- **shared** ``shared.*``: data-size FedAvg over the senders.

With ``AggregationRule.robust`` set, each key of the chosen kinds is aggregated over the same
qualifying senders by a coordinate-wise trimmed mean or a norm-bounded mean instead
(:mod:`hfedmoe.robust`); the streaming aggregator then buffers the round's updates.

An :class:`AggregationRule` with ``"data-size"`` weighting instead averages every key over its
senders by ``|D_c|`` (no tau, no alpha): the baselines' plain averaging of what was sent.
Sums run in float64 for float64 globals and in float32 otherwise; the result takes the global
tensor's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from hfedmoe.errors import AlgorithmError
from hfedmoe.names import ExpertId, ParamKey, parse_key
from hfedmoe.robust import Robust, check_robust, robust_mean
from hfedmoe.update import SparseUpdate

Tensor = torch.Tensor
KeyKind = Literal["expert", "gate", "shared"]
ALL_KINDS: tuple[KeyKind, ...] = ("expert", "gate", "shared")


@dataclass(frozen=True)
class AggregationRule:
    """How per-key weights are formed.

    Attributes:
        expert_weighting: "usage-threshold" (Eq. 17) or "data-size" (all senders, by |D_c|).
        gate_weighting: "importance" (Eq. 18-21, normalised), "importance-size" (alpha(c) x
            |D_c|, normalised) or "data-size".
        tau: usage threshold of Eq. 16-18.
        robust: ``"none"`` (the weighted means above), ``"trimmed-mean"`` or
            ``"norm-bounded"`` (:mod:`hfedmoe.robust`), per key over the same qualifying
            senders, for the key kinds in ``robust_kinds``.
        trim_fraction: ``"trimmed-mean"``: the share of contributors dropped at each end.
        robust_kinds: the key kinds the robust option applies to (the others keep the
            weighted mean).
    """

    expert_weighting: Literal["usage-threshold", "data-size"] = "usage-threshold"
    gate_weighting: Literal["importance", "importance-size", "data-size"] = "importance"
    tau: float = 0.01
    robust: Robust = "none"
    trim_fraction: float = 0.1
    robust_kinds: tuple[KeyKind, ...] = ALL_KINDS

    def __post_init__(self) -> None:
        check_robust(self.robust, self.trim_fraction)
        if not set(self.robust_kinds) <= set(ALL_KINDS):
            raise AlgorithmError(f"robust_kinds must be among {ALL_KINDS}, got "
                                 f"{self.robust_kinds}")
        if self.expert_weighting not in ("usage-threshold", "data-size"):
            raise AlgorithmError(f"unknown expert_weighting {self.expert_weighting!r}")
        if self.gate_weighting not in ("importance", "importance-size", "data-size"):
            raise AlgorithmError(f"unknown gate_weighting {self.gate_weighting!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise AlgorithmError(f"tau must be in [0, 1], got {self.tau}")


PLAIN_RULE = AggregationRule("data-size", "data-size", 0.0)


@dataclass(frozen=True)
class ClientSummary:
    """The per-client scalars and sets aggregation needs (small; no tensors)."""

    client_id: str
    num_examples: int
    routed: frozenset[ExpertId]
    updated: frozenset[ExpertId]
    aggregated: frozenset[ExpertId]  # updated and u_c(e) >= tau (Eq. 17)
    usage_set: frozenset[ExpertId]  # S_c of Eq. 18
    gate_mass: float  # P(c) = sum_{e in S_c} u_c(e) s^c(e)  (Eq. 19-20 numerator)


def usage_set(update: SparseUpdate, tau: float) -> frozenset[ExpertId]:
    """S_c of Eq. 18: ``{e : u_c(e) >= tau}`` over the experts the update reports usage for
    (a client that withheld its usage: the experts it updated)."""
    if update.withholds("usage"):
        return frozenset(update.updated)
    return frozenset(e for e, u in update.usage.items() if u >= tau)


def gate_mass(update: SparseUpdate, tau: float) -> float:
    """``P(c) = sum_{e in S_c} p_c(e)`` with ``p_c(e) = u_c(e) * s^c(e)`` (Eq. 19-20 numerator).

    ``s^c(e)`` missing from ``update.importance`` counts as 0. A client that withheld its usage
    or its importance has no gate mass: it does not steer the importance-weighted gates (its
    gate deltas count only where no sender of the key has gate mass, through the data-size
    fallback); its experts still aggregate by data size.
    """
    if update.withholds("usage") or update.withholds("importance"):
        return 0.0
    return float(sum(update.usage[e] * update.importance.get(e, 0.0)
                     for e in sorted(usage_set(update, tau))))


def summarize(update: SparseUpdate, tau: float) -> ClientSummary:
    """Validate ``update`` and reduce it to its :class:`ClientSummary`.

    Raises:
        AlgorithmError: ``num_examples < 1``, a non-float delta, or a delta for an expert that is
            not in ``update.updated``.
        ModelError: a delta key is not a canonical parameter name.
    """
    if update.num_examples < 1:
        raise AlgorithmError(f"client {update.client_id}: num_examples must be >= 1, "
                             f"got {update.num_examples}")
    for key, delta in update.deltas.items():
        parsed = parse_key(key)
        if not delta.is_floating_point():
            raise AlgorithmError(f"client {update.client_id}: delta {key} is {delta.dtype}")
        if parsed.expert is not None and parsed.expert not in update.updated:
            raise AlgorithmError(f"client {update.client_id}: sent {key} but expert "
                                 f"{parsed.expert} is not in its updated set")
    return ClientSummary(client_id=update.client_id, num_examples=update.num_examples,
                         routed=frozenset(update.routed), updated=frozenset(update.updated),
                         aggregated=update.aggregated(tau), usage_set=usage_set(update, tau),
                         gate_mass=gate_mass(update, tau))


def raw_weight(summary: ClientSummary, parsed: ParamKey,
               rule: AggregationRule) -> tuple[float, float | None]:
    """Unnormalised weight of one client for one key: ``(primary, fallback)``.

    ``fallback`` is the data-size weight used when every sender's primary weight is 0; it is
    ``None`` for keys without a fallback (a zero primary weight then means "does not qualify").
    """
    size = float(summary.num_examples)
    if parsed.kind == "expert" and rule.expert_weighting == "usage-threshold":
        return (size if parsed.expert in summary.aggregated else 0.0), None
    if parsed.kind == "gate" and rule.gate_weighting == "importance":
        return summary.gate_mass, size
    if parsed.kind == "gate" and rule.gate_weighting == "importance-size":
        return summary.gate_mass * size, size
    return size, None


def _normalise(pairs: Sequence[tuple[str, float, float | None]]) -> dict[str, float]:
    total = sum(w for _, w, _ in pairs)
    if total > 0:
        return {c: w / total for c, w, _ in pairs if w > 0}
    fallback = [(c, fb) for c, _, fb in pairs if fb is not None and fb > 0]
    total_fb = sum(fb for _, fb in fallback)
    return {c: fb / total_fb for c, fb in fallback} if total_fb > 0 else {}


def _summaries(updates: Sequence[SparseUpdate], tau: float) -> dict[str, ClientSummary]:
    out: dict[str, ClientSummary] = {}
    for update in updates:
        if update.client_id in out:
            raise AlgorithmError(f"two updates from client {update.client_id!r}")
        out[update.client_id] = summarize(update, tau)
    return out


def key_weights(updates: Sequence[SparseUpdate], rule: AggregationRule,
                kinds: Iterable[KeyKind] = ALL_KINDS) -> dict[str, dict[str, float]]:
    """Normalised per-key weights ``key -> {client_id: w_c(key)}`` (Eq. 17 and Eq. 20-21).

    Only qualifying senders appear; each inner mapping sums to 1. A key nobody qualifies for
    is absent (it keeps its global value).
    """
    kinds = frozenset(kinds)
    summaries = _summaries(updates, rule.tau)
    pairs: dict[str, list[tuple[str, float, float | None]]] = {}
    for update in updates:
        for key in update.deltas:
            parsed = parse_key(key)
            if parsed.kind in kinds:
                w, fb = raw_weight(summaries[update.client_id], parsed, rule)
                pairs.setdefault(key, []).append((update.client_id, w, fb))
    out = {key: _normalise(p) for key, p in sorted(pairs.items())}
    return {key: w for key, w in out.items() if w}


def expert_weights(updates: Sequence[SparseUpdate], tau: float) -> dict[ExpertId, dict[str, float]]:
    """Eq. 17 per expert: ``w_c(e) = |D_c| 1[u_c(e) >= tau] / sum_j |D_j| 1[u_j(e) >= tau]`` over
    the clients that updated e (Decision). Experts nobody qualifies for are absent."""
    summaries = _summaries(updates, tau)
    experts = sorted(set().union(*(s.aggregated for s in summaries.values())))
    out: dict[ExpertId, dict[str, float]] = {}
    for e in experts:
        sizes = {c: float(s.num_examples) for c, s in summaries.items() if e in s.aggregated}
        total = sum(sizes.values())
        out[e] = {c: n / total for c, n in sizes.items()}
    return out


def overlap_ratios(summaries: Iterable[ClientSummary]) -> dict[str, float]:
    """Eq. 18: ``r(c) = |S_c ∩ S_global| / |S_global|`` (0 for all when S_global is empty)."""
    summaries = list(summaries)
    s_global = frozenset().union(*(s.usage_set for s in summaries))
    if not s_global:
        return {s.client_id: 0.0 for s in summaries}
    return {s.client_id: len(s.usage_set & s_global) / len(s_global) for s in summaries}


def gate_alphas(summaries: Iterable[ClientSummary]) -> dict[str, float]:
    """Eq. 20, normalised over the participating clients (documented deviation).

    ``alpha(c) = P(c) / sum_c' P(c')``; the paper's ``1/|S_global|`` cancels. When every P(c)
    is 0 the weights fall back to data size ``|D_c| / sum |D_c'|``.
    """
    pairs = [(s.client_id, s.gate_mass, float(s.num_examples)) for s in summaries]
    norm = _normalise(pairs)
    return {c: norm.get(c, 0.0) for c, _, _ in pairs}


@dataclass(frozen=True)
class ClientReport:
    """What one client contributed to the round, for logging."""

    client_id: str
    num_examples: int
    routed: frozenset[ExpertId]
    updated: frozenset[ExpertId]
    aggregated: frozenset[ExpertId]
    overlap_ratio: float  # r(c), Eq. 18
    alpha: float  # normalised alpha(c), Eq. 20

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (expert ids as "layer:expert") for metrics and reports."""
        return {"routed": sorted(map(str, self.routed)), "updated": sorted(map(str, self.updated)),
                "aggregated": sorted(map(str, self.aggregated)), "alpha": self.alpha,
                "overlap": self.overlap_ratio}


def build_report(summaries: Iterable[ClientSummary]) -> dict[str, ClientReport]:
    """Per-client :class:`ClientReport` from the summaries (Eq. 18 and Eq. 20)."""
    summaries = list(summaries)
    ratios, alphas = overlap_ratios(summaries), gate_alphas(summaries)
    return {s.client_id: ClientReport(s.client_id, s.num_examples, s.routed, s.updated,
                                      s.aggregated, ratios[s.client_id], alphas[s.client_id])
            for s in summaries}


def round_report(updates: Sequence[SparseUpdate], tau: float) -> dict[str, ClientReport]:
    """Per-client routed / updated / aggregated sets, r(c) (Eq. 18) and alpha(c) (Eq. 20)."""
    return build_report(_summaries(updates, tau).values())


def acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_against_global(key: str, shape: torch.Size, global_state: Mapping[str, Tensor]) -> Tensor:
    """The global tensor for ``key``; raise :class:`AlgorithmError` if absent or shaped differently."""
    if key not in global_state:
        raise AlgorithmError(f"update key {key} is not in the global state")
    ref = global_state[key]
    if ref.shape != shape:
        raise AlgorithmError(f"{key}: delta shape {tuple(shape)} != global {tuple(ref.shape)}")
    return ref


def aggregate(global_state: Mapping[str, Tensor], updates: Sequence[SparseUpdate],
              rule: AggregationRule, kinds: Iterable[KeyKind] = ALL_KINDS) -> dict[str, Tensor]:
    """Batch aggregation of a round (Eq. 17 for experts, Eq. 21 for gates, FedAvg for shared).

    Args:
        global_state: canonical key -> current global tensor.
        updates: one :class:`SparseUpdate` per client, deltas relative to ``global_state``.
        rule: the weighting (:class:`AggregationRule`).
        kinds: which key kinds to aggregate; others keep their global value.

    Returns:
        A new state dict; keys nobody qualified for hold the very same tensors as before.

    Raises:
        AlgorithmError: unknown key, shape mismatch, duplicate client, inconsistent update.
    """
    weights = key_weights(updates, rule, kinds)
    by_client = {u.client_id: u for u in updates}
    for update in updates:
        for key, delta in update.deltas.items():
            check_against_global(key, delta.shape, global_state)
    new_state = dict(global_state)
    for key, client_weights in weights.items():
        ref = global_state[key]
        acc = ref.detach().to(acc_dtype(ref)).clone()  # (*param_shape)
        if rule.robust != "none" and parse_key(key).kind in rule.robust_kinds:
            clients = list(client_weights)
            mean = robust_mean(rule.robust, [by_client[c].deltas[key] for c in clients],
                               [client_weights[c] for c in clients], rule.trim_fraction)
            acc += mean.to(device=acc.device, dtype=acc.dtype)  # (*param_shape)
        else:
            for client_id, w in client_weights.items():
                delta = by_client[client_id].deltas[key].detach()  # (*param_shape)
                acc += w * delta.to(device=acc.device, dtype=acc.dtype)
        new_state[key] = acc.to(ref.dtype)
    return new_state


def aggregate_experts(global_state: Mapping[str, Tensor], updates: Sequence[SparseUpdate],
                      tau: float) -> dict[str, Tensor]:
    """Expert keys only, Eq. 17 with the usage threshold ``tau``; gates and shared unchanged."""
    return aggregate(global_state, updates, AggregationRule(tau=tau), kinds=("expert",))


def aggregate_gates(global_state: Mapping[str, Tensor], updates: Sequence[SparseUpdate],
                    tau: float) -> dict[str, Tensor]:
    """Gate keys only, Eq. 18-21 (alpha normalised); experts and shared unchanged."""
    return aggregate(global_state, updates, AggregationRule(tau=tau), kinds=("gate",))


def aggregate_shared(global_state: Mapping[str, Tensor],
                     updates: Sequence[SparseUpdate]) -> dict[str, Tensor]:
    """``shared.*`` keys only, data-size FedAvg over the senders; experts and gates unchanged."""
    return aggregate(global_state, updates, PLAIN_RULE, kinds=("shared",))
