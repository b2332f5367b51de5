"""Bounded updates: what the server holds a device's update to besides its registered budget.

The live intake (:mod:`server.intake`) and the simulator (:mod:`lab.simulate`) call the same
functions, so both apply one policy (``[policy]`` and ``[aggregation]`` of
:class:`server.config.ServerConfig`; docs/deployment.md, "Bounded updates"):

- **a cap per device class** (:func:`expert_cap`): the most experts one update of the class
  may carry, whatever budget the device registered. A device's class is the ``platform`` its
  registration reports (:func:`device_class`); the effective limit is the smaller of the cap
  and the registered budget;
- **norm bounds** (:func:`bound_norms`): the L2 norm of the whole update and of each
  expert's deltas, an update over them refused (PolicyError) or clipped into them;
- **robust aggregation** (:func:`round_strategy`): the run's strategy with the robust option
  of ``[aggregation]`` on its rule.

Pure functions over values: no clock, file or socket.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from hfedmoe.errors import BudgetExceededError, PolicyError
from hfedmoe.robust import clip_update, norm_violations
from hfedmoe.strategies import Strategy, get_strategy
from hfedmoe.update import SparseUpdate
from server.config import PolicyConfig, ServerConfig
from server.rounds import experts_in

log = logging.getLogger("hfedmoe.server")
UNKNOWN_CLASS = "unknown"


def device_class(report: Mapping[str, Any] | None) -> str:
    """A device's class: the ``platform`` its registration reports (``jetson``, ``android``,
    ``linux``, ``macos``, ``windows``: :data:`device_agent.report.PLATFORMS`), lower-cased;
    ``"unknown"`` when it reports none. Self-reported, like the budget."""
    platform = (report or {}).get("platform")
    if isinstance(platform, str) and platform.strip():
        return platform.strip().lower()[:64]
    return UNKNOWN_CLASS


def class_cap(policy: PolicyConfig, report: Mapping[str, Any] | None) -> int:
    """The server's expert cap for the device's class (0: none)."""
    return policy.class_caps.get(device_class(report), policy.default_class_cap)


def expert_cap(policy: PolicyConfig, report: Mapping[str, Any] | None,
               budget: int) -> tuple[int, str]:
    """The most experts one update of this device may carry and what sets it: the registered
    ``budget``, or the class cap where it is smaller (``"class android cap 4"``)."""
    cap = class_cap(policy, report)
    if cap and cap < budget:
        return cap, f"the server's cap for device class {device_class(report)!r} is {cap} " \
                    f"(policy.class_caps)"
    return budget, f"the device's registered budget is {budget}"


def check_experts(policy: PolicyConfig, report: Mapping[str, Any] | None, budget: int,
                  update: SparseUpdate, uses_budget: bool = True) -> None:
    """Raise :class:`BudgetExceededError` when ``update`` carries more experts than its
    registered budget or its class cap allow (a strategy that ignores budgets, fedavg-full,
    is held to neither)."""
    if not uses_budget:
        return
    limit, why = expert_cap(policy, report, budget)
    sent = len(experts_in(update))
    if sent > limit:
        raise BudgetExceededError(f"update carries {sent} experts, {why}")


def bound_norms(policy: PolicyConfig, device: str, update: SparseUpdate,
                mode: str | None = None) -> SparseUpdate:
    """``update`` held to ``policy.max_update_norm`` and ``policy.max_expert_norm``: refused
    (PolicyError) or clipped by ``mode`` (default ``policy.on_norm_violation``). Within the
    bounds (or with both off) it is returned as is.

    Raises:
        PolicyError: over a bound and the mode is ``"reject"``; the message names what.
    """
    over = norm_violations(update, policy.max_update_norm, policy.max_expert_norm)
    if not over:
        return update
    what = "; ".join(over[:5]) + (f"; and {len(over) - 5} more" if len(over) > 5 else "")
    if (mode or policy.on_norm_violation) == "reject":
        raise PolicyError(f"update from {device} is over the policy's norm bounds: {what}")
    log.warning("%s: update clipped into the policy's norm bounds: %s", device, what)
    return clip_update(update, policy.max_update_norm, policy.max_expert_norm)


def round_strategy(cfg: ServerConfig) -> Strategy:
    """The run's strategy (``method.strategy``) with ``[aggregation]``'s robust option on its
    aggregation rule; with ``robust = "none"`` exactly :func:`hfedmoe.strategies.get_strategy`."""
    strategy = get_strategy(cfg.method.strategy, cfg.method)
    agg = cfg.aggregation
    if agg.robust == "none":
        return strategy
    rule = dataclasses.replace(strategy.rule, robust=agg.robust, trim_fraction=agg.trim_fraction,
                               robust_kinds=tuple(agg.kinds))
    return dataclasses.replace(strategy, rule=rule)
