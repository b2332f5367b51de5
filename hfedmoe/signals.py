"""Whether the method's signals are alive: per-round summaries of what HFedMoE acts on.

HFedMoE's ingredients only matter when their inputs differ: IB ranking (Eq. 14) must sometimes
choose other experts than importance ranking (Eq. 5), usage u_c(e) (Eq. 16) must differ across
clients for tau (Eq. 17) to filter anything, and alpha(c) (Eq. 20) must differ for the gate
weighting to be more than a plain mean. :func:`round_signals` summarises one round for the
metrics row, the report and the learning study; :func:`ranking_disagreement` is what a device
computes when it selects.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from hfedmoe.names import ExpertId
from hfedmoe.selection import rank_experts


def ranking_disagreement(ib: Mapping[ExpertId, float], importance: Mapping[ExpertId, float],
                         budget: int) -> float:
    """Share of the top-``budget`` by I_b that is not in the top-``budget`` by s_b (0..1)."""
    if budget <= 0 or not ib:
        return 0.0
    a = set(rank_experts(ib)[:budget])
    b = set(rank_experts(importance)[:budget])
    return 1.0 - len(a & b) / max(len(a), 1)


def round_signals(reports: Mapping[str, Mapping[str, Any]],
                  usage: Mapping[str, Mapping[ExpertId, float]],
                  disagreement: Mapping[str, float], tau: float) -> dict[str, Any]:
    """One round's signals.

    Args:
        reports: client -> :meth:`~hfedmoe.aggregation.ClientReport.to_dict` (updated,
            aggregated, alpha).
        usage: client -> u_c(e).
        disagreement: client -> :func:`ranking_disagreement` of its selection.
        tau: the usage threshold of Eq. 17.

    Returns:
        ``usage_spread`` (mean over experts of the std of u_c(e) across clients),
        ``usage_min``/``usage_max`` (over clients and experts), ``below_tau`` (mean share of
        a client's experts with u_c(e) < tau), ``tau_removed`` (experts sent but not
        aggregated, summed over clients) and ``tau_removed_clients``, ``alpha_min``,
        ``alpha_max`` and ``alpha_cv`` (coefficient of variation), ``ib_disagreement``
        (mean over clients).
    """
    experts = sorted({e for u in usage.values() for e in u})
    spread = [statistics.pstdev([u.get(e, 0.0) for u in usage.values()]) for e in experts] \
        if len(usage) > 1 else []
    values = [v for u in usage.values() for v in u.values()]
    below = [sum(v < tau for v in u.values()) / max(len(u), 1) for u in usage.values()]
    removed = {c: len(set(r.get("updated", [])) - set(r.get("aggregated", [])))
               for c, r in reports.items()}
    alphas = [float(r.get("alpha", 0.0)) for r in reports.values()]
    mean_alpha = statistics.fmean(alphas) if alphas else 0.0
    return {
        "usage_spread": statistics.fmean(spread) if spread else 0.0,
        "usage_min": min(values, default=0.0), "usage_max": max(values, default=0.0),
        "below_tau": statistics.fmean(below) if below else 0.0,
        "tau_removed": sum(removed.values()),
        "tau_removed_clients": sum(1 for v in removed.values() if v),
        "alpha_min": min(alphas, default=0.0), "alpha_max": max(alphas, default=0.0),
        "alpha_cv": (statistics.pstdev(alphas) / mean_alpha) if len(alphas) > 1 and mean_alpha
        else 0.0,
        "ib_disagreement": statistics.fmean(disagreement.values()) if disagreement else 0.0,
    }
