"""Benchmark Q6: HFedMoE vs the baselines and ablations on the same budgets, data and seeds.

Question: under heterogeneous device budgets (device profiles from phones to a laptop) and
non-IID data (Dirichlet alpha 0.5 and 0.1), how do HFedMoE, its ablations (importance-only
ranking; uniform aggregation) and the baselines (FedAvg-full, which ignores budgets; FedAvg
with random routed experts in the budget; FedMoE's fixed sub-model by routing frequency)
compare in held-out accuracy per round, final accuracy, and rounds / emulated device time /
uploaded bytes to reach a target accuracy? Each run is :func:`lab.simulate.simulate` (real
training, real wire bytes, budgets from the cost model scaled to each profile). Step costs and
the host's throughput are measured once per benchmark and pinned (also across ``--jobs``
workers), so every strategy, seed and alpha gets exactly the same budgets.

Statistics: per strategy the mean final accuracy over seeds with a 95% t interval, and the
paired difference to HFedMoE by seed (same partition, budgets and initial model) with its
interval; the same for the mean accuracy of the last 5 rounds (less round-to-round noise).

Selection: every round row keeps the experts each device trained (``selected``) and how those
sets overlap and what they cover (``selection``: mean pairwise Jaccard overlap and overlap
coefficient, distinct experts and their share of the model; :func:`server.rounds.
selection_measures`); the summary has their means over rounds (``selection_mean``).

Budgets: ``--train-time-s`` is the compute window each device budgets for (emulated seconds).
With ``--budget-share 0`` each device's budget is planned from its profile at the emulation
scale (``rounds.emulate_reference``: the profiles' memory and rates multiplied by the model's
parameters over OLMoE-1B-7B's), and the default 600 s is long enough for 2 steps that the scaled
memory sets the budgets; ``auto`` picks the shortest window in which the slowest profile can
train at least E/8 experts, so that time binds instead. ``--budget-share S`` caps each device at
S x the experts x its profile's available memory over the largest (the scale does not enter).
The budgets are printed and stored with every row.

Arms: a strategy name (``hfedmoe``, its ablations and controls ``hfedmoe-paper``,
``hfedmoe-anti``, ``hfedmoe-other``, ``budget-zero``, and the baselines), optionally
``+lora``, optionally ``@key=value;key=value`` method settings (``hfedmoe@specificity=0``,
``hfedmoe@gate_weighting=importance-size``): the sweep and the ablations are arms.

The fine-grained study (docs/results.md, "Selection per client"): the Debian fortune-cookie
collections (``--data fortunes``: 39 categories, 15,046 texts; 2,257 test and 1,505
validation examples with ``--test-fraction 0.15 --validation-fraction 0.1``), the MoEfied
MiniLM at 32 experts per layer, top-4 (192 experts), 30 devices with 10% sampled per round,
50 rounds of 5 local steps, budgets ``--budget-share 0.25`` (4-48 experts: a quarter of the
experts on the largest profile, scaled by each profile's memory), evaluated every 25 rounds
and in each of the last 5. Settings are chosen on ``--split validation`` (the sweep), the
study reports the test split.

The target is ``--target`` if given, else ``--target-frac`` (0.9) of FedAvg-full's mean final
accuracy at that alpha. ``--data PATH`` runs on a user dataset (.jsonl/.csv/.parquet with
text and label columns) instead of the bundled ChatterBot corpus.

    python -m benchmarks.learning [--quick] [--jobs 2] [--data PATH] [--alphas 0.5,0.1]
                                  [--seeds 0,1,2,3,4] [--fraction 1.0] [--out r.jsonl]
    python -m benchmarks.learning --from-rows a.jsonl,b.jsonl --out summary.jsonl

Defaults (the study in docs/results.md, which was run with ``--lr 1e-4 --head-lr 1e-3``
before the sweep): the MoEfied MiniLM with 8 experts per layer (48), top-2, 64 tokens,
batch 8, 10 devices (the 6 profiles, cycled), 30 rounds of 2 local steps with a 2-batch
routing pass, lr 1e-3 (experts, gates) and 3e-2 (new head; both the kit's defaults, from
``benchmarks/lr_sweep.py``), Dirichlet 0.5 and 0.1, seeds 0-4, HFedMoE, FedAvg-random,
FedMoE and FedAvg-full: 40 runs, about 70 minutes with ``--jobs 2 --threads 1`` on this
project's 2-core CPU. ``--quick`` is the test's 2-minute run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import (
    environment,
    model_descriptor,
    plot_path,
    pyplot,
    savefig,
    table,
    write_rows,
)
from hfedmoe.errors import ConfigError

STRATEGIES = ("hfedmoe", "hfedmoe-importance", "hfedmoe-uniform", "hfedmoe-paper", "hfedmoe-anti",
              "hfedmoe-other", "budget-zero", "fedmoe", "fedavg-random", "fedavg-full")
SETTINGS = ("data", "devices", "fraction", "rounds", "max_steps", "selection_batches",
            "num_experts", "top_k", "max_length", "batch_size", "lr", "head_lr", "upcycle",
            "train_time_s", "max_eval", "eval_every", "test_fraction", "validation_fraction",
            "split", "optimizer", "budget_share")
SELECTION = ("jaccard", "overlap_coef", "union", "coverage")  # server.rounds.selection_measures
STUDY = ("hfedmoe", "fedavg-random", "fedmoe", "fedavg-full")  # the default run; ablations opt in
PROFILES = ("phone-midrange-6gb", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb",
            "phone-flagship-12gb", "laptop-cpu-16gb", "jetson-agx-orin-32gb")


@contextlib.contextmanager
def pinned_costs(cache: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Measure step costs and the host's throughput once, then reuse them in every run.

    ``simulate`` measures both at the start of each run; on a shared machine two runs would
    get slightly different budgets. Pinning makes the budgets a function of the seed only.
    ``cache`` (``{"costs": ..., "host": ...}``, as :func:`measure_pins` returns) seeds the
    pins, so that worker processes use the parent's measurement.
    """
    import device_agent.costs as costs
    import device_agent.resources as resources

    cache = {} if cache is None else dict(cache)
    orig_costs, orig_probe = costs.measure_costs, resources.probe_device

    def measure(*a: Any, **kw: Any) -> Any:
        if "costs" not in cache:
            cache["costs"] = orig_costs(*a, **kw)
        return cache["costs"]

    def probe(*a: Any, **kw: Any) -> Any:
        if "host" not in cache:
            cache["host"] = orig_probe(*a, **kw)
        return cache["host"]

    costs.measure_costs, resources.probe_device = measure, probe
    try:
        yield cache
    finally:
        costs.measure_costs, resources.probe_device = orig_costs, orig_probe


