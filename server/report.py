"""``hfedmoe report RUN_DIR``: a self-contained HTML report with PNG plots (matplotlib).

Reads ``metrics.jsonl`` (one row per round, plus the initial evaluation) and ``run.db``
(devices with their reports and budgets, rejections). Plots: accuracy/loss per round and per
wall-clock second, bytes per round, per-device budgets and measured step times, a heatmap of
the experts each device trained, and accepted/rejected/late counts. Per round, which device
trained which expert and how the devices' sets overlap (:mod:`server.selection_view`). A
causal LM's loss, perplexity and ROUGE-L, overall and per domain, with its last generations
(:mod:`server.lm_view`).

The page is ``server/dashboard/templates/report.html`` (:mod:`server.pages`), styled by the
live dashboard's stylesheet, inlined. Rounds are numbered as the console numbers them
(:func:`server.rounds.round_label`: initial, 1, 2, ...); ``latency.csv`` keeps the stored
0-based round index, as every data file does.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import statistics
from pathlib import Path
from typing import Any

from hfedmoe.errors import StoreError
from server.lm_view import lm_section
from server.pages import stylesheet, template
from server.rounds import INITIAL, round_label
from server.selection_view import selection_section


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise StoreError(f"{path} not found: not a run directory, or no round finished yet")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _round_axis(ax: Any, rows: list[dict[str, Any]]) -> list[int]:
    """Rounds on the x axis as the console numbers them: initial at 0, round_idx 0 at 1."""
    xs = [0 if r.get("phase") == INITIAL else int(r["round"]) + 1 for r in rows]
    step = max(1, len(xs) // 12)
    ax.set_xticks(xs[::step], [round_label(r) for r in rows][::step])
    ax.set_xlabel("round")
    return xs


def _evaluation_plot(evals: list[dict[str, Any]]) -> str:
    """Accuracy (else loss) per round and per wall-clock second; loss (else ROUGE-L) on a
    twin axis."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    metric = "accuracy" if any("accuracy" in r for r in evals) else "loss"
    t0 = evals[0]["time"]
    for ax, by_round in ((axes[0], True), (axes[1], False)):
        if by_round:
            x = _round_axis(ax, evals)
        else:
            x = [r["time"] - t0 for r in evals]
            ax.set_xlabel("wall-clock seconds")
        ax.plot(x, [r.get(metric) for r in evals], "o-", label=metric)
        # classification: loss beside the accuracy; causal LM: ROUGE-L beside the loss
        twin = "loss" if metric == "accuracy" else (
            "rougeL" if any("rougeL" in r for r in evals) else None)
        if twin is not None:
            ax2 = ax.twinx()
            ax2.plot(x, [r.get(twin) for r in evals], "s--", color="tab:red", label=twin)
            ax2.set_ylabel("ROUGE-L" if twin == "rougeL" else twin)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle("held-out evaluation (initial = before training)")
    return _png(fig)


def _bytes_plot(rounds: list[dict[str, Any]]) -> str:
    fig, ax = _pyplot().subplots(figsize=(6, 3.2))
    x = _round_axis(ax, rounds)
    ax.bar([i - 0.2 for i in x], [r["bytes_in"] / 1e6 for r in rounds], 0.4, label="updates in")
    ax.bar([i + 0.2 for i in x], [r["bytes_out"] / 1e6 for r in rounds], 0.4, label="model out")
    ax.set_ylabel("MB")
    ax.legend()
    return _png(fig)


def _outcomes_plot(rounds: list[dict[str, Any]]) -> str:
    fig, ax = _pyplot().subplots(figsize=(6, 3.2))
    x = _round_axis(ax, rounds)
    for key, color in (("accepted", "tab:green"), ("rejected", "tab:red"),
                       ("late", "tab:orange")):
        ax.plot(x, [r.get(key, 0) for r in rounds], "o-", label=key, color=color)
    ax.set_ylabel("updates")
    ax.legend()
    return _png(fig)


