"""The values that make a round, built once for the live coordinator and the simulator.

Pure functions over values (no clock, file or socket): which devices take part in a round
(:func:`choose_participants`), what one accepted update says about its device's round (the
participation record, :func:`participation_record`, with the experts the update trained),
how the clients' trained sets of a round overlap and what they cover
(:func:`selection_measures`), and the metrics row of a closed round (:func:`round_row`) or of
the initial evaluation (:func:`initial_row`). The coordinator
(:mod:`server.coordinator`) and the simulator (:mod:`lab.simulate`) both call them, so a live
run and a simulated one write rows with the same keys and meanings.

The open round of the live server is one value too (:class:`RoundState`): the coordinator opens
and closes it, its update intake (:mod:`server.intake`) and device registry
(:mod:`server.registry`) count into it, and :func:`round_row` reads it at close.

Rounds are numbered one way everywhere a person reads them: the evaluation of the model before
any round is "initial", and round ``round_idx`` (0-based in rows, topics and the store) is shown
as ``round_idx + 1``: the demo's console, the dashboard and the report say initial, 1, 2, 3.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from hfedmoe.aggregator import Aggregator
from hfedmoe.modelsync import ModelManifest
from hfedmoe.names import ExpertId, parse_key
from hfedmoe.privacy import privacy_report
from hfedmoe.robust import expert_norms, update_norm
from hfedmoe.signals import round_signals
from hfedmoe.update import SparseUpdate

INITIAL = "initial"
# in the participation store but not in a row's ``held``: measured on the device, so two runs
# (or the simulator's two backends) would never write the same row
TIMINGS = ("latency",)
WIRE_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element on the wire


def round_label(row_or_idx: dict[str, Any] | int) -> str:
    """How a person sees a round: ``"initial"`` for the initial evaluation (a metrics row with
    ``phase == "initial"``, or round index -1), else the 1-based round number."""
    if isinstance(row_or_idx, dict):
        if row_or_idx.get("phase") == INITIAL:
            return INITIAL
        row_or_idx = int(row_or_idx["round"])
    return INITIAL if row_or_idx < 0 else str(row_or_idx + 1)


# --- the open round ------------------------------------------------------------------------------
@dataclasses.dataclass
class RoundState:
    """The open round: who takes part, until when, on which model, and what came in so far.

    ``accepted`` maps a device to the bytes of its update; ``refused`` holds the participants
    whose update was rejected or who sat the round out (the round stops waiting for them);
    ``usage`` maps a device to its expert usage u_c(e) (for the signals); ``skipped`` maps a
    participant that sat out to its reasons.
    """

    round_idx: int
    participants: list[str]
    deadline: float  # time.time() seconds
    base_hash: str
    manifest: ModelManifest
    expected: int
    accepted: dict[str, int] = dataclasses.field(default_factory=dict)
    refused: set[str] = dataclasses.field(default_factory=set)
    rejected: int = 0
    late: int = 0
    bytes_out: int = 0
    started: float = dataclasses.field(default_factory=time.time)
    usage: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    disagreement: dict[str, float] = dataclasses.field(default_factory=dict)


class RoundHolder(Protocol):
    """Who holds the open round (the coordinator, or an ingest worker): what its intake and
    registry read. ``round`` is None between rounds; ``next_round`` is the round to open next;
    ``aggregator`` sums the open round's updates."""

    round: RoundState | None
    next_round: int
    aggregator: Aggregator


# --- participants --------------------------------------------------------------------------------
def choose_participants(online: Iterable[str], round_idx: int, *, fraction: float, seed: int,
                        over_select: float = 0.0) -> list[str]:
    """The devices of round ``round_idx``, sorted: ``ceil(fraction * n)`` of the ``n`` online
    (at least one), plus ``over_select`` of that on top (at most all), drawn with a generator
    seeded by ``(seed, round_idx)`` alone, so a resumed run draws the same devices."""
    pool = sorted(online)
    if not pool:
        return []
    n = max(1, math.ceil(fraction * len(pool)))
    n_sel = min(len(pool), math.ceil(n * (1 + over_select)))
    return sorted(random.Random(f"{seed}:{round_idx}").sample(pool, n_sel))


