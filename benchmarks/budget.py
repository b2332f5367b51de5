"""Benchmark: does the cost model predict the real step time and peak memory per budget?

Question: ``device_agent.costs.measure_costs`` times one expert (trained and frozen) and the
non-expert part, and :class:`device_agent.budget.CostModel` turns that into
``step_seconds(c)`` and ``peak_bytes(c)``, which decide C_budget. For c = 1, 2, 4, 8, 16, 32, 48
trained experts of the default model (batch 8 x seq 128, the configured expert path), how far
are the predictions from a measured ``train_round`` step (routing pre-pass + forward + backward
+ AdamW) and its peak memory?

    python -m benchmarks.budget [--quick] [--budgets 1,2,4,...] [--repeats 5]
                                [--out results.jsonl] [--plot budget.png]

Measured rows come from a fresh process per budget (:mod:`benchmarks.stepcost`); the measured
memory is the peak RSS during training minus the RSS before the model was built (weights +
grads + optimizer state + activations), which is what ``peak_bytes`` predicts. The training
part alone (``peak_bytes`` minus the weights vs the peak RSS minus the RSS just before the first
step) is compared too, since the process also holds what building the model left resident
(imports, tokenizer, allocator arenas). Error = (predicted - measured) / measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import _common
from benchmarks.stepcost import QUICK_MODEL, environment, measure_in_subprocess


def predict(model_name: str, impl: str, batch_size: int, seq_len: int, repeats: int
            ) -> dict[str, Any]:
    """The cost model measured here for ``model_name`` (in this process)."""
    from device_agent.costs import measure_costs
    from hfedmoe.config import ModelConfig
    from hfedmoe.models.registry import build_model

    model = build_model(ModelConfig(name=model_name, expert_impl=impl), "classification", 8)
    measured = measure_costs(model, batch_size, seq_len, repeats=repeats)
    return {"cost": dataclasses.asdict(measured.cost),
            "tokens_per_expert": measured.tokens_per_expert}


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
    axes[0].set(xlabel="trained experts", ylabel="s", title="step (routing + train step)")
    axes[1].set(xlabel="trained experts", ylabel="MB", title="peak memory (model + training)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats (smoke test)")
    p.add_argument("--budgets", default=None, help="comma list (default 1,2,4,8,16,32,48)")
    p.add_argument("--impl", default=None, help="expert path (default: ModelConfig's)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads here and in every worker (0: torch's default)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--plot", default=None, help="write a PNG of the results here")
    args = p.parse_args(argv)
    from device_agent.budget import CostModel
    from hfedmoe.config import ModelConfig

    impl = args.impl or ModelConfig().expert_impl
    model = QUICK_MODEL if args.quick else "minilm-moe"
    budgets = ([int(b) for b in args.budgets.split(",")] if args.budgets
               else [1, 8] if args.quick else [1, 2, 4, 8, 16, 32, 48])
    batch_size, seq_len = (2, 16) if args.quick else (8, 128)
    repeats = args.repeats or (2 if args.quick else 5)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    env = environment()
    pred = predict(model, impl, batch_size, seq_len, repeats)
    cost = CostModel(**pred["cost"])
    rows = []
    for b in budgets:
        m = measure_in_subprocess({"model": model, "path": impl, "budget": b,
                                   "batch_size": batch_size, "seq_len": seq_len,
                                   "warmup": 1 if args.quick else 2, "repeats": repeats,
                                   "num_labels": 8, "threads": args.threads},
                                  isolate=not args.quick)
        c = m["trained_experts"]
        measured_step = m["routing_s"] + m["step_s"]
        row = {"bench": "budget", "model": model, "impl": impl, "budget": c,
               "predicted_step_s": cost.step_seconds(c), "measured_step_s": measured_step,
               "measured_train_step_s": m["step_s"], "measured_routing_s": m["routing_s"],
               "measured_step_min_s": m["routing_min_s"] + m["step_min_s"],
               "measured_step_max_s": m["routing_max_s"] + m["step_max_s"],
               "predicted_peak_bytes": cost.peak_bytes(c),
               "measured_peak_bytes": m["model_peak_bytes"],
               "measured_train_peak_bytes": m["train_peak_bytes"], "cost": pred["cost"],
               "env": {**env, "loadavg_end": environment()["loadavg"]}}
        row["step_error"] = round(row["predicted_step_s"] / measured_step - 1, 3)
        row["memory_error"] = round(row["predicted_peak_bytes"]
                                    / max(row["measured_peak_bytes"], 1) - 1, 3)
        weights = cost.non_expert_weight_bytes + cost.num_experts * cost.expert_weight_bytes
        row["predicted_train_bytes"] = cost.peak_bytes(c) - weights
        row["train_memory_error"] = round(row["predicted_train_bytes"]
                                          / max(m["train_peak_bytes"], 1) - 1, 3)
        rows.append(row)
        print(f"  done C={b}", file=sys.stderr, flush=True)
    print(f"{model} path={impl} batch {batch_size}x{seq_len}; cost model: "
          + ", ".join(f"{k}={v:.4g}" for k, v in pred["cost"].items()))
    print(f"{'C':>3}{'pred s':>9}{'meas s':>9}{'[min, max]':>17}{'err':>8}"
          f"{'pred MB':>10}{'meas MB':>10}{'err':>8}{'train pred':>11}{'meas':>7}{'err':>8}")
    for r in rows:
        print(f"{r['budget']:>3}{r['predicted_step_s']:>9.3f}{r['measured_step_s']:>9.3f}"
              f"  [{r['measured_step_min_s']:.3f}, {r['measured_step_max_s']:.3f}]"
              f"{100 * r['step_error']:>7.1f}%{r['predicted_peak_bytes'] / 1e6:>10.1f}"
              f"{r['measured_peak_bytes'] / 1e6:>10.1f}{100 * r['memory_error']:>7.1f}%"
              f"{r['predicted_train_bytes'] / 1e6:>11.1f}"
              f"{r['measured_train_peak_bytes'] / 1e6:>7.0f}{100 * r['train_memory_error']:>7.1f}%")
    if args.out:
        _common.write_rows(args.out, ({k: v for k, v in r.items() if k != "env"} for r in rows),
                           rows[0]["env"] if rows else environment())
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
