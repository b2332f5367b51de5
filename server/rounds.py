"""The values that make a round, built once for the live coordinator and the simulator.

Rounds are numbered one way everywhere a person reads them: the evaluation of the model before
any round is "initial", and round ``round_idx`` (0-based in rows, topics and the store) is shown
as ``round_idx + 1``: the demo's console, the dashboard and the report say initial, 1, 2, 3.
"""

from __future__ import annotations

from typing import Any

INITIAL = "initial"


def round_label(row_or_idx: dict[str, Any] | int) -> str:
    """How a person sees a round: ``"initial"`` for the initial evaluation (a metrics row with
    ``phase == "initial"``, or round index -1), else the 1-based round number."""
    if isinstance(row_or_idx, dict):
        if row_or_idx.get("phase") == INITIAL:
            return INITIAL
        row_or_idx = int(row_or_idx["round"])
    return INITIAL if row_or_idx < 0 else str(row_or_idx + 1)