def updates_expected(participants: int, min_updates: int = 0, over_select: float = 0.0) -> int:
    """How many updates close a round early: ``min_updates`` (k of n) when set; with
    over-selection, the participants without the extra share; else every participant."""
    expected = min_updates or participants
    if over_select and not min_updates:
        expected = max(1, math.ceil(participants / (1 + over_select)))
    return min(expected, max(participants, 1))


# --- what an accepted update says --------------------------------------------------------------
def experts_in(update: SparseUpdate) -> frozenset[ExpertId]:
    """The experts an update carries deltas for (from its tensor keys)."""
    return frozenset(pk.expert for k in update.deltas if (pk := parse_key(k)).kind == "expert")


def expert_ids_of(update: SparseUpdate) -> tuple[str, ...]:
    """The experts an update trained, as sorted ``"layer:expert"`` ids (by layer, then expert):
    what a participation record and a row keep of the device's selection."""
    return tuple(str(e) for e in sorted(experts_in(update)))


def disagreement_of(update: SparseUpdate) -> float | None:
    """How far the device's selection ranked experts apart from importance (None: unsaid)."""
    dis = update.meta.ib_vs_importance
    return float(dis) if _is_number(dis) else None


@dataclasses.dataclass(frozen=True)
class Participation:
    """Per device and round: the budget, what was sent, what held optimizer state, and what
    the device's plan says limited it. ``optimizer_experts`` is -1 when not reported;
    ``expert_ids`` are the experts the update trained (:func:`expert_ids_of`)."""

    budget: int
    experts_sent: int
    optimizer_experts: int
    bytes: int
    expert_ids: tuple[str, ...] = ()
    steps: int | None = None
    selected: int | None = None
    limit: str | None = None
    reason: str | None = None
    stopped_by: str | None = None
    budget_limit: str | None = None
    latency: dict[str, Any] | None = None  # the device's step timings (see TIMINGS)
    dp_noise_multiplier: float | None = None  # the noise the device says it applied
    # the L2 norm of the update's deltas as accepted, and the largest of its experts' (the
    # figures policy.max_update_norm and policy.max_expert_norm bound: server.bounds)
    norm: float | None = None
    max_expert_norm: float | None = None

    def info(self) -> dict[str, Any]:
        """What the participation store keeps besides budget, experts_sent and
        optimizer_experts."""
        columns = ("budget", "experts_sent", "optimizer_experts")
        return {k: v for k, v in self.to_dict().items() if k not in columns}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``expert_ids`` as a list, as a stored record reads back)."""
        return {**dataclasses.asdict(self), "expert_ids": list(self.expert_ids)}


def participation_record(budget: int, update: SparseUpdate, nbytes: int) -> Participation:
    """The participation record of one accepted update of ``nbytes`` on the wire, from the
    device's registered ``budget`` and what the update's ``meta`` says about its round."""
    meta = update.meta
    state = meta.optimizer_experts
    ids = expert_ids_of(update)
    return Participation(
        budget=budget, experts_sent=len(ids),
        optimizer_experts=state if state is not None else -1, bytes=nbytes, expert_ids=ids,
        steps=meta.steps, selected=meta.selected, limit=meta.limit, reason=meta.reason,
        stopped_by=meta.stopped_by, budget_limit=meta.budget_limit,
        latency=meta.recorded_latency(), dp_noise_multiplier=meta.dp_noise_multiplier,
        norm=_sig(update_norm(update)),
        max_expert_norm=_sig(max(expert_norms(update).values(), default=0.0)))


def _sig(x: float) -> float:
    """``x`` to 6 significant digits (a row shows norms, it does not carry them exactly)."""
    return float(f"{x:.6g}")


def noised_updates(records: Iterable[Mapping[str, Any]], announced: float
                   ) -> dict[str, list[float]]:
    """Per device, the noise multiplier of each accepted update, from the participation
    records: what the update said it ran at; a record without it (a device that said nothing,
    or a record from before devices said it) counts at the ``announced`` noise. Updates with
    no noise are left out."""
    out: dict[str, list[float]] = {}
    for p in records:
        z = p.get("dp_noise_multiplier")
        z = float(z) if isinstance(z, (int, float)) and not isinstance(z, bool) else announced
        if z > 0:
            out.setdefault(p["client"], []).append(z)
    return out


def held_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """A participation record as a row's ``held`` shows it: without its round, device and
    timings (a stored record carries ``round`` and ``client``)."""
    return {k: v for k, v in record.items()
            if k not in ("round", "client", "dp_noise_multiplier", *TIMINGS)}


# --- what the round's clients selected -------------------------------------------------------
def selection_measures(sets: Mapping[str, Iterable[Any]], num_experts: int) -> dict[str, Any]:
    """How much the experts the clients of one round trained overlap, and what they cover.

    Over every pair of clients: the mean Jaccard overlap |A ∩ B| / |A ∪ B| and the mean overlap
    coefficient |A ∩ B| / min(|A|, |B|) (1 whenever the smaller set lies inside the larger, as
    when every client trains a prefix of one ranking). A pair of empty sets has no Jaccard
    overlap and a pair with an empty set no overlap coefficient; a mean over no pair is None
    (fewer than two clients). ``union`` counts the distinct experts any client trained;
    ``coverage`` is that over the model's ``num_experts`` (None when 0: unknown).

    Args:
        sets: client -> the experts its update trained (any hashable ids).
        num_experts: experts in the model (all layers).
    """
    named = {c: frozenset(s) for c, s in sets.items()}
    jaccard, coef = [], []
    for a, b in itertools.combinations(sorted(named), 2):
        both, either = named[a] & named[b], named[a] | named[b]
        if either:
            jaccard.append(len(both) / len(either))
        if named[a] and named[b]:
            coef.append(len(both) / min(len(named[a]), len(named[b])))
    union = len(frozenset().union(*named.values()))
    return {"clients": len(named),
            "jaccard": statistics.fmean(jaccard) if jaccard else None,
            "overlap_coef": statistics.fmean(coef) if coef else None,
            "union": union, "coverage": union / num_experts if num_experts > 0 else None}


def selected_sets(records: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Device -> the experts its update trained, from the round's participation records (a
    record stored before records carried ``expert_ids`` is left out)."""
    return {d: list(rec["expert_ids"]) for d, rec in sorted(records.items())
            if rec.get("expert_ids") is not None}


