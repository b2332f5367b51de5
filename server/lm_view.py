"""The report's view of a causal LM's held-out evaluation: per evaluated round the loss,
perplexity and ROUGE-L overall and per domain, and the last evaluation's generations.

A causal-LM metrics row (:func:`server.evaluate.evaluate_lm`) carries ``loss``,
``perplexity``, ``rougeL`` and ``per_domain`` (domain -> ``loss``, ``perplexity``,
``examples``, ``tokens``, ``rougeL``) and ``samples`` (prompt, reference, generated, ROUGE-L).
Rows without ``per_domain`` (classification) give no section.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from server.rounds import round_label


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def _table(head: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = "".join("<tr>" + "".join(
        f"<td class='num'>{_fmt(v)}</td>" if isinstance(v, (int, float)) and not
        isinstance(v, bool) else f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in body)
    return f"<div class='scroll'><table><tr>{th}</tr>{rows}</table></div>"


def evaluated_lm_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows holding a causal-LM evaluation, in order."""
    return [r for r in rows if isinstance(r.get("per_domain"), Mapping)]


def domains_table(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """Round x domain table of ``metric`` (``loss`` or ``rougeL``), with the overall value."""
    domains = sorted({d for r in rows for d in r["per_domain"]})
    body = [[round_label(r), r.get(metric)] + [r["per_domain"].get(d, {}).get(metric)
                                               for d in domains] for r in rows]
    return _table(["round", "all"] + domains, body)


def samples_table(row: Mapping[str, Any]) -> str:
    samples = row.get("samples") or []
    return _table(["domain", "prompt", "reference", "generated", "ROUGE-L"],
                  [[s.get("domain"), s.get("prompt"), s.get("reference"), s.get("generated"),
                    s.get("rougeL")] for s in samples]) if samples else ""


def lm_section(rows: Sequence[Mapping[str, Any]]) -> str:
    """The report card of the language model's evaluation; "" for a classification run."""
    lm = evaluated_lm_rows(rows)
    if not lm:
        return ""
    overall = _table(["round", "loss", "perplexity", "ROUGE-L", "generated", "examples",
                      "tokens"],
                     [[round_label(r), r.get("loss"), r.get("perplexity"), r.get("rougeL"),
                       r.get("rougeL_examples"), r.get("examples"), r.get("tokens")]
                      for r in lm])
    parts = ["<h3>Overall</h3>", overall, "<h3>Loss per domain</h3>", domains_table(lm, "loss")]
    if any("rougeL" in r for r in lm):
        parts += ["<h3>ROUGE-L per domain</h3>", domains_table(lm, "rougeL")]
    last = samples_table(lm[-1])
    if last:
        parts += [f"<h3>Generations after round {html.escape(round_label(lm[-1]))}</h3>", last]
    note = ("Held-out next-token loss on the response tokens (the training loss; prompts take "
            "none) and its perplexity, overall and per domain (the data's label column), and "
            "ROUGE-L F-measure of the greedy continuation of the first held-out prompts "
            "(taken domain by domain in turn) against their reference responses.")
    return ("<section><h2>Language model</h2>"
            f"<p class='note'>{note}</p>{''.join(parts)}</section>")
