"""The dashboard's "Experts trained" panel: which experts each device trained in the latest
closed round, and how the devices' sets overlapped over the last rounds.

Built from the round rows of ``metrics.jsonl`` as the dashboard reads them (their ``held``
participation records with ``expert_ids`` and their ``selection`` measures,
:func:`server.rounds.round_row`), through the report's helpers (:mod:`server.selection_view`),
so the page and the report read a round the same way. ``api/state``'s ``selection``::

    {"round": 3,                         # the last closed round (0-based), None before one
     "devices": {"dev-a": ["0:1", "1:2"], ...},  # device -> experts trained (sorted by device)
     "experts": ["0:1", "1:2", ...],     # the grid's columns, by layer then expert
     "measures": {"clients", "jaccard", "overlap_coef", "union", "coverage"},
     "devices_total": 120, "devices_more": 56, "experts_more": 0,
     "series": [{"round", "clients", "jaccard", "overlap_coef", "union", "coverage"}, ...]}

Bounded whatever the fleet: the matrix shows the first :data:`MAX_DEVICES` devices (by id) and
the first :data:`MAX_EXPERTS` experts they trained (``devices_more`` and ``experts_more`` count
the rest; the measures are the whole round's), and the series holds the last
:data:`SERIES_ROUNDS` rounds.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
from collections.abc import Mapping
from typing import Any

from hfedmoe.errors import HFedMoEError
from hfedmoe.names import ExpertId
from server.selection_view import expert_order, round_measures, round_sets

log = logging.getLogger("hfedmoe.server")

MAX_DEVICES = 64  # rows of the grid
MAX_EXPERTS = 256  # columns of the grid
SERIES_ROUNDS = 20  # rounds of the overlap series
MEASURES = ("clients", "jaccard", "overlap_coef", "union", "coverage")


def round_selection(row: Mapping[str, Any], max_devices: int = MAX_DEVICES,
                    max_experts: int = MAX_EXPERTS) -> dict[str, Any]:
    """The panel's view of one closed round ``row``: its index, measures and the device x
    expert matrix of its first ``max_devices`` devices over their first ``max_experts``
    experts (ids that are not ``"layer:expert"`` are left out of the matrix)."""
    sets = round_sets(row)
    measures = round_measures(row)
    shown = dict(itertools.islice(sets.items(), max_devices))
    experts = sorted({e for s in shown.values() for e in s if _is_expert(e)}, key=expert_order)
    columns = experts[:max_experts]
    keep = frozenset(columns)
    return {
        "round": int(row["round"]),
        "devices": {str(d): sorted((e for e in s if e in keep), key=expert_order)
                    for d, s in shown.items()},
        "experts": columns,
        "measures": {k: _finite(measures.get(k)) for k in MEASURES},
        "devices_total": len(sets), "devices_more": len(sets) - len(shown),
        "experts_more": len(experts) - len(columns),
    }


def _is_expert(expert: Any) -> bool:
    try:
        ExpertId.parse(expert)
    except HFedMoEError:
        return False
    return True


def _finite(v: Any) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if math.isfinite(v) else None


class ExpertsTrained:
    """The panel's state: the last closed round's matrix and the recent rounds' measures.

    :meth:`add` every metrics row as it is read (rows other than closed rounds are passed
    over); :meth:`state` is ``api/state``'s ``selection``.
    """

    def __init__(self, max_devices: int = MAX_DEVICES, max_experts: int = MAX_EXPERTS,
                 series_rounds: int = SERIES_ROUNDS) -> None:
        self.max_devices = max_devices
        self.max_experts = max_experts
        self.last: dict[str, Any] | None = None
        self.series: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=series_rounds)

    def add(self, row: Mapping[str, Any]) -> None:
        """Take in one metrics row; a round row that cannot be read is logged and skipped."""
        if row.get("phase") != "round":
            return
        try:
            entry = round_selection(row, self.max_devices, self.max_experts)
        except (HFedMoEError, KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("dashboard: round row without a readable selection: %s", exc)
            return
        self.last = entry
        self.series.append({"round": entry["round"], **entry["measures"]})

    def state(self) -> dict[str, Any]:
        """JSON-ready: the last closed round (``round`` None before one) and the series."""
        last = self.last or {"round": None, "devices": {}, "experts": [],
                             "measures": dict.fromkeys(MEASURES), "devices_total": 0,
                             "devices_more": 0, "experts_more": 0}
        return {**last, "series": list(self.series)}