EVAL_TAIL = 5  # the last rounds always evaluated (a run's last-5 accuracy)


def evaluates(round_idx: int, rounds: int, every: int) -> bool:
    """Whether the held-out split is evaluated after round ``round_idx`` (0-based) of
    ``rounds``: every ``every``-th round and each of the last :data:`EVAL_TAIL`."""
    return every <= 1 or (round_idx + 1) % every == 0 or round_idx >= rounds - EVAL_TAIL


PRIOR_KEEP = 0.5  # the weight of the earlier prior when a round's usage is folded in


def routing_prior(prior: Mapping[ExpertId, float], usage: Mapping[str, Mapping[ExpertId, float]],
                  examples: Mapping[str, int], keep: float = PRIOR_KEEP) -> dict[ExpertId, float]:
    """The global routing prior u_global(e) after a round: the |D_c|-weighted mean of the usage
    u_c(e) (Eq. 16) the round's clients reported, folded into the earlier prior
    (``keep`` x earlier + (1 - keep) x this round, per expert; an expert no client reported
    keeps its earlier value, a new one takes this round's). The server announces it so that a
    device can rank experts by how much more its data routes to them than the clients' do
    (``method.specificity``); it is an aggregate of what updates already carry.

    Args:
        prior: the prior before the round (empty before the first).
        usage: client -> u_c(e) from its accepted update.
        examples: client -> |D_c| (a client missing here weighs 1).
        keep: in [0, 1).
    """
    sums: dict[ExpertId, float] = {}
    weights: dict[ExpertId, float] = {}
    for client, u in usage.items():
        w = float(max(examples.get(client, 1), 1))
        for e, v in u.items():
            if math.isfinite(v):
                sums[e] = sums.get(e, 0.0) + w * v
                weights[e] = weights.get(e, 0.0) + w
    out = dict(prior)
    for e, total in sums.items():
        now = total / weights[e]
        out[e] = keep * out[e] + (1 - keep) * now if e in out else now
    return out


