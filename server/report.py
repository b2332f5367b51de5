"""``hfedmoe report RUN_DIR``: a self-contained HTML report with PNG plots (matplotlib).

Reads ``metrics.jsonl`` (one row per round, plus the initial evaluation) and ``run.db``
(devices with their reports and budgets, rejections). Plots: accuracy/loss per round and per
wall-clock second, bytes per round, per-device budgets and measured step times, a heatmap of
the experts each device trained, and accepted/rejected/late counts.
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


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise StoreError(f"{path} not found: not a run directory, or no round finished yet")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(rows: list[dict[str, Any]], devices: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in rows if r.get("phase") == "round"]
    initial = [r for r in rows if r.get("phase") == "initial"]
    t0 = (initial or rows)[0]["time"]
    out: dict[str, str] = {}
    metric = "accuracy" if any("accuracy" in r for r in rows) else "loss"
    xs = [r["round"] + 1 for r in initial + rounds]
    ts = [r["time"] - t0 for r in initial + rounds]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    for ax, x, label in ((axes[0], xs, "round"), (axes[1], ts, "wall-clock seconds")):
        ax.plot(x, [r.get(metric) for r in initial + rounds], "o-", label=metric)
        if metric == "accuracy":
            ax2 = ax.twinx()
            ax2.plot(x, [r.get("loss") for r in initial + rounds], "s--", color="tab:red",
                     label="loss")
            ax2.set_ylabel("loss")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle("held-out evaluation (round 0 = before training)")
    out["evaluation"] = _png(fig)

    if rounds:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        idx = [r["round"] for r in rounds]
        ax.bar([i - 0.2 for i in idx], [r["bytes_in"] / 1e6 for r in rounds], 0.4,
               label="updates in")
        ax.bar([i + 0.2 for i in idx], [r["bytes_out"] / 1e6 for r in rounds], 0.4,
               label="model out")
        ax.set_xlabel("round")
        ax.set_ylabel("MB")
        ax.legend()
        out["bytes"] = _png(fig)

        fig, ax = plt.subplots(figsize=(6, 3.2))
        for key, color in (("accepted", "tab:green"), ("rejected", "tab:red"),
                           ("late", "tab:orange")):
            ax.plot(idx, [r.get(key, 0) for r in rounds], "o-", label=key, color=color)
        ax.set_xlabel("round")
        ax.set_ylabel("updates")
        ax.legend()
        out["outcomes"] = _png(fig)

        names = sorted({d for r in rounds for d in r.get("devices", {})})
        experts = sorted({e for r in rounds for d in r.get("devices", {}).values()
                          for e in d["updated"]}, key=lambda s: tuple(map(int, s.split(":"))))
        if names and experts:
            grid = [[sum(e in r.get("devices", {}).get(n, {}).get("updated", [])
                         for r in rounds) for e in experts] for n in names]
            fig, ax = plt.subplots(figsize=(max(6, len(experts) * 0.16), 0.4 * len(names) + 1.5))
            im = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(names)), names)
            step = max(1, len(experts) // 16)
            ax.set_xticks(range(0, len(experts), step), experts[::step], rotation=90)
            ax.set_xlabel("expert (layer:index)")
            fig.colorbar(im, ax=ax, label="rounds trained")
            out["experts"] = _png(fig)

    if devices:
        names = sorted(devices)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        axes[0].bar(names, [devices[n]["budget"] for n in names])
        axes[0].set_ylabel("C_budget (experts)")
        steps = [devices[n]["report"].get("budget", {}).get("step_seconds", 0) for n in names]
        axes[1].bar(names, steps)
        axes[1].set_ylabel("predicted step time (s)")
        for ax in axes:
            ax.tick_params(axis="x", rotation=45)
        out["devices"] = _png(fig)
    return out


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = ""
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"<td>{v:.4f}</td>" if isinstance(v, float) else
                         f"<td>{html.escape(str(v))}</td>")
        body += "<tr>" + "".join(cells) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html``; returns its path."""
    from server.store import Store

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    store = Store(run_dir)
    try:
        devices = dict(store.devices())
        rejections = store.rejections()
        participation = store.participation()
        skips = store.skips()
    finally:
        store.close()
    latency_rows = latency_table(participation, devices)
    if latency_rows:
        write_latency_csv(latency_rows, run_dir / "latency.csv")
    plots = _plots(rows, devices)
    round_cols = ["round", "participants", "accepted", "rejected", "late", "experts_updated",
                  "bytes_in", "dense_bytes", "bytes_out", "aggregation_s", "round_s", "accuracy", "loss",
                  "perplexity"]
    present = [c for c in round_cols if any(c in r for r in rows)]
    dev_rows = [{"device": n, "budget": d["budget"], "status": d["status"],
                 "limit": d["report"].get("budget", {}).get("limit", ""),
                 "emulated": d["report"].get("source", "") if d["report"].get("emulated")
                 else "measured",
                 "trained experts (all rounds)": len({e for r in rows if r.get("phase") == "round"
                                                      for e in r.get("devices", {})
                                                      .get(n, {}).get("updated", [])})}
                for n, d in sorted(devices.items())]
    parts = ["<html><head><meta charset='utf-8'><title>HFedMoE run report</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1100px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;font-size:13px}img{max-width:100%}",
             "</style></head><body>",
             f"<h1>HFedMoE run: {html.escape(run_dir.name)}</h1>",
             "<h2>Rounds</h2>", _table(rows, present)]
    titles = {"evaluation": "Held-out evaluation", "bytes": "Bytes per round",
              "outcomes": "Accepted / rejected / late updates", "devices": "Devices",
              "experts": "Experts trained per device"}
    for key, title in titles.items():
        if key in plots:
            parts.append(f"<h2>{title}</h2><img src='data:image/png;base64,{plots[key]}'>")
        if key == "devices" and dev_rows:
            parts.append(_table(dev_rows, list(dev_rows[0])))
    held = [{"round": r["round"] + 1, "device": name, **h} for r in rows
             if r.get("phase") == "round" for name, h in sorted(r.get("held", {}).items())]
    if held:
        cols = ["round", "device", "budget", "experts_sent", "optimizer_experts", "steps",
                "limit", "reason", "bytes"]
        parts += ["<h2>Budget per device and round</h2>",
                  "<p>C_budget registered by the device, experts its update carried, experts "
                  "that held optimizer state, local steps, and what limited the round.</p>",
                  _table(held, [c for c in cols if any(c in h for h in held)])]
    privacy = [{"round": r["round"] + 1, "device": name, "noised updates": p["rounds"][name],
                "epsilon": eps, "delta": p["delta"], "epsilon limit": p.get("max_epsilon") or "-"}
               for r in rows if r.get("phase") == "round" and r.get("privacy")
               for p in [r["privacy"]] for name, eps in p["epsilon"].items()]
    if privacy:
        parts += ["<h2>Differential privacy</h2>",
                  "<p>Epsilon each device has spent at delta, after every round (RDP accountant "
                  "of dp-accounting over the noised updates the server accepted; a device "
                  "counts every update it sent). A device whose next update would pass the "
                  "limit sits the round out.</p>",
                  _table(privacy, list(privacy[0]))]
    if latency_rows:
        parts += ["<h2>Step latency on the devices</h2>",
                  "<p>What each device measured while it trained (seconds per local step; "
                  "forward, backward and optimizer are parts of a step; routing is the "
                  "selection pass; upload is from sending the update to the server's ack). "
                  "Per device and per device class: the median over rounds of each round's "
                  "median, the median of the rounds' p90, and the spread (fastest to slowest "
                  "round median). Every round of every device: "
                  "<a href='latency.csv'>latency.csv</a>.</p>",
                  "<h3>Per device class</h3>",
                  _table(latency_summary_rows(latency_rows, "class"), LATENCY_COLS["class"]),
                  "<h3>Per device</h3>",
                  _table(latency_summary_rows(latency_rows, "device"), LATENCY_COLS["device"])]
    if skips:
        parts += ["<h2>Devices that sat rounds out</h2>",
                  "<p>A participant whose conditions broke the run's eligibility rules "
                  "(battery, charging, temperature, metered network, user activity) before or "
                  "during the round.</p>",
                  _table([{"round": k["round"], "device": k["client"],
                           "when": "during the round" if k["during_round"] else "before joining",
                           "reasons": "; ".join(k["reasons"]),
                           "conditions": ", ".join(f"{a}={b}" for a, b in k["conditions"].items()
                                                   if b is not None)} for k in skips],
                         ["round", "device", "when", "reasons", "conditions"])]
    if rejections:
        parts += ["<h2>Rejected messages</h2>", _table(rejections[:200],
                                                       ["round", "client", "error", "reason"])]
    parts.append("</body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))
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
