"""Benchmark: does the cost model predict a real round's step time and whole-process peak?

Question: the agent measures its costs at the announced batch and sequence length
(``device_agent.costs.measure_costs``), runs the round's routing pass over its data, selects
C experts (Eq. 15 on the round's mean I_b) and predicts the step time and the peak memory of the
*whole process* from the token rows the routing sends to the chosen experts
(``CostModel.routed_step_seconds``, ``routed_peak_bytes``; the baseline is the process's RSS
just before training). For C in {1, E/4, E/2, E} of the default model (batch 8 x 128, real
bundled text padded to the announced length, real imbalanced routing), how far are the
predictions from the measured steps and the measured peak RSS? Target: within +-10 %.

    python -m benchmarks.budget [--quick] [--budgets 1,12,24,48] [--repeats 5] [--threads N]
                                [--out results.jsonl] [--plot budget.png]

Every C runs in a fresh process (:func:`benchmarks.stepcost.measure_round`), which builds the
model, measures, routes, predicts and trains as the agent does. ``balanced_step_s`` is the old
prediction that assumed every expert gets the same share of the rows; ``trained_row_fraction``
is the share the chosen experts actually computed. Error = (predicted - measured) / measured.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import _common
from benchmarks.stepcost import QUICK_MODEL, environment, measure_in_subprocess


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["budget"])
    xs = [r["budget"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    axes[0].plot(xs, [r["measured_step_s"] for r in rows], "o-", label="measured")
    axes[0].plot(xs, [r["predicted_step_s"] for r in rows], "s--", label="predicted")
    axes[1].plot(xs, [r["measured_peak_bytes"] / 1e6 for r in rows], "o-", label="measured")
    axes[1].plot(xs, [r["predicted_peak_bytes"] / 1e6 for r in rows], "s--", label="predicted")
    axes[0].set(xlabel="trained experts", ylabel="s", title="training step (real routing)")
    axes[1].set(xlabel="trained experts", ylabel="MB", title="whole-process peak")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats (smoke test)")
    p.add_argument("--budgets", default=None, help="comma list (default 1,E/4,E/2,E)")
    p.add_argument("--impl", default=None, help="expert path (default: ModelConfig's)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in every worker (0: torch's default)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--plot", default=None, help="write a PNG of the results here")
    args = p.parse_args(argv)
    from hfedmoe.config import ModelConfig

    impl = args.impl or ModelConfig().expert_impl
    model = QUICK_MODEL if args.quick else "minilm-moe"
    num_experts = 8 if args.quick else 48
    budgets = ([int(b) for b in args.budgets.split(",")] if args.budgets
               else [1, num_experts // 4, num_experts // 2, num_experts])
    batch_size, seq_len = (2, 16) if args.quick else (8, 128)
    repeats = args.repeats or (2 if args.quick else 5)
    env = environment()
    rows = []
    for b in budgets:
        m = measure_in_subprocess({"mode": "round", "model": model, "path": impl, "budget": b,
                                   "batch_size": batch_size, "seq_len": seq_len,
                                   "warmup": 1 if args.quick else 2, "repeats": repeats,
                                   "cost_repeats": 1 if args.quick else 7,
                                   "threads": args.threads}, isolate=not args.quick)
        row = {"bench": "budget", "model": model, "impl": impl, "budget": m["trained_experts"],
               "batch_size": batch_size, "seq_len": seq_len, "threads": args.threads,
               **{k: m[k] for k in ("optimizer_experts", "trained_row_fraction",
                                    "balanced_row_fraction", "predicted_step_s",
                                    "balanced_step_s", "predicted_peak_bytes",
                                    "measured_peak_bytes", "resident_bytes", "routing_batch_s",
                                    "step_samples_s", "cost")},
               "measured_step_s": m["step_s"], "measured_step_min_s": m["step_min_s"],
               "measured_step_max_s": m["step_max_s"],
               "env": {**env, "loadavg_end": environment()["loadavg"]}}
        row["step_error"] = round(row["predicted_step_s"] / row["measured_step_s"] - 1, 3)
        row["balanced_step_error"] = round(row["balanced_step_s"] / row["measured_step_s"] - 1,
                                           3)
        row["memory_error"] = round(row["predicted_peak_bytes"]
                                    / max(row["measured_peak_bytes"], 1) - 1, 3)
        rows.append(row)
        print(f"  done C={b}", file=sys.stderr, flush=True)
    print(f"{model} path={impl} batch {batch_size}x{seq_len}, real routing; whole-process peak")
    print(f"{'C':>3}{'rows':>7}{'pred s':>9}{'meas s':>9}{'[min, max]':>17}{'err':>8}"
          f"{'balanced':>9}{'pred MB':>10}{'meas MB':>10}{'err':>8}")
    for r in rows:
        print(f"{r['budget']:>3}{r['trained_row_fraction']:>7.2f}{r['predicted_step_s']:>9.3f}"
              f"{r['measured_step_s']:>9.3f}"
              f"  [{r['measured_step_min_s']:.3f}, {r['measured_step_max_s']:.3f}]"
              f"{100 * r['step_error']:>7.1f}%{100 * r['balanced_step_error']:>8.1f}%"
              f"{r['predicted_peak_bytes'] / 1e6:>10.1f}{r['measured_peak_bytes'] / 1e6:>10.1f}"
              f"{100 * r['memory_error']:>7.1f}%")
    if args.out:
        _common.write_rows(args.out, ({k: v for k, v in r.items() if k != "env"} for r in rows),
                           rows[0]["env"] if rows else environment())
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