def measure_pins(args: argparse.Namespace) -> dict[str, Any]:
    """Step costs and host throughput, measured as :func:`lab.simulate.simulate` does, and the
    model counted with its emulation scale (:func:`lab.devices.plan_model`)."""
    import device_agent.costs as costs
    import device_agent.resources as resources
    from hfedmoe.config import ModelConfig
    from hfedmoe.models.registry import build_model
    from lab.devices import plan_model

    cfg = ModelConfig(num_experts=args.num_experts, top_k=args.top_k,
                      max_length=args.max_length, upcycle=args.upcycle)
    model = build_model(cfg, "classification", 2)
    planned, scale = plan_model(server_config(argparse.Namespace(
        **{**vars(args), "train_time_s": 0.0}), "hfedmoe", 0.5, 0, "unused"), model)
    return {"experts": len(model.expert_ids()),
            "descriptor": model_descriptor(cfg, built=model, batch_size=args.batch_size,
                                           lr=args.lr, head_lr=args.head_lr),
            "host": resources.probe_device(matmul_seconds=0.5),
            "costs": costs.measure_costs(model, args.batch_size, args.max_length, "adamw",
                                         False, repeats=3),
            "planned": planned, "scale": scale}


def planned_budgets(args: argparse.Namespace, profiles: list[str], pins: dict[str, Any],
                    window: float) -> list[int]:
    """The budgets the simulator will plan for ``profiles`` (:func:`lab.simulate.plan_budget`),
    with the study's pinned measurement."""
    from device_agent.profiles import load_profile
    from lab.devices import Calibration
    from lab.simulate import plan_budget

    cfg = server_config(argparse.Namespace(**{**vars(args), "train_time_s": window}),
                        "hfedmoe", 0.5, 0, "unused")
    reports = [load_profile(p) for p in profiles]
    calibration = Calibration(pins["host"], pins["costs"], pins.get("planned"),
                              pins.get("scale"))
    return [plan_budget(cfg, r, calibration, args.max_steps, reports).c_budget for r in reports]