def _experts_plot(rounds: list[dict[str, Any]]) -> str | None:
    """Heatmap: how many rounds each device trained each expert (None: no expert trained)."""
    names = sorted({d for r in rounds for d in r.get("devices", {})})
    experts = sorted({e for r in rounds for d in r.get("devices", {}).values()
                      for e in d["updated"]}, key=lambda s: tuple(map(int, s.split(":"))))
    if not (names and experts):
        return None
    grid = [[sum(e in r.get("devices", {}).get(n, {}).get("updated", []) for r in rounds)
             for e in experts] for n in names]
    fig, ax = _pyplot().subplots(figsize=(max(6, len(experts) * 0.16), 0.4 * len(names) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(names)), names)
    step = max(1, len(experts) // 16)
    ax.set_xticks(range(0, len(experts), step), experts[::step], rotation=90)
    ax.set_xlabel("expert (layer:index)")
    fig.colorbar(im, ax=ax, label="rounds trained")
    return _png(fig)


def _devices_plot(devices: dict[str, Any]) -> str:
    names = sorted(devices)
    fig, axes = _pyplot().subplots(1, 2, figsize=(10, 3.2))
    axes[0].bar(names, [devices[n]["budget"] for n in names])
    axes[0].set_ylabel("C_budget (experts)")
    steps = [devices[n]["report"].get("budget", {}).get("step_seconds", 0) for n in names]
    axes[1].bar(names, steps)
    axes[1].set_ylabel("predicted step time (s)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    return _png(fig)


def _plots(rows: list[dict[str, Any]], devices: dict[str, Any]) -> dict[str, str]:
    """The report's PNGs (base64) by name: evaluation, bytes, outcomes, experts, devices."""
    initial = [r for r in rows if r.get("phase") == INITIAL]
    rounds = [r for r in rows if r.get("phase") == "round"]
    out = {"evaluation": _evaluation_plot(initial + rounds)} if initial or rounds else {}
    if rounds:
        out["bytes"] = _bytes_plot(rounds)
        out["outcomes"] = _outcomes_plot(rounds)
        experts = _experts_plot(rounds)
        if experts is not None:
            out["experts"] = experts
    if devices:
        out["devices"] = _devices_plot(devices)
    return out


# --- the page ------------------------------------------------------------------------------------

def _label(round_idx: Any) -> str:
    """A stored round index as :func:`round_label` shows it ("-" where a row has none)."""
    return round_label(int(round_idx)) if isinstance(round_idx, int) else "-"


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = ""
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"<td class='num'>{v:.4f}</td>" if isinstance(v, float) else
                         f"<td>{html.escape(str(v))}</td>")
        body += "<tr>" + "".join(cells) + "</tr>"
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def _section(title: str, *parts: str, note: str = "") -> str:
    """One card of the report: a heading, an optional note, then tables or plots."""
    note_html = f"<p class='note'>{note}</p>" if note else ""
    return f"<section><h2>{html.escape(title)}</h2>{note_html}{''.join(parts)}</section>"


def _img(png: str) -> str:
    return f"<img alt='' src='data:image/png;base64,{png}'>"


ROUND_COLS = ["round", "participants", "accepted", "rejected", "late", "experts_updated",
              "bytes_in", "dense_bytes", "bytes_out", "aggregation_s", "round_s", "accuracy",
              "loss", "perplexity", "rougeL"]
PLOT_TITLES = {"evaluation": "Held-out evaluation", "bytes": "Bytes per round",
               "outcomes": "Accepted / rejected / late updates", "devices": "Devices",
               "experts": "Experts trained per device"}


def _rounds_section(rows: list[dict[str, Any]]) -> str:
    present = [c for c in ROUND_COLS if any(c in r for r in rows)]
    labelled = [{**r, "round": round_label(r)} for r in rows]
    return _section("Rounds", _table(labelled, present))


def _device_rows(rows: list[dict[str, Any]], devices: dict[str, Any]) -> list[dict[str, Any]]:
    rounds = [r for r in rows if r.get("phase") == "round"]
    return [{"device": n, "budget": d["budget"], "status": d["status"],
             "limit": d["report"].get("budget", {}).get("limit", ""),
             "emulated": d["report"].get("source", "") if d["report"].get("emulated")
             else "measured",
             "trained experts (all rounds)": len({e for r in rounds for e in r.get(
                 "devices", {}).get(n, {}).get("updated", [])})}
            for n, d in sorted(devices.items())]


def _plot_sections(plots: dict[str, str], dev_rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for key, title in PLOT_TITLES.items():
        parts = [_img(plots[key])] if key in plots else []
        if key == "devices" and dev_rows:
            parts.append(_table(dev_rows, list(dev_rows[0])))
        if parts:
            out.append(_section(title, *parts))
    return out


def _budget_section(rows: list[dict[str, Any]]) -> str:
    held = [{"round": round_label(r), "device": name, **h} for r in rows
            if r.get("phase") == "round" for name, h in sorted(r.get("held", {}).items())]
    if not held:
        return ""
    cols = ["round", "device", "budget", "experts_sent", "optimizer_experts", "steps", "limit",
            "reason", "bytes"]
    return _section("Budget per device and round",
                    _table(held, [c for c in cols if any(c in h for h in held)]),
                    note="C_budget registered by the device, experts its update carried, "
                         "experts that held optimizer state, local steps, and what limited the "
                         "round.")


def _privacy_section(rows: list[dict[str, Any]]) -> str:
    privacy = [{"round": round_label(r), "device": name, "noised updates": p["rounds"][name],
                "epsilon": eps, "delta": p["delta"], "epsilon limit": p.get("max_epsilon") or "-"}
               for r in rows if r.get("phase") == "round" and r.get("privacy")
               for p in [r["privacy"]] for name, eps in p["epsilon"].items()]
    if not privacy:
        return ""
    return _section("Differential privacy", _table(privacy, list(privacy[0])),
                    note="Epsilon each device has spent at delta, after every round (RDP "
                         "accountant of dp-accounting over the noised updates the server "
                         "accepted; a device counts every update it sent). A device whose next "
                         "update would pass the limit sits the round out.")


def _latency_section(latency_rows: list[dict[str, Any]]) -> str:
    if not latency_rows:
        return ""
    return _section(
        "Step latency on the devices",
        "<h3>Per device class</h3>",
        _table(latency_summary_rows(latency_rows, "class"), LATENCY_COLS["class"]),
        "<h3>Per device</h3>",
        _table(latency_summary_rows(latency_rows, "device"), LATENCY_COLS["device"]),
        note="What each device measured while it trained (seconds per local step; forward, "
             "backward and optimizer are parts of a step; routing is the selection pass; upload "
             "is from sending the update to the server's ack). Per device and per device class: "
             "the median over rounds of each round's median, the median of the rounds' p90, and "
             "the spread (fastest to slowest round median). Every round of every device: "
             "<a href='latency.csv'>latency.csv</a>.")


def _skips_section(skips: list[dict[str, Any]]) -> str:
    if not skips:
        return ""
    rows = [{"round": _label(k["round"]), "device": k["client"],
             "when": "during the round" if k["during_round"] else "before joining",
             "reasons": "; ".join(k["reasons"]),
             "conditions": ", ".join(f"{a}={b}" for a, b in k["conditions"].items()
                                     if b is not None)} for k in skips]
    return _section("Devices that sat rounds out",
                    _table(rows, ["round", "device", "when", "reasons", "conditions"]),
                    note="A participant whose conditions broke the run's eligibility rules "
                         "(battery, charging, temperature, metered network, user activity) "
                         "before or during the round.")


def _rejections_section(rejections: list[dict[str, Any]]) -> str:
    if not rejections:
        return ""
    rows = [{**r, "round": _label(r["round"])} for r in rejections[:200]]
    return _section("Rejected messages", _table(rows, ["round", "client", "error", "reason"]))


def _read_store(run_dir: Path, cfg: Any = None) -> dict[str, Any]:
    from server.store import Store, open_store

    store = Store(run_dir) if cfg is None else open_store(cfg, run_dir)
    try:
        return {"devices": dict(store.devices()), "rejections": store.rejections(),
                "participation": store.participation(), "skips": store.skips()}
    finally:
        store.close()


def render_report(run_name: str, rows: list[dict[str, Any]], stored: dict[str, Any],
                  latency_rows: list[dict[str, Any]]) -> str:
    """The report page: ``templates/report.html`` filled with its sections."""
    devices = stored["devices"]
    sections = [_rounds_section(rows), lm_section(rows),
                *_plot_sections(_plots(rows, devices), _device_rows(rows, devices)),
                selection_section(rows), _budget_section(rows), _privacy_section(rows), _latency_section(latency_rows),
                _skips_section(stored["skips"]), _rejections_section(stored["rejections"])]
    finished = sum(r.get("phase") == "round" for r in rows)
    summary = f"{finished} round{'s' * (finished != 1)} · {len(devices)} devices"
    return template("report.html").substitute(
        run=html.escape(run_name), summary=summary, stylesheet=stylesheet(),
        sections="\n".join(s for s in sections if s))


def write_report(run_dir: str | Path, cfg: Any = None) -> Path:
    """Write ``RUN_DIR/report.html`` (and ``latency.csv`` where devices sent timings); returns
    the report's path. The run's store is the one ``cfg`` (a server config) names, else
    ``run.db`` in the run directory."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    stored = _read_store(run_dir, cfg)
    latency_rows = latency_table(stored["participation"], stored["devices"])
    if latency_rows:
        write_latency_csv(latency_rows, run_dir / "latency.csv")
    out = run_dir / "report.html"
    out.write_text(render_report(run_dir.name, rows, stored, latency_rows), encoding="utf-8")
    return out


# --- per-device latency (field trials) -----------------------------------------------------------

LATENCY_FIELDS = ["device", "class", "round", "steps", "step_median_s", "step_p90_s",
                  "forward_median_s", "backward_median_s", "optimizer_median_s", "routing_s",
                  "upload_s", "peak_rss_mib"]
LATENCY_COLS = {
    key: [key, "rounds", "step median ms", "step p90 ms", "spread ms", "forward ms",
          "backward ms", "optimizer ms", "routing ms", "upload ms", "peak RSS MiB"]
    for key in ("device", "class")}


def device_class(report: dict[str, Any]) -> str:
    """A device's class: the emulated profile, else its board, else platform and CPU."""
    if report.get("emulated") and report.get("source"):
        return str(report["source"])
    return str(report.get("board") or
               f"{report.get('platform', '?')} {report.get('cpu_model') or ''}".strip())


def latency_table(participation: list[dict[str, Any]],
                  devices: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per device and round from the timing summaries devices sent with their updates
    (a round's upload time arrives with the device's next update)."""
    uploads = {(p["client"], lat["upload_prev"].get("round")): lat["upload_prev"].get("seconds")
               for p in participation if isinstance(lat := p.get("latency"), dict)
               and isinstance(lat.get("upload_prev"), dict)}
    rows = []
    for p in participation:
        lat = p.get("latency")
        if not isinstance(lat, dict) or not isinstance(lat.get("step"), dict):
            continue
        device = str(p["client"]).split("~")[0]

        def med(name: str, lat: dict[str, Any] = lat) -> float | None:
            part = lat.get(name)
            return part.get("median") if isinstance(part, dict) else None

        rows.append({"device": device,
                     "class": device_class(devices.get(device, {}).get("report", {})),
                     "round": p["round"], "steps": lat.get("steps"),
                     "step_median_s": med("step"), "step_p90_s": lat["step"].get("p90"),
                     "forward_median_s": med("forward"), "backward_median_s": med("backward"),
                     "optimizer_median_s": med("optimizer"), "routing_s": lat.get("routing_s"),
                     "upload_s": uploads.get((device, p["round"])),
                     "peak_rss_mib": lat.get("peak_rss_mib")})
    return rows


def latency_summary_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Per device (``key="device"``) or device class: medians over rounds, p90, spread."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)

    def ms(values: list[Any]) -> str:
        vals = [v for v in values if isinstance(v, (int, float))]
        return f"{1e3 * statistics.median(vals):.1f}" if vals else "-"

    out = []
    for name, rs in sorted(groups.items()):
        meds = [r["step_median_s"] for r in rs if isinstance(r["step_median_s"], (int, float))]
        rss = [r["peak_rss_mib"] for r in rs if isinstance(r["peak_rss_mib"], (int, float))]
        out.append({key: name, "rounds": len(rs), "step median ms": ms(meds),
                    "step p90 ms": ms([r["step_p90_s"] for r in rs]),
                    "spread ms": f"{1e3 * min(meds):.1f}-{1e3 * max(meds):.1f}" if meds else "-",
                    "forward ms": ms([r["forward_median_s"] for r in rs]),
                    "backward ms": ms([r["backward_median_s"] for r in rs]),
                    "optimizer ms": ms([r["optimizer_median_s"] for r in rs]),
                    "routing ms": ms([r["routing_s"] for r in rs]),
                    "upload ms": ms([r["upload_s"] for r in rs]),
                    "peak RSS MiB": f"{max(rss):.0f}" if rss else "-"})
    return out


def write_latency_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LATENCY_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in LATENCY_FIELDS})
    return path