# --- rows ----------------------------------------------------------------------------------------
def initial_row(metrics: Mapping[str, float]) -> dict[str, Any]:
    """The metrics row of the evaluation before any round."""
    return {"round": -1, "phase": INITIAL, **metrics}


def round_row(round_idx: int, *, participants: Sequence[str], accepted: Mapping[str, int],
              report: Mapping[str, Any], metrics: Mapping[str, float],
              budgets: Mapping[str, int], records: Mapping[str, Mapping[str, Any]],
              usage: Mapping[str, Mapping[ExpertId, float]],
              disagreement: Mapping[str, float], dense_bytes: int, method: Any,
              noised_updates: Mapping[str, int], aggregation_s: float, round_s: float,
              wall_s: float, num_experts: int, rejected: int = 0, late: int = 0,
              bytes_out: int = 0, skipped: Mapping[str, list[str]] | None = None
              ) -> dict[str, Any]:
    """The metrics row of a closed round.

    Args:
        round_idx: the round (0-based).
        participants: the devices chosen for it.
        accepted: device -> bytes of its accepted update (late updates not included).
        report: client -> :class:`~hfedmoe.aggregation.ClientReport` of the aggregation.
        metrics: the held-out evaluation after the round.
        budgets: device -> registered C_budget (participants' only are kept).
        records: device -> its participation record of the round (a :meth:`Participation.
            to_dict` or a stored one).
        usage, disagreement: per device, for :func:`~hfedmoe.signals.round_signals`.
        dense_bytes: what one dense (fedavg-full) update weighs on the wire.
        method: the method config (``tau``, the privacy settings).
        noised_updates: device -> its noised updates accepted so far, as a count at
            ``method``'s noise or the noise multiplier of each (for the privacy report).
        aggregation_s: seconds the aggregation took.
        round_s: the round's time (wall time live, emulated device time simulated).
        wall_s: the round's wall time on the driver.
        num_experts: experts in the model (all layers), for the round's coverage.
        rejected, late, bytes_out: the round's rejected and late updates, model bytes sent.
        skipped: participant -> why it sat the round out.
    """
    devices = {c: rep.to_dict() for c, rep in report.items()}
    row = {
        "round": round_idx, "phase": "round", "participants": len(participants),
        "accepted": len(accepted), "rejected": rejected, "late": late,
        "experts_updated": len({e for rep in report.values() for e in rep.aggregated}),
        "bytes_in": sum(accepted.values()), "bytes_out": bytes_out,
        "aggregation_s": aggregation_s, "round_s": round_s, "wall_s": wall_s, **metrics,
        "devices": devices,
        "budgets": {d: budgets[d] for d in participants if d in budgets},
        "held": {d: held_entry(records[d]) for d in sorted(records)},
        "dense_bytes": dense_bytes * len(accepted),
        "skipped": dict(skipped or {}),
        "signals": round_signals(devices, usage, disagreement, method.tau),
        "selection": selection_measures(selected_sets(records), num_experts),
    }
    # epsilon per device over the noised updates accepted (a device counts every update it
    # sent, so its own figure can only be higher)
    privacy = privacy_report(noised_updates, method)
    if privacy is not None:
        row["privacy"] = privacy
    return row


def dense_update_bytes(state: Mapping[str, Any], dtype: str) -> int:
    """Bytes of a dense (fedavg-full) update of ``state`` (name -> tensor) in the wire
    ``dtype``, uncompressed."""
    return sum(t.numel() for t in state.values()) * WIRE_WIDTH.get(dtype, 4)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
