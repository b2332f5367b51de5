"""The device's own privacy: its floor under the server's DP settings, its epsilon ledger, and
what its updates say about its data besides the deltas.

The round announcement carries the server's ``method.dp_*`` settings. A device does not take
them on trust: with a ``[privacy]`` section in its config it applies, each round, the stricter
of its own and the server's settings (:meth:`DevicePrivacy.settings`):

- noise multiplier: the larger of ``min_noise_multiplier`` and the server's;
- clip bound: the smaller of ``max_clip`` and the server's (a 0 on either side: no bound from
  that side); noise with no clip bound from either side cannot be scaled, so the device
  refuses the round (:class:`~hfedmoe.errors.PrivacyRefused`, reason ``"no-clip-bound"``);
- epsilon budget: the smaller of ``max_epsilon`` and the server's ``dp_max_epsilon`` (0: none
  on that side), at the smaller delta.

Its epsilon is accounted from what it actually sent: every noised update is a row of
:class:`PrivacyLedger` (a SQLite file in the agent's directory) with that round's noise
multiplier and sampling probability, and epsilon is dp-accounting's RDP accountant over those
rows (:func:`hfedmoe.privacy.epsilon_of_rounds`), so it survives restarts and rounds run at
different noise are each counted at their own. A round whose update would pass the budget is
refused (reason ``"epsilon-budget"``) before anything is trained.

Metadata (:meth:`DevicePrivacy.release`): the loss, per-expert usage and per-expert importance
each leave the device as ``privacy.loss`` / ``privacy.usage`` / ``privacy.importance`` say:

- ``"exact"``: as computed;
- ``"noised"``: plus Gaussian noise from the OS's randomness (``random.SystemRandom``): std
  ``loss_noise`` on the loss; std ``stat_noise`` on every usage and importance value, which is
  then clamped to [0, 1] (usage: a layer whose values then sum over 1 is scaled to sum 1);
- ``"coarsened"``: the loss rounded to the nearest multiple of ``loss_step``; usage and
  importance values rounded *down* to a multiple of ``stat_step`` (down, so a layer's usage
  still sums to at most 1);
- ``"withheld"``: not sent; the update's ``meta.withheld`` names it and the server aggregates
  without it (:mod:`hfedmoe.aggregation`: withheld usage -> every updated expert counts, by
  data size; withheld usage or importance -> no weight in the importance-weighted gates).

Noised and coarsened metadata lower what the values reveal but are not part of the epsilon
accounting, which covers the deltas only. Whenever usage is not ``"exact"`` the routed set is
sent as the updated set (which the deltas reveal anyway), and the IB-vs-importance
disagreement is sent only when importance is ``"exact"``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hfedmoe.config import MethodConfig
from hfedmoe.errors import ConfigError, PrivacyRefused
from hfedmoe.names import ExpertId
from hfedmoe.privacy import epsilon_of_rounds
from hfedmoe.update import SparseUpdate

Release = Literal["exact", "noised", "coarsened", "withheld"]
RELEASES: tuple[str, ...] = ("exact", "noised", "coarsened", "withheld")
SAMPLING = 1.0  # the server picks participants and knows who took part: no amplification


@dataclass(frozen=True)
class DevicePrivacyConfig:
    """The agent's ``[privacy]`` section: its floor under the server's DP settings and how its
    metadata leaves it (module docstring).

    Attributes:
        min_noise_multiplier: the least noise multiplier the device sends with (0: the
            server's).
        max_clip: the largest L2 clip bound it accepts (0: the server's).
        max_epsilon: its epsilon budget over all its noised updates (0: the server's, if any).
        delta: the largest delta it accounts at (the smaller of it and the server's is used).
        loss, usage, importance: ``"exact"``, ``"noised"``, ``"coarsened"`` or ``"withheld"``.
        loss_noise: std of the noise on a noised loss.
        stat_noise: std of the noise on each noised usage or importance value.
        loss_step: a coarsened loss is rounded to a multiple of this.
        stat_step: coarsened usage and importance are rounded down to a multiple of this.
        min_secagg_contributors: 0: any round; k >= 2: only securely aggregated rounds
            (docs/security.md) whose contributor threshold is at least k; any other round is
            refused (``"no-secagg"``, ``"secagg-k"``) before training.
    """

    min_noise_multiplier: float = 0.0
    max_clip: float = 0.0
    max_epsilon: float = 0.0
    delta: float = 1e-5
    loss: Release = "exact"
    usage: Release = "exact"
    importance: Release = "exact"
    loss_noise: float = 0.1
    stat_noise: float = 0.02
    loss_step: float = 0.5
    stat_step: float = 0.1
    min_secagg_contributors: int = 0

    def __post_init__(self) -> None:
        if min(self.min_noise_multiplier, self.max_clip, self.max_epsilon) < 0:
            raise ConfigError("privacy.min_noise_multiplier, max_clip and max_epsilon must "
                              "be >= 0")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")
        for name in ("loss", "usage", "importance"):
            if getattr(self, name) not in RELEASES:
                raise ConfigError(f"privacy.{name} must be one of {RELEASES}, got "
                                  f"{getattr(self, name)!r}")
        if min(self.loss_noise, self.stat_noise) < 0 or min(self.loss_step,
                                                           self.stat_step) <= 0:
            raise ConfigError("privacy.loss_noise and stat_noise must be >= 0, loss_step and "
                              "stat_step > 0")
        if self.min_secagg_contributors < 0 or self.min_secagg_contributors == 1:
            raise ConfigError("privacy.min_secagg_contributors must be 0 (any round) or >= 2")


class PrivacyLedger:
    """The noised updates this device has sent: one row each, with the noise multiplier,
    clip bound and sampling probability it ran at, in ``<dir>/privacy.sqlite`` (committed
    before the update leaves; ``":memory:"`` for tests)."""

    def __init__(self, path: str | Path) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("CREATE TABLE IF NOT EXISTS releases (id INTEGER PRIMARY KEY "
                        "AUTOINCREMENT, round INTEGER NOT NULL, noise REAL NOT NULL, clip REAL "
                        "NOT NULL, sampling REAL NOT NULL, at REAL NOT NULL)")

    def record(self, round_idx: int, noise: float, clip: float,
               sampling: float = SAMPLING) -> None:
        self.db.execute("INSERT INTO releases (round, noise, clip, sampling, at) VALUES "
                        "(?, ?, ?, ?, ?)", (round_idx, noise, clip, sampling, time.time()))

    def rounds(self) -> list[tuple[float, float]]:
        """``(noise_multiplier, sampling)`` of every noised update sent, oldest first."""
        return [(float(z), float(q)) for z, q in
                self.db.execute("SELECT noise, sampling FROM releases ORDER BY id")]

    def epsilon(self, delta: float) -> float:
        return epsilon_of_rounds(self.rounds(), delta)

    def close(self) -> None:
        self.db.close()


@dataclass
class LegacyCount:
    """Noised updates an agent counted before it kept a ledger (``dp_rounds`` in its state
    file), and what to call once they are in the ledger (drop the count, save the state)."""

    count: int
    done: Callable[[], None]


class DevicePrivacy:
    """A device's privacy settings applied to a round's method and to its update."""

    def __init__(self, cfg: DevicePrivacyConfig, ledger: PrivacyLedger,
                 legacy: LegacyCount | None = None) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.legacy = legacy
        self.rng = random.SystemRandom()  # the OS's CSPRNG: nobody can regenerate the noise

    def settings(self, method: MethodConfig) -> MethodConfig:
        """``method`` with the stricter of the server's and the device's DP settings.

        Raises:
            PrivacyRefused: noise is demanded but no clip bound is set on either side, or the
                device has an epsilon budget and the round would send without noise.
        """
        own = self.cfg
        noise = max(method.dp_noise_multiplier, own.min_noise_multiplier)
        clips = [c for c in (method.dp_clip, own.max_clip) if c > 0]
        clip = min(clips, default=0.0)
        budgets = [e for e in (method.dp_max_epsilon, own.max_epsilon) if e > 0]
        if noise > 0 and clip == 0:
            raise PrivacyRefused("no-clip-bound", f"noise multiplier {noise:g} needs a clip "
                                 "bound: neither the round nor privacy.max_clip sets one")
        if budgets and noise == 0:
            raise PrivacyRefused("no-noise", f"an epsilon budget of {min(budgets):g} needs "
                                 "noise: set privacy.min_noise_multiplier")
        return dataclasses.replace(
            method, dp_clip=clip, dp_noise_multiplier=noise,
            dp_delta=min(method.dp_delta, own.delta), dp_max_epsilon=min(budgets, default=0.0))

    def admit_secagg(self, secagg: Mapping[str, object]) -> None:
        """Refuse a round that is not securely aggregated with at least this device's
        ``min_secagg_contributors`` (the announcement's ``secagg`` table; empty: a plain round).

        Raises:
            PrivacyRefused: ``"no-secagg"`` or ``"secagg-k"``.
        """
        floor = self.cfg.min_secagg_contributors
        if floor <= 0:
            return
        if not secagg:
            raise PrivacyRefused("no-secagg", f"the round is not securely aggregated and "
                                 f"privacy.min_secagg_contributors = {floor}")
        k = secagg.get("min_contributors")
        if type(k) is not int or k < floor:
            raise PrivacyRefused("secagg-k", f"the round reveals sums of {k!r} contributors, "
                                 f"fewer than privacy.min_secagg_contributors = {floor}")

    def admit(self, method: MethodConfig) -> MethodConfig:
        """The round's settings (:meth:`settings`) when one more update at them keeps this
        device within its epsilon budget.

        Raises:
            PrivacyRefused: as :meth:`settings`, or ``"epsilon-budget"``.
        """
        chosen = self.settings(method)
        if chosen.dp_noise_multiplier <= 0:
            return chosen
        self._migrate(chosen)
        if chosen.dp_max_epsilon <= 0:
            return chosen
        spent = self.ledger.rounds()
        after = epsilon_of_rounds([*spent, (chosen.dp_noise_multiplier, SAMPLING)],
                                  chosen.dp_delta)
        if after > chosen.dp_max_epsilon:
            raise PrivacyRefused(
                "epsilon-budget", f"{len(spent)} noised updates spent epsilon "
                f"{epsilon_of_rounds(spent, chosen.dp_delta):.3f} at delta "
                f"{chosen.dp_delta:g}; one more at noise {chosen.dp_noise_multiplier:g} "
                f"would reach {after:.3f} > {chosen.dp_max_epsilon:g}")
        return chosen

    def _migrate(self, chosen: MethodConfig) -> None:
        """Noised updates counted before the ledger existed (a number, no noise recorded)
        enter it at this round's noise, as the old count was accounted, then the count goes."""
        legacy = self.legacy
        if legacy is None or legacy.count <= 0:
            return
        for _ in range(legacy.count):
            self.ledger.record(-1, chosen.dp_noise_multiplier, chosen.dp_clip)
        legacy.done()
        self.legacy = None

    def record(self, round_idx: int, method: MethodConfig) -> None:
        """An update made with ``method`` (from :meth:`admit`) is about to leave."""
        if method.dp_clip > 0 and method.dp_noise_multiplier > 0:
            self.ledger.record(round_idx, method.dp_noise_multiplier, method.dp_clip)

    def epsilon(self, delta: float | None = None) -> float:
        return self.ledger.epsilon(delta if delta is not None else self.cfg.delta)

    # --- metadata ------------------------------------------------------------------------
    def release(self, update: SparseUpdate) -> SparseUpdate:
        """``update`` with its loss, usage and importance as the config says
        (:func:`release_metadata`)."""
        return release_metadata(self.cfg, update, self.rng)


def release_metadata(cfg: DevicePrivacyConfig, update: SparseUpdate,
                     rng: random.Random | None = None) -> SparseUpdate:
    """``update`` with its loss, usage and importance as ``cfg`` says (module docstring); the
    noise of ``"noised"`` values from ``rng`` (None: the OS's randomness). Needs no ledger: a
    simulated device's update is released where it trains (:mod:`lab.devices`)."""
    rng = rng if rng is not None else random.SystemRandom()
    meta = update.meta
    withheld = sorted(n for n in ("loss", "usage", "importance")
                      if getattr(cfg, n) == "withheld")
    usage = _stats(cfg, rng, update.usage, cfg.usage, per_layer_sum=True)
    importance = _stats(cfg, rng, update.importance, cfg.importance, per_layer_sum=False)
    changes = dict(loss=_loss(cfg, rng, meta.loss), withheld=withheld or None)
    if cfg.importance != "exact":
        changes["ib_vs_importance"] = None
    routed = update.routed if cfg.usage == "exact" else frozenset(update.updated)
    return dataclasses.replace(update, usage=usage, importance=importance, routed=routed,
                               meta=meta.replace(**changes))


def _loss(cfg: DevicePrivacyConfig, rng: random.Random, loss: float | None) -> float | None:
    how = cfg.loss
    if loss is None or how == "exact":
        return loss
    if how == "withheld":
        return None
    if how == "noised":
        return loss + rng.gauss(0.0, cfg.loss_noise)
    return round(loss / cfg.loss_step) * cfg.loss_step


def _stats(cfg: DevicePrivacyConfig, rng: random.Random, values: Mapping[ExpertId, float],
           how: str, per_layer_sum: bool) -> dict[ExpertId, float]:
    if how == "exact":
        return dict(values)
    if how == "withheld":
        return {}
    if how == "coarsened":
        step = cfg.stat_step
        return {e: math.floor(v / step + 1e-9) * step for e, v in values.items()}
    out = {e: min(1.0, max(0.0, v + rng.gauss(0.0, cfg.stat_noise)))
           for e, v in values.items()}
    if per_layer_sum:  # usage: a layer's shares sum to at most 1
        sums: dict[int, float] = {}
        for e, v in out.items():
            sums[e.layer_idx] = sums.get(e.layer_idx, 0.0) + v
        out = {e: v / sums[e.layer_idx] if sums[e.layer_idx] > 1 else v
               for e, v in out.items()}
    return out