def auto_window(args: argparse.Namespace, profiles: list[str],
                pins: dict[str, Any]) -> tuple[float, list[int]]:
    """The shortest window where the slowest profile's budget is >= E/8 (see the docstring)."""
    from hfedmoe.errors import ConfigError

    def smallest(window: float) -> int:
        try:
            return min(planned_budgets(args, profiles, pins, window))
        except ConfigError:  # the window holds no step on some device
            return -1

    want = max(1, pins["experts"] // 8)
    w = 0.5
    while smallest(w) < want and w < 600:
        w += 0.5
    return w, planned_budgets(args, profiles, pins, w)


def strategy_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``NAME[+lora][@key=value;key=value]`` -> (strategy, adapter, method overrides): the
    study's label for one arm, e.g. ``hfedmoe@specificity=0`` or
    ``hfedmoe@gate_weighting=importance-size``; values take the type of the
    :class:`~hfedmoe.config.MethodConfig` field.

    Raises:
        ConfigError: an unknown strategy, adapter or method key, or a value of the wrong type.
    """
    import dataclasses

    from hfedmoe.config import MethodConfig

    head, _, tail = spec.partition("@")
    name, _, adapter = head.partition("+")
    if name not in STRATEGIES or adapter not in ("", "lora"):
        raise ConfigError(f"unknown strategy {spec!r}: each is one of {', '.join(STRATEGIES)}, "
                          "alone or with +lora, then optionally @key=value;key=value")
    fields = {f.name: f for f in dataclasses.fields(MethodConfig)}
    overrides: dict[str, Any] = {}
    for item in filter(None, tail.split(";")):
        key, eq, text = item.partition("=")
        if not eq or key not in fields or key == "strategy":
            raise ConfigError(f"{spec!r}: {item!r} is not method_key=value "
                              f"(keys: {', '.join(k for k in fields if k != 'strategy')})")
        kind = type(getattr(MethodConfig(), key))
        try:
            overrides[key] = text if kind is str else kind(float(text)) if kind is int else kind(text)
        except ValueError:
            raise ConfigError(f"{spec!r}: method.{key} wants a {kind.__name__}, got {text!r}"
                              ) from None
    MethodConfig(**overrides)  # a value out of range is a ConfigError now
    return name, adapter or "full", overrides


def server_config(args: argparse.Namespace, strategy: str, alpha: float, seed: int,
                  run_dir: str) -> Any:
    from hfedmoe.config import DataConfig, MethodConfig, ModelConfig, TrainConfig
    from hfedmoe.wire import WireConfig
    from server.config import RoundConfig, ServerConfig

    name, adapter, overrides = strategy_spec(strategy)
    return ServerConfig(
        run_id="bench", run_dir=run_dir, max_eval_examples=args.max_eval,
        eval_every=args.eval_every,
        model=ModelConfig(num_experts=args.num_experts, top_k=args.top_k,
                          max_length=args.max_length, seed=seed, upcycle=args.upcycle),
        data=DataConfig(source=args.data, alpha=alpha, seed=seed,
                        test_fraction=args.test_fraction,
                        validation_fraction=args.validation_fraction, eval_split=args.split),
        method=MethodConfig(**{**METHOD_DEFAULTS, **overrides, "strategy": name, "seed": seed}),
        train=TrainConfig(batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
                          max_steps=args.max_steps, threads=args.threads,
                          optimizer=args.optimizer,
                          selection_batches=args.selection_batches, adapter=adapter),
        rounds=RoundConfig(rounds=args.rounds, train_time_s=args.train_time_s,
                           deadline_s=max(120.0, args.train_time_s), seed=seed,
                           fraction=args.fraction, budget_share=args.budget_share,
                           emulate_reference=args.emulate_reference),
        wire=WireConfig())


METHOD_DEFAULTS: dict[str, Any] = {}  # the study's method settings besides the arm's overrides


def run_one(args: argparse.Namespace, strategy: str, alpha: float, seed: int,
            profiles: list[str]) -> list[dict]:
    from lab.simulate import simulate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = server_config(args, strategy, alpha, seed, str(Path(tmp) / "run"))
        t0 = time.perf_counter()
        metrics = simulate(cfg, args.devices, profiles)
        wall = time.perf_counter() - t0
    return study_rows(metrics, strategy, alpha, seed, wall)


def study_rows(metrics: list[dict], strategy: str, alpha: float, seed: int,
               wall: float) -> list[dict]:
    """The study's round rows of one run from the simulation's metrics rows: accuracy, bytes
    and emulated time (per round and cumulated), budgets, signals, what each device held and
    the experts each trained (``selected``: device -> expert ids), and the round's overlap and
    coverage of those sets (``selection``, :func:`server.rounds.selection_measures`)."""
    rows = []
    cum_bytes = cum_time = 0.0
    for m in metrics:
        if m["phase"] == "round":
            cum_bytes += m["bytes_in"]
            cum_time += m["round_s"]
        held = m.get("held", {})
        rows.append({"bench": "learning", "kind": "round", "strategy": strategy, "alpha": alpha,
                     "seed": seed, "round": m["round"], "accuracy": m.get("accuracy"),
                     "loss": m.get("loss"), "bytes_in": m.get("bytes_in", 0),
                     "cum_bytes_in": int(cum_bytes), "round_s": m.get("round_s", 0.0),
                     "cum_emulated_s": round(cum_time, 2), "wall_s": m.get("wall_s", 0.0),
                     "experts_updated": m.get("experts_updated", 0),
                     "budgets": m.get("budgets", {}), "signals": m.get("signals", {}),
                     "held": held, "run_wall_s": round(wall, 1),
                     "selected": {d: h["expert_ids"] for d, h in sorted(held.items())
                                  if "expert_ids" in h},
                     "selection": m.get("selection", {})})
    return rows


def selection_mean(rows: list[dict]) -> dict[str, float]:
    """Per measure of the rounds' ``selection`` (Jaccard overlap, overlap coefficient, union,
    coverage), its mean over the round rows that have it (a round with fewer than two
    clients has no overlap)."""
    out = {}
    for k in SELECTION:
        values = [v for r in rows if isinstance(v := (r.get("selection") or {}).get(k),
                                                (int, float))]
        if values:
            out[k] = round(statistics.fmean(values), 4)
    return out


# two-sided 95% Student t quantiles t_{0.975, df}
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t confidence interval (0 half-width for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, 0.0
    df = n - 1
    t = _T975.get(df) or _T975[max(k for k in _T975 if k <= df)]
    return mean, t * statistics.stdev(values) / n ** 0.5


def _reach(rounds: list[dict], target: float) -> dict | None:
    return next((r for r in rounds if r["round"] >= 0 and r["accuracy"] is not None
                 and r["accuracy"] >= target), None)


def summarize(rows: list[dict], strategies: Sequence[str], target: float | None,
              target_frac: float) -> list[dict]:
    out = []
    for alpha in dict.fromkeys(r["alpha"] for r in rows):
        seeds = sorted({r["seed"] for r in rows if r["alpha"] == alpha})

        def final(s: str, seed: int, alpha: float = alpha) -> dict:
            return max((r for r in rows if (r["alpha"], r["strategy"], r["seed"])
                        == (alpha, s, seed)), key=lambda r: r["round"])

        def tail(s: str, seed: int, alpha: float = alpha, n: int = 5) -> float:
            rs = sorted((r for r in rows if (r["alpha"], r["strategy"], r["seed"])
                         == (alpha, s, seed) and r["round"] >= 0), key=lambda r: r["round"])
            return statistics.fmean(r["accuracy"] for r in rs[-n:])

        ran = {(r["strategy"], r["seed"]) for r in rows if r["alpha"] == alpha}
        if target is not None:
            tgt = target
        elif "fedavg-full" in strategies:
            tgt = target_frac * statistics.mean(final("fedavg-full", sd)["accuracy"]
                                                for sd in seeds if ("fedavg-full", sd) in ran)
        else:
            tgt = target_frac * max(final(s, sd)["accuracy"] for s, sd in ran)
        for s in strategies:
            mine = [sd for sd in seeds if (s, sd) in ran]  # an arm may have fewer seeds
            if not mine:  # an arm run at another alpha only
                continue
            finals = [final(s, sd)["accuracy"] for sd in mine]
            initial = [r["accuracy"] for r in rows if (r["alpha"], r["strategy"]) == (alpha, s)
                       and r["round"] == -1]
            reached = []
            for sd in mine:
                rs = sorted((r for r in rows if (r["alpha"], r["strategy"], r["seed"])
                             == (alpha, s, sd)), key=lambda r: r["round"])
                hit = _reach(rs, tgt)
                if hit is not None:
                    reached.append(hit)
            tmean, thalf = ci95([tail(s, sd) for sd in mine])
            mean, half = ci95(finals)
            runs = [r for r in rows if (r["alpha"], r["strategy"]) == (alpha, s)
                    and r["round"] >= 0]
            signals = [r.get("signals") or {} for r in runs]
            row = {"bench": "learning", "kind": "summary", "strategy": s, "alpha": alpha,
                   "seeds": mine, "target_accuracy": round(tgt, 4),
                   "final_accuracy_ci95": [round(mean - half, 4), round(mean + half, 4)],
                   "last5_accuracy_mean": round(tmean, 4),
                   "last5_accuracy_ci95": [round(tmean - thalf, 4), round(tmean + thalf, 4)],
                   "signals_mean": {k: round(statistics.fmean(sg[k] for sg in signals
                                                              if k in sg), 4)
                                    for k in sorted({k for sg in signals for k in sg})},
                   "selection_mean": selection_mean(runs),
                   "initial_accuracy_mean": round(statistics.mean(initial), 4),
                   "final_accuracy_mean": round(statistics.mean(finals), 4),
                   "final_accuracy_std": round(statistics.pstdev(finals), 4),
                   "final_accuracy_spread": [round(min(finals), 4), round(max(finals), 4)],
                   "seeds_reaching_target": len(reached),
                   "bytes_total_mean": int(statistics.mean(final(s, sd)["cum_bytes_in"]
                                                           for sd in mine)),
                   "emulated_s_total_mean": round(statistics.mean(
                       final(s, sd)["cum_emulated_s"] for sd in mine), 1)}
            if reached:  # means over the seeds that reached the target
                row["rounds_to_target_mean"] = round(statistics.mean(r["round"] + 1
                                                                     for r in reached), 2)
                row["emulated_s_to_target_mean"] = round(statistics.mean(
                    r["cum_emulated_s"] for r in reached), 1)
                row["bytes_to_target_mean"] = int(statistics.mean(r["cum_bytes_in"]
                                                                  for r in reached))
            out.append(row)
        if "hfedmoe" in strategies:  # paired by seed: same partition, budgets and model init
            base = {sd: final("hfedmoe", sd)["accuracy"] for sd in seeds
                    if ("hfedmoe", sd) in ran}
            for r in out:
                if r["alpha"] == alpha and r["strategy"] != "hfedmoe":
                    both = [sd for sd in r["seeds"] if sd in base]
                    if not both:
                        continue
                    diffs = [base[sd] - final(r["strategy"], sd)["accuracy"] for sd in both]
                    mean, half = ci95(diffs)
                    r["hfedmoe_minus_this"] = round(mean, 4)
                    r["hfedmoe_minus_this_ci95"] = [round(mean - half, 4), round(mean + half, 4)]
                    diffs = [tail("hfedmoe", sd) - tail(r["strategy"], sd) for sd in both]
                    mean, half = ci95(diffs)
                    r["hfedmoe_minus_this_last5"] = round(mean, 4)
                    r["hfedmoe_minus_this_last5_ci95"] = [round(mean - half, 4),
                                                          round(mean + half, 4)]
        ref = next((r for r in out if r["alpha"] == alpha and r["strategy"] == "fedavg-full"),
                   None)
        for r in out:
            if r["alpha"] == alpha and ref:
                r["final_accuracy_vs_fedavg_full"] = round(
                    r["final_accuracy_mean"] / max(ref["final_accuracy_mean"], 1e-9), 3)
                r["bytes_total_vs_fedavg_full"] = round(
                    r["bytes_total_mean"] / max(ref["bytes_total_mean"], 1), 3)
    return out


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    alphas = list(dict.fromkeys(r["alpha"] for r in rows if r["kind"] == "round"))
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.2 * len(alphas), 3.2), squeeze=False)
    for ax, alpha in zip(axes[0], alphas, strict=True):
        for s in dict.fromkeys(r["strategy"] for r in rows if r["kind"] == "round"):
            rs = [r for r in rows if r["kind"] == "round" and r["alpha"] == alpha
                  and r["strategy"] == s and r["accuracy"] is not None]
            rounds = sorted({r["round"] for r in rs})
            means = [statistics.mean(r["accuracy"] for r in rs if r["round"] == k)
                     for k in rounds]
            ax.plot([k + 1 for k in rounds], means, "o-" if s.startswith("hfedmoe") else "s--",
                    label=s, markersize=3)
        ax.set_title(f"Dirichlet alpha = {alpha}", fontsize=9)
        ax.set_xlabel("round (0 = initial model)")
        ax.set_ylabel("held-out accuracy (mean over seeds)")
        ax.legend(fontsize=6)
    savefig(fig, path)


def _run_task(args: argparse.Namespace, strategy: str, alpha: float, seed: int,
              profiles: list[str], pins: dict[str, Any] | None) -> list[dict]:
    with pinned_costs(pins):
        return run_one(args, strategy, alpha, seed, profiles)


def run_all(args: argparse.Namespace, alphas: list[float], seeds: list[int],
            strategies: list[str], profiles: list[str], settings: dict[str, Any],
            env: dict[str, Any], pins: dict[str, Any] | None = None) -> list[dict]:
    """Every run, in (alpha, seed, strategy) order, ``args.jobs`` at a time (worker processes
    share the parent's pinned measurement); each run's rows are appended to ``args.out`` as
    soon as it ends, so a long study that stops early keeps its whole seeds."""
    tasks = [(alpha, seed, s) for alpha in alphas for seed in seeds for s in strategies]
    done: dict[tuple[float, int, str], list[dict]] = {}
    failed: dict[tuple[float, int, str], str] = {}

    def record(task: tuple[float, int, str], rs: list[dict], seconds: float) -> None:
        alpha, seed, s = task
        for r in rs:
            r.update(settings=settings, profiles=profiles)
        write_rows(args.out, rs, env, (pins or {}).get("descriptor"))
        done[task] = rs
        last = rs[-1]
        budgets = [last["budgets"][d] for d in sorted(last["budgets"])]
        print(f"  alpha={alpha} seed={seed} {s:<18} acc {rs[0]['accuracy']:.3f} -> "
              f"{last['accuracy']:.3f}  budgets {budgets}  {seconds:.0f}s", flush=True)

    if args.jobs <= 1:
        for task in tasks:
            t0 = time.perf_counter()
            record(task, _run_task(args, task[2], task[0], task[1], profiles, pins),
                   time.perf_counter() - t0)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            t0 = time.perf_counter()
            futures = {ex.submit(_run_task, args, s, alpha, seed, profiles, pins):
                       (alpha, seed, s) for alpha, seed, s in tasks}
            for fut in as_completed(futures):
                try:
                    rs = fut.result()
                except Exception as exc:  # one arm's failure must not hold up the others
                    failed[futures[fut]] = f"{type(exc).__name__}: {exc}"
                    print(f"  FAILED {futures[fut]}: {failed[futures[fut]]}", flush=True)
                    continue
                record(futures[fut], rs, time.perf_counter() - t0)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(tasks)} runs failed (the others' rows are "
                           f"in {args.out}): {failed}")
    return [r for task in tasks for r in done[task]]


def _ci(r: dict, key: str, sign: str = "") -> str:
    """``key`` (or ``key_mean``) with its ``key_ci95`` interval, or "-"."""
    value = r.get(key, r.get(f"{key}_mean"))
    if value is None:
        return "-"
    lo, hi = r[f"{key}_ci95"]
    return f"{value:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"


def print_summary(summary: list[dict]) -> None:
    print(table([[r["alpha"], r["strategy"], f"{r['initial_accuracy_mean']:.3f}",
                  _ci(r, "final_accuracy"),
                  _ci(r, "hfedmoe_minus_this", "+"), _ci(r, "last5_accuracy"),
                  _ci(r, "hfedmoe_minus_this_last5", "+"), r["target_accuracy"],
                  f"{r['seeds_reaching_target']}/{len(r['seeds'])}",
                  r.get("rounds_to_target_mean", "-"), r.get("emulated_s_to_target_mean", "-"),
                  f"{r['bytes_to_target_mean'] / 1e6:.0f}" if "bytes_to_target_mean" in r
                  else "-", f"{r['bytes_total_mean'] / 1e6:.0f}",
                  r.get("bytes_total_vs_fedavg_full", ""),
                  r.get("selection_mean", {}).get("jaccard", "-"),
                  r.get("selection_mean", {}).get("union", "-")] for r in summary],
                ["alpha", "strategy", "initial acc", "final acc [95% CI]",
                 "hfedmoe - this", "last-5 acc", "hfedmoe - this (last 5)", "target",
                 "reached", "rounds to tgt", "emul. s to tgt", "MB to tgt", "MB total",
                 "bytes x full", "Jaccard", "experts / round"]))


def summarize_stored(args: argparse.Namespace) -> int:
    """``--from-rows``: the summary of stored round rows (several files are merged, e.g. one
    per alpha or per batch of seeds), appended to ``--out`` and printed. Rows run with
    different settings (a learning-rate sweep in one file) are summarized apart, each summary
    row carrying its own settings."""
    import json

    from benchmarks._common import read_rows

    stored = [r for path in args.from_rows.split(",") for r in read_rows(path)
              if r.get("kind") == "round"]
    groups: dict[str, list[dict]] = {}
    for r in stored:
        groups.setdefault(json.dumps(r["settings"], sort_keys=True), []).append(r)
    summary: list[dict] = []
    for rows in groups.values():
        strategies = list(dict.fromkeys(r["strategy"] for r in rows))
        done = {(r["alpha"], r["seed"], r["strategy"]) for r in rows}  # runs with stored rows
        whole = {(a, sd) for a, sd, _ in done if all((a, sd, s) in done for s in strategies)}
        if not args.all_seeds:
            rows = [r for r in rows if (r["alpha"], r["seed"]) in whole]  # seeds every arm ran
        if not rows:
            continue
        part = summarize(rows, strategies, args.target, args.target_frac)
        for r in part:
            r.update(settings=rows[0]["settings"], profiles=rows[0]["profiles"],
                     from_rows=args.from_rows)
        summary += part
        print(f"settings: {rows[0]['settings']}")
    write_rows(args.out, summary, environment(benchmark="learning", device="cpu"))
    print_summary(summary)
    if args.out and len(groups) == 1:  # one curve per strategy: one setting's runs
        plot(stored, str(plot_path(args.out, "learning.png")))
    return 0


def build_parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="2 experts top-1, 3 devices, 2 rounds, 1 step, hfedmoe and fedavg-full")
    p.add_argument("--data", default="chatterbot", help="chatterbot, fortunes or a dataset file")
    p.add_argument("--alphas", default=None, help="comma list (default 0.5,0.1)")
    p.add_argument("--seeds", default=None, help="comma list (default 0,1)")
    p.add_argument("--strategies", default=None,
                   help=f"comma list (default {','.join(STUDY)}; also {','.join(STRATEGIES)}); "
                        "NAME+lora trains LoRA factors on the selected experts (train.adapter)")
    p.add_argument("--profiles", default=",".join(PROFILES), help="device profiles, cycled")
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--fraction", type=float, default=1.0,
                   help="share of the devices sampled each round (rounds.fraction, in (0, 1])")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--selection-batches", type=int, default=2,
                   help="batches of the round's routing pass (train.selection_batches)")
    p.add_argument("--lr", type=float, default=1e-3, help="experts and gates")
    p.add_argument("--head-lr", type=float, default=3e-2, help="the new head (0: --lr)")
    p.add_argument("--upcycle", default="moefy", help="copy, split or moefy (model.upcycle)")
    p.add_argument("--train-time-s", default="600",
                   help="compute window each device budgets for (emulated seconds), or auto")
    p.add_argument("--max-eval", type=int, default=0, help="held-out examples (0: all)")
    p.add_argument("--eval-every", type=int, default=1,
                   help="evaluate every N rounds and in each of the last 5 (eval_every)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="data.test_fraction")
    p.add_argument("--validation-fraction", type=float, default=0.0,
                   help="data.validation_fraction: a validation split held out of training")
    p.add_argument("--split", default="test", choices=("test", "validation"),
                   help="the split evaluated (data.eval_split): tune on validation")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"),
                   help="train.optimizer (sgd: an update's size follows its gradients)")
    p.add_argument("--budget-share", type=float, default=0.0,
                   help="rounds.budget_share: budgets as a share of the experts x the "
                        "profile's memory over the largest (0: the cost model and quotas)")
    p.add_argument("--emulate-reference", default="olmoe-1b-7b-0924",
                   help="rounds.emulate_reference: the model the profiles are scaled to with "
                        "--budget-share 0 ('': the model at its own size)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run (0: the CPU count divided by --jobs)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (worker processes)")
    p.add_argument("--target", type=float, default=None, help="target accuracy")
    p.add_argument("--target-frac", type=float, default=0.9)
    p.add_argument("--out", default=None, help="append JSON lines here (plot drawn next to it)")
    p.add_argument("--all-seeds", action="store_true",
                   help="with --from-rows: every stored run, also of seeds not every arm ran "
                        "(a sweep); paired differences over the seeds both arms ran")
    p.add_argument("--from-rows", default=None,
                   help="summarize stored round rows (comma list of files) instead of running")
    return p


COUNTS = ("devices", "rounds")  # 0 is a count that makes no sense, not "the default"


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the options left unset (or 0, besides :data:`COUNTS`): the study's values, or the
    quick run's."""
    q = args.quick
    defaults = dict(alphas="0.5" if q else "0.5,0.1", seeds="0" if q else "0,1,2,3,4",
                    strategies="hfedmoe,fedavg-full" if q else ",".join(STUDY),
                    devices=3 if q else 10, rounds=2 if q else 30, max_steps=1 if q else 2,
                    num_experts=2 if q else 8, top_k=1 if q else 2,
                    max_length=32 if q else 64, max_eval=32 if q else 0)
    for k, v in defaults.items():
        unset = getattr(args, k) is None or (getattr(args, k) == 0 and k not in COUNTS)
        if unset or (k == "max_eval" and q and args.max_eval == 0):
            setattr(args, k, v)
    if q and args.train_time_s == "600":
        args.train_time_s = "auto"
    if args.threads == 0 and args.jobs > 1:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)


