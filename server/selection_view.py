"""The report's view of what each device selected: per round, a device x expert matrix (which
device trained which expert) with the round's overlap and coverage of those sets.

A round row says which experts each device trained in its participation records
(``held[device]["expert_ids"]``, :func:`server.rounds.participation_record`) and measures them
in ``selection`` (:func:`server.rounds.selection_measures`). Rows written before records
carried the ids fall back to the aggregation report's ``devices[device]["updated"]`` and are
measured here (without coverage: the model's size is not in the row).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from hfedmoe.names import ExpertId
from server.rounds import round_label, selected_sets, selection_measures

MARK = "■"  # a device trained the expert in the round
COLUMNS = ("round", "devices", "Jaccard", "overlap coef.", "experts trained", "coverage")


def round_sets(row: Mapping[str, Any]) -> dict[str, list[str]]:
    """Device -> the experts it trained in the round ``row``, sorted by device."""
    sets = selected_sets(row.get("held") or {})
    if sets:
        return sets
    return {d: list(rep.get("updated", [])) for d, rep in sorted((row.get("devices") or {}).items())}


def round_measures(row: Mapping[str, Any]) -> dict[str, Any]:
    """The round's overlap and coverage: the row's ``selection``, else measured from its sets."""
    return dict(row.get("selection") or selection_measures(round_sets(row), 0))


def expert_order(expert: str) -> tuple[int, int]:
    """Sort key of a ``"layer:expert"`` id: by layer, then expert."""
    e = ExpertId.parse(expert)
    return e.layer_idx, e.expert_idx


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def measures_row(row: Mapping[str, Any]) -> list[str]:
    """One line of the overlap table: round, devices, Jaccard, overlap coefficient, experts
    trained by any device, and their share of the model."""
    m = round_measures(row)
    return [round_label(dict(row)), str(m["clients"]), _number(m["jaccard"], ".3f"),
            _number(m["overlap_coef"], ".3f"), str(m["union"]),
            _number(m.get("coverage"), ".1%")]


def matrix(sets: Mapping[str, list[str]], experts: list[str]) -> str:
    """A device x expert table: a mark where the device trained the expert, and a last line
    counting the devices that trained each expert."""
    head = "".join(f"<th class='e'>{html.escape(e)}</th>" for e in experts)
    body = "".join(
        f"<tr><td>{html.escape(d)}</td>"
        + "".join(f"<td class='e'>{MARK if e in trained else ''}</td>" for e in experts)
        + "</tr>" for d, trained in ((d, set(s)) for d, s in sets.items()))
    counts = "".join(f"<td class='e'>{sum(e in s for s in sets.values())}</td>" for e in experts)
    return (f"<div class='scroll'><table class='matrix'><tr><th>device</th>{head}</tr>{body}"
            f"<tr><td>devices</td>{counts}</tr></table></div>")


def selection_section(rows: list[dict[str, Any]]) -> str:
    """The report's card: the overlap table over rounds, then each round's matrix (the last
    round's open). Empty when no round row names a trained expert."""
    rounds = [r for r in rows if r.get("phase") == "round"]
    per_round = [(r, round_sets(r)) for r in rounds]
    experts = sorted({e for _, sets in per_round for s in sets.values() for e in s},
                     key=expert_order)
    if not experts:
        return ""
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in measures_row(r))
                    + "</tr>" for r in rounds)
    parts = [f"<div class='scroll'><table><tr>{head}</tr>{lines}</table></div>"]
    for i, (row, sets) in enumerate(per_round):
        if not sets:
            continue
        label = html.escape(round_label(row))
        opened = " open" if i == len(per_round) - 1 else ""
        parts.append(f"<details{opened}><summary><h3>Round {label}</h3></summary>"
                     f"{matrix(sets, experts)}</details>")
    note = ("Which device trained which expert in each round (a column per expert any device "
            "trained in the run, as layer:index), and how the devices' sets overlap: the mean "
            "over pairs of devices of the Jaccard overlap |A&cap;B| / |A&cup;B| and of the "
            "overlap coefficient |A&cap;B| / min(|A|, |B|) (1 when the smaller set lies inside "
            "the larger, as when every device trains a prefix of one ranking); experts trained "
            "by any device, and their share of the model's experts.")
    return (f"<section><h2>Experts selected per round</h2><p class='note'>{note}</p>"
            f"{''.join(parts)}</section>")
