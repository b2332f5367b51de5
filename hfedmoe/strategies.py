"""Strategies by name: HFedMoE, its ablations and the baselines behind one interface.

A :class:`Strategy` pairs a client-side selection rule (which experts to train on a batch) with
a server-side aggregation rule, so the server, the device agent and the simulator can run any
of them side by side (METHOD.md section 7):

==================== ================================= =========================================
name                 selection (once per round)         aggregation
==================== ================================= =========================================
hfedmoe              top C_budget routed by I_b (Eq.    Eq. 17 (tau) experts, Eq. 18-21 (alpha)
                     15), or s_b if selection_key says, gates (method.gate_weighting), FedAvg
                     plus method.specificity x the      shared
                     client-specificity term
hfedmoe-importance   top C_budget routed by s_b         as hfedmoe
hfedmoe-uniform      as hfedmoe                         per-key data-size mean of what was sent
hfedmoe-paper        the paper as written: raw I_b,     as hfedmoe, tau 0.01, alpha(c) gates
                     beta 0.1, no specificity term
hfedmoe-anti         control: the bottom C_budget by    as hfedmoe
                     the same score
hfedmoe-other        control: the rule on another       as hfedmoe
                     client's data (simulator only)
budget-zero          control: no expert trains          as hfedmoe (gates and shared parts)
fedavg-full          every expert (budget ignored)      per-key data-size mean (dense: all sent)
fedavg-random        C_budget experts drawn among the   per-key data-size mean of what was sent
                     routed ones (seeded generator)
fedmoe               fixed per-client assignment (top   per-key data-size mean: an expert is
                     C_budget by routing frequency),    averaged among the clients that hold it
                     restricted to the routed experts   (modular aggregation)
==================== ================================= =========================================

"Per-key data-size mean" is FedAvg over the senders of each key, with no tau and no alpha;
``hfedmoe-uniform`` uses it so that the ablation differs from ``hfedmoe`` only in sections 5-6.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hfedmoe.aggregation import PLAIN_RULE, AggregationRule, aggregate
from hfedmoe.aggregator import Aggregator
from hfedmoe.config import MethodConfig
from hfedmoe.errors import AlgorithmError, ConfigError
from hfedmoe.importance import BatchStats
from hfedmoe.names import ExpertId
from hfedmoe.round_stats import RoundStats
from hfedmoe.selection import (
    Selection,
    fedmoe_assignment,
    select_all,
    select_experts,
    select_fixed,
    select_random,
)
from hfedmoe.update import SparseUpdate

SelectorKind = Literal["budgeted", "anti", "none", "random", "all", "fixed"]


@dataclass(frozen=True)
class Strategy:
    """One federated strategy: client-side selection plus server-side aggregation.

    Attributes:
        name: registry name.
        cfg: the method config it runs with (``cfg.strategy == name``).
        selector: "budgeted" (Eq. 15), "anti" (the bottom C_budget by the same score), "none"
            (no expert trains), "random", "all" or "fixed".
        rule: the aggregation weighting.
        description: one line for logs and ``--help``.
        other_data: the routing pass that ranks the experts reads another client's data (the
            "another client's set" control; only the simulator can give a device that).
    """

    name: str
    cfg: MethodConfig
    selector: SelectorKind
    rule: AggregationRule
    description: str = ""
    other_data: bool = False

    @property
    def uses_budget(self) -> bool:
        """False when every client trains every expert (fedavg-full)."""
        return self.selector != "all"

    @property
    def needs_assignment(self) -> bool:
        """True when the client must compute a fixed assignment once (fedmoe)."""
        return self.selector == "fixed"

    @property
    def needs_generator(self) -> bool:
        """True when selection draws random numbers (fedavg-random)."""
        return self.selector == "random"

    def select(self, stats: BatchStats | RoundStats, budget: int, *,
               generator: torch.Generator | None = None,
               assignment: Iterable[ExpertId] | None = None,
               prior: Mapping[ExpertId, float] | None = None) -> Selection:
        """Experts to train on this batch (Eq. 15 for the HFedMoE family).

        Args:
            stats: the batch's statistics.
            budget: the client's C_budget (ignored by fedavg-full).
            generator: required by fedavg-random (see
                :func:`hfedmoe.selection.selection_generator`).
            assignment: required by fedmoe (see :meth:`assign`).
            prior: the global routing prior the server announced (``method.specificity``).

        Raises:
            AlgorithmError: a required generator or assignment is missing, or a bad budget.
        """
        if self.selector in ("budgeted", "anti"):
            return select_experts(stats, budget, self.cfg, prior,
                                  reverse=self.selector == "anti")
        if self.selector == "none":
            return select_experts(stats, 0, self.cfg)
        if self.selector == "all":
            return select_all(stats)
        if self.selector == "random":
            if generator is None:
                raise AlgorithmError(f"strategy {self.name} needs a seeded generator")
            return select_random(stats, budget, generator)
        if assignment is None:
            raise AlgorithmError(f"strategy {self.name} needs the client's fixed assignment")
        return select_fixed(stats, assignment)

    def assign(self, usage: Mapping[ExpertId, float], budget: int) -> frozenset[ExpertId] | None:
        """The fixed per-client sub-model for fedmoe (top ``budget``); None otherwise.

        ``usage`` is the routing frequency of each expert on the client's data, measured
        before its first round by forward passes without training
        (:func:`device_agent.train.usage_profile`), as Mei et al. rank experts.
        The client computes it once and passes the result to every :meth:`select`.
        """
        return fedmoe_assignment(usage, budget) if self.needs_assignment else None

    def make_aggregator(self) -> Aggregator:
        """A fresh streaming :class:`~hfedmoe.aggregator.Aggregator` for one round."""
        return Aggregator(self.rule)

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[SparseUpdate]) -> dict[str, torch.Tensor]:
        """Batch aggregation of one round (same result as the streaming aggregator)."""
        return aggregate(global_state, updates, self.rule)


def _hfedmoe_rule(cfg: MethodConfig) -> AggregationRule:
    return AggregationRule("usage-threshold", cfg.gate_weighting, cfg.tau)


def _hfedmoe(cfg: MethodConfig) -> Strategy:
    return Strategy("hfedmoe", cfg, "budgeted", _hfedmoe_rule(cfg),
                    "IB-ranked budgeted selection; tau-filtered experts, importance-weighted gates")


def _hfedmoe_importance(cfg: MethodConfig) -> Strategy:
    cfg = dataclasses.replace(cfg, selection_key="importance")
    return Strategy("hfedmoe-importance", cfg, "budgeted", _hfedmoe_rule(cfg),
                    "ablation: rank by s_b (no IB term); HFedMoE aggregation")


def _hfedmoe_uniform(cfg: MethodConfig) -> Strategy:
    return Strategy("hfedmoe-uniform", cfg, "budgeted", PLAIN_RULE,
                    "ablation: HFedMoE selection; per-key data-size mean of what was sent")


def _hfedmoe_paper(cfg: MethodConfig) -> Strategy:
    cfg = dataclasses.replace(cfg, lam=0.5, beta=0.1, tau=0.01, selection_key="ib",
                              layer_scale="raw", specificity=0.0, gate_weighting="importance")
    return Strategy("hfedmoe-paper", cfg, "budgeted", _hfedmoe_rule(cfg),
                    "the paper as written: raw I_b, beta 0.1, tau 0.01, alpha(c) gate weights")


def _hfedmoe_anti(cfg: MethodConfig) -> Strategy:
    return Strategy("hfedmoe-anti", cfg, "anti", _hfedmoe_rule(cfg),
                    "control: the bottom C_budget routed experts by HFedMoE's score")


def _hfedmoe_other(cfg: MethodConfig) -> Strategy:
    return Strategy("hfedmoe-other", cfg, "budgeted", _hfedmoe_rule(cfg),
                    "control: HFedMoE's rule on another client's data (simulator only)",
                    other_data=True)


def _budget_zero(cfg: MethodConfig) -> Strategy:
    return Strategy("budget-zero", cfg, "none", _hfedmoe_rule(cfg),
                    "control: no expert trains; gates and shared parts only")


def _fedavg_full(cfg: MethodConfig) -> Strategy:
    return Strategy("fedavg-full", cfg, "all", PLAIN_RULE,
                    "baseline: every client trains every expert; dense FedAvg")


def _fedavg_random(cfg: MethodConfig) -> Strategy:
    return Strategy("fedavg-random", cfg, "random", PLAIN_RULE,
                    "baseline: C_budget random experts per batch; FedAvg of what was sent")


def _fedmoe(cfg: MethodConfig) -> Strategy:
    return Strategy("fedmoe", cfg, "fixed", PLAIN_RULE,
                    "baseline (Mei et al. 2024): fixed sub-model by usage; modular aggregation")


REGISTRY: dict[str, Callable[[MethodConfig], Strategy]] = {
    "hfedmoe": _hfedmoe,
    "hfedmoe-importance": _hfedmoe_importance,
    "hfedmoe-uniform": _hfedmoe_uniform,
    "hfedmoe-paper": _hfedmoe_paper,
    "hfedmoe-anti": _hfedmoe_anti,
    "hfedmoe-other": _hfedmoe_other,
    "budget-zero": _budget_zero,
    "fedavg-full": _fedavg_full,
    "fedavg-random": _fedavg_random,
    "fedmoe": _fedmoe,
}


def get_strategy(name: str | None = None, cfg: MethodConfig | None = None) -> Strategy:
    """The strategy ``name`` (default ``cfg.strategy``) configured with ``cfg``.

    Raises:
        ConfigError: unknown name; the message lists the valid ones.
    """
    cfg = cfg if cfg is not None else MethodConfig()
    name = name if name is not None else cfg.strategy
    factory = REGISTRY.get(name)
    if factory is None:
        raise ConfigError(f"unknown strategy {name!r}; valid: {', '.join(sorted(REGISTRY))}")
    return factory(dataclasses.replace(cfg, strategy=name))