def _numbers(text: str, kind: type, option: str) -> list[Any]:
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} wants a comma list of {kind.__name__}s, got {text!r}"
                          ) from None


def check_args(args: argparse.Namespace) -> tuple[list[float], list[int], list[str]]:
    """The study's alphas, seeds and strategies from ``args`` (defaults resolved); a setting
    that makes no sense is a :class:`~hfedmoe.errors.ConfigError` before anything runs."""
    alphas = _numbers(args.alphas, float, "--alphas")
    seeds = _numbers(args.seeds, int, "--seeds")
    strategies = args.strategies.split(",")
    problems = [
        (any(a <= 0 for a in alphas), f"--alphas must be > 0 (Dirichlet), got {args.alphas}"),
        (any(sd < 0 for sd in seeds), f"--seeds must be >= 0, got {args.seeds}"),
        (len(set(seeds)) < len(seeds), f"--seeds repeats a seed: {args.seeds}"),
        (args.devices < 1, f"--devices must be >= 1 (the clients), got {args.devices}"),
        (not 0 < args.fraction <= 1,
         f"--fraction (the share of the {args.devices} devices sampled each round) must be "
         f"in (0, 1], got {args.fraction}"),
        (args.rounds < 1, f"--rounds must be >= 1, got {args.rounds}"),
        (args.jobs < 1, f"--jobs must be >= 1, got {args.jobs}"),
        (args.threads < 0, f"--threads must be >= 0 (0: CPUs / jobs), got {args.threads}"),
        (args.max_eval < 0, f"--max-eval must be >= 0 (0: all), got {args.max_eval}"),
    ]
    problems += [
        (args.eval_every < 1, f"--eval-every must be >= 1, got {args.eval_every}"),
        (not 0 <= args.budget_share <= 1, f"--budget-share must be in [0, 1], got "
                                          f"{args.budget_share}"),
        (args.split == "validation" and args.validation_fraction <= 0,
         "--split validation needs --validation-fraction > 0"),
    ]
    bad = [msg for wrong, msg in problems if wrong]
    if bad:
        raise ConfigError("; ".join(bad))
    for s in strategies:
        strategy_spec(s)
    return alphas, seeds, strategies


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_rows:
        return summarize_stored(args)
    resolve_defaults(args)
    alphas, seeds, strategies = check_args(args)
    profile_names = args.profiles.split(",")
    profiles = [profile_names[i % len(profile_names)] for i in range(args.devices)]
    rows: list[dict] = []
    t_start = time.perf_counter()
    pins = measure_pins(args)
    if args.train_time_s == "auto":
        args.train_time_s, planned = auto_window(args, profiles, pins)
        print(f"train_time_s = {args.train_time_s} (auto); planned budgets {planned}")
    else:
        args.train_time_s = float(args.train_time_s)
        planned = planned_budgets(args, profiles, pins, args.train_time_s)
        print(f"train_time_s = {args.train_time_s}; planned budgets {planned}")
    settings = {k: getattr(args, k) for k in SETTINGS}
    env = environment(benchmark="learning", device="cpu")
    rows = run_all(args, alphas, seeds, strategies, profiles, settings, env, pins)
    summary = summarize(rows, strategies, args.target, args.target_frac)
    for r in summary:
        r.update(settings=settings, profiles=profiles,
                 benchmark_wall_s=round(time.perf_counter() - t_start, 1))
    write_rows(args.out, summary, env, pins["descriptor"])
    print(f"settings: {settings}; profiles {profiles}; seeds {seeds}")
    print_summary(summary)
    plot(rows, str(plot_path(args.out, "learning.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
