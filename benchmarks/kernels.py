"""Benchmark: training-step time, peak memory and achieved GFLOP/s of the expert paths per budget.

Question: on this CPU, for the default model (MiniLM-L6 upcycled, 6 MoE layers x 8 experts,
batch 8 x seq 128), how do step time and peak training memory fall when only ``budget`` of the
E = 48 experts train, per expert path (``eager`` reference, ``grouped``, ``sorted``; bf16
autocast and ``detach_frozen`` on one fp32 path)? Targets (issue 4): with E/4 experts training,
peak training memory <= 45 % and step time <= 55 % of training all experts, and the step
reaching >= 40 % of the measured matmul peak of its dtype on the expert FLOPs.

    python -m benchmarks.kernels [--quick] [--paths eager,grouped,sorted] [--fast-path sorted]
                                 [--repeats 5] [--threads N] [--out results.jsonl]
                                 [--plot kernels.png] [--from results.jsonl] [--bf16-held]

Every configuration runs in a fresh process (:mod:`benchmarks.stepcost`: method, memory and
FLOP accounting); ``--quick`` (tiny model, budgets 1 and all) measures in-process. A "rest" row
per dtype runs the same step with the experts' compute removed, to show how much of a step is
not expert work. ``expert_gflops`` is the expert FLOPs over the whole step, ``expert_part_gflops``
over the step minus the "rest" row of its dtype. The routing pre-pass of ``train_round`` is
timed separately (``routing_s``) and is not part of ``step_s``. In bf16 rows autocast casts the
fp32 weights on every use; ``--bf16-held`` adds rows with the frozen matmul weights held in bf16
(``train.hold_frozen_lowp``, :mod:`hfedmoe.precision`). ``--threads`` sets torch's
threads here and in every worker. Prints a table and writes JSON lines (one per configuration,
each with the environment).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import _common
from benchmarks.stepcost import QUICK_MODEL, environment, measure_in_subprocess


def matmul_peaks(quick: bool) -> dict[str, float]:
    """Sustained n x n matmul GFLOP/s for fp32 and bf16 (the reference for 'achieved')."""
    from device_agent.throughput import measure_matmul, supported_dtypes

    dtypes = [d for d in ("float32", "bfloat16") if d in supported_dtypes("cpu")]
    return {d: round(measure_matmul(d, "cpu", n=256 if quick else 1024,
                                    seconds=0.1 if quick else 2.0).gflops, 1) for d in dtypes}


def configs(paths: list[str], fast: str, budgets: list[int],
            recipe_budget: int | None = None, hold_frozen: bool = False) -> list[dict[str, Any]]:
    """(label, path, dtype, detach_frozen, budget) of every run, 'rest' rows first."""
    variants = [(p, p, "float32", False) for p in paths]
    variants += [(f"{fast}+bf16", fast, "bfloat16", False),
                 (f"{fast}+detach", fast, "float32", True)]
    # bf16 with the frozen weights held in bf16 for the round (train.hold_frozen_lowp)
    held = [(f"{fast}+bf16 held", fast, "bfloat16", False)] if hold_frozen else []
    out = [{"label": f"rest fp32 ({fast})", "path": fast, "dtype": "float32", "budget": 0,
            "detach_frozen": False, "skip_experts": True},
           {"label": f"rest bf16 ({fast})", "path": fast, "dtype": "bfloat16", "budget": 0,
            "detach_frozen": False, "skip_experts": True}]
    with_frozen = sorted({0, *budgets})  # C = 0: every expert computed, none trained (bound)
    for label, path, dtype, detach in variants:
        out += [{"label": label, "path": path, "dtype": dtype, "detach_frozen": detach,
                 "budget": b} for b in with_frozen]
    for label, path, dtype, detach in held:
        out += [{"label": label, "path": path, "dtype": dtype, "detach_frozen": detach,
                 "budget": b, "frozen_lowp": True} for b in budgets]
    quarter = recipe_budget if recipe_budget in budgets else min(budgets)
    out.append({"label": f"{fast} round recipe", "path": fast, "dtype": "float32",
                "detach_frozen": False, "budget": quarter, "recipe": "compare"})
    return out


def recipe_comparison(rows: list[dict[str, Any]], fast: str, round_steps: int,
                      selection_batches: int) -> dict[str, Any] | None:
    """The per-batch recipe (routing pre-pass + step) against the round recipe (step with the
    gate capture inside, plus the round's routing pass spread over its steps): same budget,
    same process, the two timed alternately."""
    new = next((r for r in rows if r.get("recipe") == "compare"), None)
    if new is None:
        return None
    old_s = new["per_batch_recipe_s"]  # measured alternately with the round recipe's steps
    amortized = new["step_s"] + new["routing_s"] * selection_batches / round_steps
    return {"bench": "kernels-recipe", "budget": new["trained_experts"],
            "per_batch_recipe_s": round(old_s, 4), "round_step_s": round(new["step_s"], 4),
            "routing_batch_s": round(new["routing_s"], 4), "round_steps": round_steps,
            "selection_batches": selection_batches,
            "round_recipe_amortized_s": round(amortized, 4),
            "ratio_step": round(new["step_s"] / old_s, 3),
            "ratio_amortized": round(amortized / old_s, 3)}


def add_ratios(rows: list[dict[str, Any]], peaks: dict[str, float]) -> None:
    """Ratios vs the same variant with every expert trained, and achieved GFLOP/s vs peak."""
    full = {}
    for r in rows:
        if not r.get("skip_experts"):
            full.setdefault(r["label"], r)
            if r["budget"] >= full[r["label"]]["budget"]:
                full[r["label"]] = r
    rest = {r["dtype"]: r["step_s"] for r in rows if r.get("skip_experts")}
    for r in rows:
        r["expert_gflops"] = round(r["expert_flops"] / r["step_s"] / 1e9, 1)
        expert_part = r["step_s"] - rest.get(r["dtype"], 0.0)  # the step minus the 'rest' row
        r["expert_part_s"] = round(expert_part, 4)
        r["expert_part_gflops"] = (round(r["expert_flops"] / expert_part / 1e9, 1)
                                   if expert_part > 0 and r["expert_flops"] else 0.0)
        r["peak_gflops"] = peaks.get(r["dtype"])
        r["fraction_of_peak"] = (round(r["expert_gflops"] / r["peak_gflops"], 3)
                                 if r["peak_gflops"] else None)
        ref = full.get(r["label"])
        if ref is not None:
            r["time_ratio_vs_all"] = round(r["step_s"] / ref["step_s"], 3)
            r["memory_ratio_vs_all"] = round(r["train_peak_bytes"]
                                             / max(ref["train_peak_bytes"], 1), 3)
    add_bounds(rows, full, rest)


def add_bounds(rows: list[dict[str, Any]], full: dict[str, dict[str, Any]],
               rest: dict[str, float]) -> None:
    """The step each row would take if its path did only the work it must, from its own
    variant's measured costs: the non-expert step (``rest``), the expert part with every expert
    trained (C = E row) and with every expert frozen but computed (C = 0 row), mixed by the
    share of routed rows that go to trained experts:

        bound(C) = rest + f(C) (t(E) - rest) + (1 - f(C)) (t(0) - rest)

    ``bound_ratio_vs_all`` = bound(C) / t(E) is what ``time_ratio_vs_all`` can reach at best;
    ``gap_to_bound`` = step / bound - 1 is the overhead beyond that work (target <= 10 %).
    """
    frozen = {r["label"]: r for r in rows if not r.get("skip_experts") and r["budget"] == 0}
    for r in rows:
        ref, zero = full.get(r["label"]), frozen.get(r["label"])
        base = rest.get(r["dtype"])
        if r.get("skip_experts") or ref is None or zero is None or base is None \
                or r.get("recipe"):
            continue
        f = r["trained_row_fraction"]
        bound = base + f * (ref["step_s"] - base) + (1 - f) * (zero["step_s"] - base)
        r["bound_s"] = round(bound, 6)
        r["bound_ratio_vs_all"] = round(bound / ref["step_s"], 3)
        r["gap_to_bound"] = round(r["step_s"] / bound - 1, 3)


def print_table(rows: list[dict[str, Any]], peaks: dict[str, float]) -> None:
    print(f"matmul peak GFLOP/s: {peaks}")
    print(f"{'variant':<22}{'C':>4}{'step s':>8}{'[min, max]':>16}{'route s':>9}"
          f"{'train MB':>10}{'t/all':>7}{'bound':>7}{'gap':>7}{'m/all':>7}{'GFLOP/s':>9}"
          f"{'%peak':>7}{'exp-part':>9}")
    for r in rows:
        gap = f"{100 * r['gap_to_bound']:+.0f}%" if "gap_to_bound" in r else ""
        print(f"{r['label']:<22}{r['trained_experts']:>4}{r['step_s']:>8.3f}"
              f"  [{r['step_min_s']:.3f}, {r['step_max_s']:.3f}]{r['routing_s']:>9.3f}"
              f"{r['train_peak_bytes'] / 1e6:>10.1f}{r.get('time_ratio_vs_all', ''):>7}"
              f"{r.get('bound_ratio_vs_all', ''):>7}{gap:>7}"
              f"{r.get('memory_ratio_vs_all', ''):>7}{r['expert_gflops']:>9.1f}"
              f"{100 * (r['fraction_of_peak'] or 0):>6.1f}%{r['expert_part_gflops']:>9.1f}")
    ratios = {}
    for r in rows:  # bf16 against fp32 on the same path, budget by budget
        if not r.get("skip_experts") and not r.get("recipe"):
            kind = r["dtype"] + (" held" if r.get("frozen_lowp") else "")
            ratios.setdefault((r["path"], r["budget"], bool(r.get("detach_frozen"))), {})[
                kind] = r
    for (path, budget, detach), by in sorted(ratios.items()):
        for kind in ("bfloat16", "bfloat16 held"):
            if kind in by and "float32" in by and not detach and budget:
                b, f = by[kind], by["float32"]
                print(f"{path} C={budget}: {kind}/fp32 step {b['step_s'] / f['step_s']:.2f}x, "
                      f"training memory "
                      f"{b['train_peak_bytes'] / max(f['train_peak_bytes'], 1):.2f}x, "
                      f"whole process {b['model_peak_bytes'] / max(f['model_peak_bytes'], 1):.2f}x")


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Step time and training memory vs budget, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    labels = dict.fromkeys(r["label"] for r in rows if not r.get("skip_experts"))
    for label in labels:
        sel = sorted((r for r in rows if r["label"] == label), key=lambda r: r["budget"])
        xs = [r["trained_experts"] for r in sel]
        axes[0].plot(xs, [r["step_s"] for r in sel], marker="o", label=label)
        axes[1].plot(xs, [r["train_peak_bytes"] / 1e6 for r in sel], marker="o", label=label)
    for r in rows:
        if r.get("skip_experts"):
            axes[0].axhline(r["step_s"], ls=":", lw=1, color="grey")
    axes[0].set(xlabel="trained experts", ylabel="step time (s)", title="step (fwd+bwd+AdamW)")
    axes[1].set(xlabel="trained experts", ylabel="peak training RSS (MB)",
                title="training memory")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats (smoke test)")
    p.add_argument("--paths", default="eager,grouped,sorted", help="fp32 paths to compare")
    p.add_argument("--fast-path", default="sorted", help="path for the bf16 and detach rows")
    p.add_argument("--budgets", default=None, help="comma list (default 1,2,E/4,E/2,E)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads here and in every worker (0: torch's default)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--plot", default=None, help="write a PNG of the results here")
    p.add_argument("--bf16-held", action="store_true",
                   help="also bf16 with the frozen weights held in bf16 (train.hold_frozen_lowp)")
    p.add_argument("--round-steps", type=int, default=20,
                   help="local steps per round the round's routing pass is spread over")
    p.add_argument("--from", dest="from_jsonl", default=None,
                   help="re-derive the table (and --plot) from earlier JSON lines, no run")
    args = p.parse_args(argv)
    if args.from_jsonl:
        with open(args.from_jsonl) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        peaks = {r["dtype"]: r["peak_gflops"] for r in rows if r.get("peak_gflops")}
        add_ratios(rows, peaks)
        print_table(rows, peaks)
        if args.plot:
            plot(rows, args.plot)
        return 0
    model = QUICK_MODEL if args.quick else "minilm-moe"
    num_experts = 8 if args.quick else 48  # 2 x 4 (tiny) or 6 x 8 (default)
    budgets = ([int(b) for b in args.budgets.split(",")] if args.budgets
               else [1, num_experts] if args.quick
               else sorted({1, 2, num_experts // 4, num_experts // 2, num_experts}))
    base = {"model": model, "batch_size": 2 if args.quick else 8,
            "seq_len": 16 if args.quick else 128, "warmup": 1 if args.quick else 2,
            "repeats": args.repeats or (2 if args.quick else 5), "num_labels": 8}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        base["threads"] = args.threads
    peaks = matmul_peaks(args.quick)
    rows = []
    for cfg in configs(args.paths.split(","), args.fast_path, budgets,
                       recipe_budget=max(1, num_experts // 4), hold_frozen=args.bf16_held):
        env = environment()
        rows.append({"bench": "kernels", **measure_in_subprocess({**base, **cfg},
                                                                 isolate=not args.quick),
                     "env": env})
        print(f"  done {cfg['label']} C={cfg['budget']}", file=sys.stderr, flush=True)
    add_ratios(rows, peaks)
    print_table(rows, peaks)
    from hfedmoe.config import TrainConfig

    recipe = recipe_comparison(rows, args.fast_path, args.round_steps,
                               TrainConfig().selection_batches)
    if recipe is not None:
        print(f"C={recipe['budget']}: per-batch recipe (routing pre-pass + step) "
              f"{recipe['per_batch_recipe_s']:.3f} s; round recipe step "
              f"{recipe['round_step_s']:.3f} s = {recipe['ratio_step']:.2f}x; with the round's "
              f"routing pass ({recipe['selection_batches']} batches) over "
              f"{recipe['round_steps']} steps {recipe['round_recipe_amortized_s']:.3f} s = "
              f"{recipe['ratio_amortized']:.2f}x")
    if args.out:
        _common.write_rows(args.out, ({k: v for k, v in r.items() if k != "env"}
                                      for r in rows + ([recipe] if recipe else [])),
                           rows[0]["env"] if rows else environment(),
                           rows[-1].get("descriptor") if rows else None)  # the recipe row
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
