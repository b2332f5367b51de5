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
                                [--adapters full,lora] [--quantize none,int8]
                                [--experts 32 --top-k 4] [--heap bounded,dynamic]
                                [--out results.jsonl] [--plot budget.png]

What training adds (``added_*``: the peak less the resident size just before training) is
the figure a memory budget limits, and is compared on its own: the whole-process peak's error
is diluted by the resident model. ``--experts 32 --top-k 4`` measures the fine-grained model
(32 experts per layer, top-4; C in {1, E/4, E/2, E} of its 192). ``--heap`` measures under
each C-heap policy (:mod:`device_agent.heap`): ``bounded`` (the kit's) and glibc's
``dynamic`` default, whose fragmentation makes the resident size climb step after step.

``--adapters`` and ``--quantize`` measure the same rounds with LoRA factors instead of whole
experts (``train.adapter``) and with the frozen base stored quantized (``model.quantize``),
side by side: the peak memory of each at C = E/4 as a ratio of full fine-tuning over an fp32
base, and the budget every shipped profile gets under each variant's measured costs.

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


def matmul_ratios(rows: list[dict[str, Any]], matmuls: list[str]) -> list[dict[str, Any]]:
    """Each later ``--cpu-matmul`` choice against the first, per configuration: the median
    measured step and what training adds over its processes, as ratios."""
    import statistics

    if len(matmuls) < 2:
        return []
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["adapter"], r["quantize"], r["heap"], r["requested_budget"],
                           r["cpu_matmul"]), []).append(r)
    out = []
    for (adapter, quantize, heap, b, matmul), got in groups.items():
        base = groups.get((adapter, quantize, heap, b, matmuls[0]))
        if matmul == matmuls[0] or not base:
            continue
        step = statistics.median(r["measured_step_s"] for r in got)
        base_step = statistics.median(r["measured_step_s"] for r in base)
        added = statistics.median(r["measured_added_bytes"] for r in got)
        base_added = statistics.median(r["measured_added_bytes"] for r in base)
        out.append({"bench": "budget", "kind": "matmul-ratio", "adapter": adapter,
                    "quantize": quantize, "heap": heap, "budget": b, "cpu_matmul": matmul,
                    "baseline": matmuls[0], "processes": len(got), "step_s": step,
                    "baseline_step_s": base_step, "step_ratio": round(step / base_step, 3),
                    "added_bytes": added, "baseline_added_bytes": base_added,
                    "added_ratio": round(added / max(base_added, 1), 3)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats (smoke test)")
    p.add_argument("--budgets", default=None, help="comma list (default 1,E/4,E/2,E)")
    p.add_argument("--adapters", default="full",
                   help="comma list of train.adapter values to measure side by side (full,lora)")
    p.add_argument("--quantize", default="none",
                   help="comma list of model.quantize values for the frozen base (none,int8)")
    p.add_argument("--impl", default=None, help="expert path (default: ModelConfig's)")
    p.add_argument("--experts", type=int, default=0,
                   help="experts per layer (default: the model's 8; the fine-grained: 32)")
    p.add_argument("--top-k", type=int, default=0, help="experts per token (default 2)")
    p.add_argument("--heap", default="bounded",
                   help="comma list of C-heap policies to measure side by side (bounded,dynamic)")
    p.add_argument("--cpu-matmul", default="blas",
                   help="comma list of where float32 rounds run their CPU matmuls, measured "
                        "side by side, interleaved (blas,onednn; device_agent.heap)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in every worker (0: torch's default)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (quick: 2)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="default 128 (quick: 16); the demo trains at 64")
    p.add_argument("--window", type=float, default=12.0,
                   help="compute window (s) of the per-profile budgets (the demo's)")
    p.add_argument("--steps", type=int, default=8, help="local steps of the per-profile budgets")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--plot", default=None, help="write a PNG of the results here")
    p.add_argument("--processes", type=int, default=1,
                   help="fresh processes per configuration, each predicting and measuring on "
                        "its own (what the C heap holds moves by several MB between them)")
    args = p.parse_args(argv)
    from hfedmoe.config import ModelConfig

    impl = args.impl or ModelConfig().expert_impl
    model = QUICK_MODEL if args.quick else "minilm-moe"
    per_layer = args.experts or 8
    num_experts = per_layer if args.quick else 6 * per_layer
    budgets = ([int(b) for b in args.budgets.split(",")] if args.budgets
               else [1, num_experts // 4, num_experts // 2, num_experts])
    batch_size, seq_len = (2, 16) if args.quick else (8, 128)
    batch_size, seq_len = args.batch_size or batch_size, args.seq_len or seq_len
    repeats = args.repeats or (2 if args.quick else 5)
    # a quantized base trains only through LoRA factors (model.quantize needs adapter = lora)
    variants = [(a, q, h) for h in args.heap.split(",") for q in args.quantize.split(",")
                for a in args.adapters.split(",") if q == "none" or a == "lora"]
    env = environment()
    rows = []
    for adapter, quantize, heap in variants:
        for b in budgets:
            for process, matmul in [(i, k) for i in range(max(1, args.processes))
                                    for k in args.cpu_matmul.split(",")]:
                m = measure_in_subprocess({"mode": "round", "model": model, "path": impl,
                                           "cpu_matmul": matmul,
                                           "num_experts": args.experts, "top_k": args.top_k,
                                           "heap": heap, "budget": b,
                                           "batch_size": batch_size, "seq_len": seq_len,
                                           "adapter": adapter, "quantize": quantize,
                                           "warmup": 1 if args.quick else 2,
                                           "repeats": repeats,
                                           "cost_repeats": 1 if args.quick else 7,
                                           "threads": args.threads}, isolate=not args.quick)
                row = _row(m, model, impl, b, batch_size, seq_len, args.threads, env)
                rows.append({**row, "process": process} if args.processes > 1 else row)
                print(f"  done {adapter}/{quantize}/{heap}/{matmul} C={b} ({process + 1})",
                      file=sys.stderr, flush=True)
    print(f"{model} path={impl} batch {batch_size}x{seq_len}, real routing; whole-process peak")
    print(f"{'adapter':>8}{'base':>6}{'heap':>8}{'C':>4}{'rows':>7}{'pred s':>9}{'meas s':>9}"
          f"{'[min, max]':>17}{'err':>8}{'balanced':>9}{'pred MB':>10}{'meas MB':>10}{'err':>8}"
          f"{'adds pred':>10}{'meas':>8}{'err':>8}{'MB/expert':>10}")
    for r in rows:
        print(f"{r['adapter']:>8}{r['quantize']:>6}{r['heap']:>8}{r['budget']:>4}"
              f"{r['trained_row_fraction']:>7.2f}{r['predicted_step_s']:>9.3f}"
              f"{r['measured_step_s']:>9.3f}"
              f"  [{r['measured_step_min_s']:.3f}, {r['measured_step_max_s']:.3f}]"
              f"{100 * r['step_error']:>7.1f}%{100 * r['balanced_step_error']:>8.1f}%"
              f"{r['predicted_peak_bytes'] / 1e6:>10.1f}{r['measured_peak_bytes'] / 1e6:>10.1f}"
              f"{100 * r['memory_error']:>7.1f}%{r['predicted_added_bytes'] / 1e6:>10.1f}"
              f"{r['measured_added_bytes'] / 1e6:>8.1f}{100 * r['added_error']:>7.1f}%"
              f"{r['per_trained_expert_bytes'] / 1e6:>10.2f}")
    matmuls = args.cpu_matmul.split(",")
    first = [r for r in rows  # one process per configuration (the first)
             if r["heap"] == variants[0][2] and r.get("process", 0) == 0
             and r["cpu_matmul"] == matmuls[0]]
    ratios = side_by_side(first, num_experts // 4) + matmul_ratios(rows, matmuls)
    for r in ratios:
        if r["kind"] == "matmul-ratio":
            print(f"C = {r['budget']}: {r['adapter']} step on {r['cpu_matmul']} "
                  f"{r['step_s']:.3f} s = {r['step_ratio']:.3f}x of {r['baseline']} "
                  f"({r['baseline_step_s']:.3f} s); what training adds {r['added_ratio']:.3f}x "
                  f"(medians of {r['processes']} processes each)")
            continue
        print(f"C = {r['budget']}: {r['adapter']}/{r['quantize']} measured peak "
              f"{r['measured_peak_bytes'] / 1e6:.1f} MB = {r['peak_vs_full_fp32']:.3f}x of "
              f"full/none; resident {r['resident_bytes'] / 1e6:.1f} MB = "
              f"{r['resident_vs_full_fp32']:.3f}x")
    profiles = profile_budgets(first, num_experts // 4, args.window, args.steps)
    if profiles:
        names = list(dict.fromkeys(r["profile"] for r in profiles))
        keys = list(dict.fromkeys((r["adapter"], r["quantize"]) for r in profiles))
        print(f"budgets per profile ({args.window:g} s window, {args.steps} steps; costs above)")
        print(f"{'profile':<24}" + "".join(f"{a + '/' + q:>14}" for a, q in keys))
        for n in names:
            got = {(r["adapter"], r["quantize"]): r for r in profiles if r["profile"] == n}
            print(f"{n:<24}" + "".join(f"{got[k]['c_budget']:>8} ({got[k]['limit'][:4]})"
                                       for k in keys))
    if args.out:
        _common.write_rows(args.out, ({k: v for k, v in r.items() if k != "env"}
                                      for r in rows + ratios + profiles),
                           rows[0]["env"] if rows else environment(),
                           rows[0].get("descriptor") if rows else None)  # ratios, profiles
    if args.plot:
        plot([r for r in rows if (r["adapter"], r["quantize"], r["heap"]) == variants[0]],
             args.plot)
    return 0


def _row(m: dict[str, Any], model: str, impl: str, b: int, batch_size: int, seq_len: int,
         threads: int, env: dict[str, Any]) -> dict[str, Any]:
    from device_agent.budget import CostModel

    row = {"bench": "budget", "kind": "round", "model": model, "impl": impl,
           "adapter": m["adapter"], "quantize": m["quantize"], "heap": m["heap"],
           "cpu_matmul": m.get("cpu_matmul", "onednn"),
           "budget": m["trained_experts"],
           "requested_budget": b, "batch_size": batch_size, "seq_len": seq_len,
           "threads": threads,
           **{k: m[k] for k in ("optimizer_experts", "trained_row_fraction",
                                "balanced_row_fraction", "predicted_step_s",
                                "balanced_step_s", "predicted_peak_bytes",
                                "measured_peak_bytes", "resident_bytes", "routing_batch_s",
                                "step_samples_s", "cost")},
           "per_trained_expert_bytes": CostModel(**m["cost"]).per_trained_expert_bytes,
           "measured_step_s": m["step_s"], "measured_step_min_s": m["step_min_s"],
           "measured_step_max_s": m["step_max_s"],
           "env": {**env, "loadavg_end": environment()["loadavg"]}}
    if m.get("descriptor"):
        row["descriptor"] = m["descriptor"]
    row["step_error"] = round(row["predicted_step_s"] / row["measured_step_s"] - 1, 3)
    row["balanced_step_error"] = round(row["balanced_step_s"] / row["measured_step_s"] - 1, 3)
    row["memory_error"] = round(row["predicted_peak_bytes"]
                                / max(row["measured_peak_bytes"], 1) - 1, 3)
    # what training adds: the peak over the resident size just before training
    row["predicted_added_bytes"] = row["predicted_peak_bytes"] - row["resident_bytes"]
    row["measured_added_bytes"] = row["measured_peak_bytes"] - row["resident_bytes"]
    row["added_error"] = round(row["predicted_added_bytes"]
                               / max(row["measured_added_bytes"], 1) - 1, 3)
    return row


def side_by_side(rows: list[dict[str, Any]], c: int) -> list[dict[str, Any]]:
    """At C = ``c``: each variant's measured peak and resident memory over full/none's."""
    at = [r for r in rows if r["requested_budget"] == c]
    ref = next((r for r in at if (r["adapter"], r["quantize"]) == ("full", "none")), None)
    if ref is None:
        return []
    return [{"bench": "budget", "kind": "ratio", "budget": c, "adapter": r["adapter"],
             "quantize": r["quantize"], "measured_peak_bytes": r["measured_peak_bytes"],
             "resident_bytes": r["resident_bytes"],
             "peak_vs_full_fp32": round(r["measured_peak_bytes"] / ref["measured_peak_bytes"], 3),
             "resident_vs_full_fp32": round(r["resident_bytes"] / ref["resident_bytes"], 3),
             "per_trained_expert_vs_full_fp32": round(
                 r["per_trained_expert_bytes"] / ref["per_trained_expert_bytes"], 3)}
            for r in at]


def profile_budgets(rows: list[dict[str, Any]], c: int, window: float,
                    steps: int) -> list[dict[str, Any]]:
    """C_budget of every shipped profile under each variant's measured costs (taken from its
    C = ``c`` run, whose baseline is the process's resident memory with that base)."""
    from device_agent.budget import CostModel
    from device_agent.costs import decide_budget
    from device_agent.profiles import list_profiles, load_profile
    from device_agent.resources import probe_device

    at = [r for r in rows if r["requested_budget"] == c]
    if not at:
        return []
    host = probe_device(matmul_seconds=0.5)
    out = []
    for name in list_profiles():
        report = load_profile(name)
        for r in at:
            budget = decide_budget(report, CostModel(**r["cost"]), window, steps, host=host)
            out.append({"bench": "budget", "kind": "profile", "profile": name,
                        "adapter": r["adapter"], "quantize": r["quantize"], "window_s": window,
                        "steps": steps, "c_budget": budget.c_budget, "limit": budget.limit,
                        "memory_max": budget.memory_max, "time_max": budget.time_max})
    return out


if __name__ == "__main__":
    sys.exit(main())
