"""Benchmark: which learning rates for the pretrained experts and for the new head?

Question: the kit fine-tunes two kinds of parameters at once, converted pretrained experts and
gates (``train.lr``) and a freshly initialised classification head (``train.head_lr``). Which
pair learns best in the federated setting of the Q6 study, for HFedMoE and for FedAvg-full
(both, so that the baseline is not held to rates chosen for HFedMoE)?

Each grid point is a run of :func:`benchmarks.learning.run_one` with the study's settings
(same pinned budgets for every point) on seeds that the study does not use (100, 101 by
default), so that the choice is not made on the study's own runs. Reported per (strategy, lr,
head_lr): mean final accuracy and mean accuracy of the last 5 rounds over seeds, each with a
95% t interval, and the best pair by the last-5 mean.

    python -m benchmarks.lr_sweep [--lrs 3e-5,1e-4,3e-4] [--head-lrs 0,1e-3,3e-3]
                                  [--strategies hfedmoe,fedavg-full] [--seeds 100,101]
                                  [--rounds 15] [--alphas 0.5] [--jobs 2] [--out r.jsonl]

``--head-lrs 0`` means "the same rate as the experts" (``train.head_lr = 0``). Every other
option is the learning benchmark's. Defaults: 3 x 3 pairs, 2 strategies, 2 seeds, 15 rounds at
alpha 0.5: 36 runs, about 25 minutes with ``--jobs 2`` on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

from benchmarks import learning
from benchmarks._common import environment, plot_path, pyplot, savefig, table, write_rows


def _point(args: argparse.Namespace, lr: float, head_lr: float) -> argparse.Namespace:
    a = copy.copy(args)
    a.lr, a.head_lr = lr, head_lr
    return a


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    keys = dict.fromkeys((r["alpha"], r["strategy"], r["lr"], r["head_lr"]) for r in rows)
    for alpha, s, lr, head_lr in keys:
        runs = [r for r in rows if (r["alpha"], r["strategy"], r["lr"], r["head_lr"])
                == (alpha, s, lr, head_lr)]
        seeds = sorted({r["seed"] for r in runs})
        finals, tails = [], []
        for sd in seeds:
            rs = sorted((r for r in runs if r["seed"] == sd and r["round"] >= 0),
                        key=lambda r: r["round"])
            finals.append(rs[-1]["accuracy"])
            tails.append(statistics.fmean(r["accuracy"] for r in rs[-5:]))
        fm, fh = learning.ci95(finals)
        tm, th = learning.ci95(tails)
        out.append({"bench": "lr_sweep", "kind": "summary", "alpha": alpha, "strategy": s,
                    "lr": lr, "head_lr": head_lr, "seeds": seeds,
                    "final_accuracy_mean": round(fm, 4),
                    "final_accuracy_ci95": [round(fm - fh, 4), round(fm + fh, 4)],
                    "last5_accuracy_mean": round(tm, 4),
                    "last5_accuracy_ci95": [round(tm - th, 4), round(tm + th, 4)]})
    for alpha, s in dict.fromkeys((r["alpha"], r["strategy"]) for r in out):
        group = [r for r in out if (r["alpha"], r["strategy"]) == (alpha, s)]
        best = max(group, key=lambda r: r["last5_accuracy_mean"])
        for r in group:
            r["best_in_group"] = r is best
    return out


def plot(summary: list[dict], path: str) -> None:
    plt = pyplot()
    groups = list(dict.fromkeys((r["alpha"], r["strategy"]) for r in summary))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, (alpha, s) in zip(axes[0], groups, strict=True):
        rs = [r for r in summary if (r["alpha"], r["strategy"]) == (alpha, s)]
        for head_lr in dict.fromkeys(r["head_lr"] for r in rs):
            pts = sorted((r["lr"], r["last5_accuracy_mean"]) for r in rs if r["head_lr"] == head_lr)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                    label=f"head_lr {head_lr:g}" if head_lr else "head_lr = lr", markersize=3)
        ax.set_xscale("log")
        ax.set_title(f"{s}, alpha {alpha}", fontsize=9)
        ax.set_xlabel("lr (experts, gates)")
        ax.set_ylabel("accuracy, last 5 rounds (mean over seeds)")
        ax.legend(fontsize=6)
    savefig(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = learning.build_parser(__doc__.splitlines()[0])
    p.add_argument("--lrs", default="3e-5,1e-4,3e-4")
    p.add_argument("--head-lrs", default="0,1e-3,3e-3", help="0: the same as --lr")
    p.set_defaults(alphas="0.5", seeds="100,101", strategies="hfedmoe,fedavg-full", rounds=15)
    # the grid replaces --lr / --head-lr
    args = p.parse_args(argv)
    learning.resolve_defaults(args)
    lrs = [float(x) for x in args.lrs.split(",")]
    head_lrs = [float(x) for x in args.head_lrs.split(",")]
    alphas, seeds, strategies = learning.check_args(args)
    names = args.profiles.split(",")
    profiles = [names[i % len(names)] for i in range(args.devices)]
    pins = learning.measure_pins(args)
    args.train_time_s = float(args.train_time_s) if args.train_time_s != "auto" else \
        learning.auto_window(args, profiles, pins)[0]
    print(f"budgets {learning.planned_budgets(args, profiles, pins, args.train_time_s)}")
    env = environment(benchmark="lr_sweep", device="cpu")
    tasks = [(lr, hlr, alpha, seed, s) for lr in lrs for hlr in head_lrs for alpha in alphas
             for seed in seeds for s in strategies]
    rows: list[dict] = []
    t0 = time.perf_counter()

    def record(task: tuple, rs: list[dict]) -> None:
        lr, hlr, alpha, seed, s = task
        for r in rs:
            r.update(bench="lr_sweep", lr=lr, head_lr=hlr,
                     settings={k: getattr(args, k) for k in learning.SETTINGS if k not in
                               ("lr", "head_lr")})
        write_rows(args.out, rs, env)
        rows.extend(rs)
        print(f"  lr={lr:g} head_lr={hlr:g} alpha={alpha} seed={seed} {s:<14} "
              f"acc {rs[-1]['accuracy']:.3f}  {time.perf_counter() - t0:.0f}s", flush=True)

    if args.jobs <= 1:
        for t in tasks:
            record(t, learning._run_task(_point(args, t[0], t[1]), t[4], t[2], t[3],
                                         profiles, pins))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {ex.submit(learning._run_task, _point(args, t[0], t[1]), t[4], t[2], t[3],
                                 profiles, pins): t for t in tasks}
            for fut in as_completed(futures):
                record(futures[fut], fut.result())
    summary = summarize(rows)
    write_rows(args.out, summary, env)
    print(table([[r["alpha"], r["strategy"], f"{r['lr']:g}",
                  f"{r['head_lr']:g}" if r["head_lr"] else "= lr",
                  learning._ci(r, "final_accuracy"), learning._ci(r, "last5_accuracy"),
                  "best" if r["best_in_group"] else ""] for r in summary],
                ["alpha", "strategy", "lr", "head_lr", "final acc [95% CI]",
                 "last-5 acc [95% CI]", ""]))
    plot(summary, str(plot_path(args.out, "lr_sweep.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
