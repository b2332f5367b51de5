"""Benchmark: poisoning devices among 10, with and without the server's bounded-update defences.

Question: when one registered device (or a few) sends scaled or sign-flipped deltas, how far
does the global model's final held-out accuracy move, and how much of that do the server's
defences (docs/deployment.md, "Bounded updates") take back: the per-update and per-expert norm
bounds (``policy.max_update_norm``, ``policy.max_expert_norm``, clipped or rejected), the
robust aggregation options (``aggregation.robust = "trimmed-mean"`` or ``"norm-bounded"``) and
all of them together? The issue's target: with the defences on, one attacker among 10 devices
moves final accuracy by at most 1 point against no attack.

Runs: :func:`lab.simulate.simulate` at the demo's settings (``hfedmoe demo``: the MoEfied MiniLM,
8 experts per layer, top-2, 64 tokens, batch 8, budgets planned from the demo's profiles at
OLMoE-1B-7B's emulation scale for a 15-minute window, bf16 deltas on the wire), 10 devices all
taking part, the bundled ChatterBot corpus with Dirichlet alpha 0.5, ``--rounds`` rounds (3,
the demo's) of ``--max-steps`` local steps (3; the demo trains one local epoch, about 7 steps
of a device's shard: shortened so that the benchmark fits its time). The attackers (:mod:`lab.attacks`) are the devices with the
largest planned budgets (most experts trained, so some only they train); each multiplies every
delta of its update (experts, gates, the shared head) by the attack's factor before encoding.

Bounds: chosen from an honest run on a calibration seed that no arm uses (``--calib-seed``):
``--margin`` x the largest update norm and the largest per-expert norm any device sent in it
(the norms every round row keeps in ``held``), as an operator would choose them from a trial.

Arms per attack: ``none`` (no defence), ``clip`` (both bounds, clipped), ``reject`` (both
bounds, refused), ``trimmed-mean``, ``norm-bounded``, ``all`` (bounds clipped + trimmed mean);
and without attack: ``none`` and ``all`` (what the defences cost an honest federation).

Statistics: per arm the mean final accuracy over seeds with a 95% t interval, the paired
difference to the no-attack, no-defence run of the same seed (same partition, budgets and
initial model) with its interval, and for the arms whose defences also ran without attack, the
paired difference to that run (what the attack still does with the defences on; the defences
themselves move an honest federation's accuracy too).

    python -m benchmarks.poisoning [--quick] [--seeds 0,1,2] [--attacks scale:10,sign-flip:10]
                                   [--attackers 1] [--arms none,clip,...] [--out FILE]
    python -m benchmarks.poisoning --from-rows FILE --out FILE   # summarize stored runs again
    python -m benchmarks.poisoning --data fortunes --seeds 0,1,2,3,4 --arms all \
        --rounds 5 --max-steps 5 --max-eval 1500 --out benchmarks/results/poisoning-fortunes.jsonl

The default (36 runs and a calibration run) takes about 20 to 40 minutes with
``OMP_NUM_THREADS=1`` on one core of a shared machine; ``--quick`` is the test's short run (4 devices, one
round of one step, one seed, the x10 attack against the bounds refusing it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import command_line, environment, model_descriptor, write_rows
from benchmarks.learning import ci95

OUT = "benchmarks/results/poisoning.jsonl"
DEFENCES = ("none", "clip", "reject", "trimmed-mean", "norm-bounded", "all")
TARGET_PT = 1.0  # the bound on the move of final accuracy, in points


def server_config(args: argparse.Namespace, seed: int, run_dir: str, defence: str = "none",
                  bounds: dict[str, float] | None = None) -> Any:
    """The demo's server settings (lab.launch.DEMO_SERVER) for a simulation, with the arm's
    defences."""
    from hfedmoe.config import DataConfig, MethodConfig, ModelConfig, TrainConfig
    from hfedmoe.wire import WireConfig
    from lab.launch import DEMO_REFERENCE, DEMO_WINDOW_S
    from server.config import AggregationConfig, PolicyConfig, RoundConfig, ServerConfig

    policy, aggregation = PolicyConfig(), AggregationConfig()
    if defence in ("clip", "reject", "all"):
        b = bounds or {}
        policy = PolicyConfig(max_update_norm=b.get("max_update_norm", 0.0),
                              max_expert_norm=b.get("max_expert_norm", 0.0),
                              on_norm_violation="reject" if defence == "reject" else "clip")
    if defence in ("trimmed-mean", "norm-bounded", "all"):
        aggregation = AggregationConfig(
            robust="norm-bounded" if defence == "norm-bounded" else "trimmed-mean",
            trim_fraction=args.trim_fraction)
    return ServerConfig(
        run_id="poison", run_dir=run_dir, max_eval_examples=args.max_eval,
        model=ModelConfig(max_length=64, seed=seed),
        data=DataConfig(source=args.data, alpha=0.5, seed=seed),
        method=MethodConfig(strategy="hfedmoe", seed=seed),
        train=TrainConfig(batch_size=8, local_epochs=1, threads=1, max_steps=args.max_steps),
        rounds=RoundConfig(rounds=args.rounds, train_time_s=DEMO_WINDOW_S,
                           deadline_s=DEMO_WINDOW_S, seed=seed,
                           emulate_reference=DEMO_REFERENCE),
        wire=WireConfig(dtype="bfloat16"), policy=policy, aggregation=aggregation)


def profiles(n: int) -> list[str]:
    from lab.launch import DEMO_PROFILES

    return [DEMO_PROFILES[i % len(DEMO_PROFILES)] for i in range(n)]


def run_one(args: argparse.Namespace, seed: int, defence: str, attack: Any,
            bounds: dict[str, float] | None, calibration: Any) -> list[dict[str, Any]]:
    """One simulation; its metrics rows."""
    from lab.simulate import simulate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = server_config(args, seed, str(Path(tmp) / "run"), defence, bounds)
        return simulate(cfg, args.devices, profiles(args.devices), calibration=calibration,
                        attack=attack)


def honest_bounds(rows: Sequence[dict[str, Any]], margin: float) -> dict[str, float]:
    """``margin`` x the largest update norm and per-expert norm in the rows' ``held``."""
    held = [h for r in rows if r.get("phase") == "round" for h in r["held"].values()]
    return {"max_update_norm": round(margin * max(h["norm"] for h in held), 4),
            "max_expert_norm": round(margin * max(h["max_expert_norm"] for h in held), 4)}


def attackers_of(rows: Sequence[dict[str, Any]], count: int) -> list[int]:
    """The indices of the ``count`` devices with the largest budgets (ties: lower index)."""
    budgets = rows[-1]["budgets"]
    ids = sorted(budgets)  # "sim000-...", in index order
    order = sorted(range(len(ids)), key=lambda i: (-budgets[ids[i]], i))
    return sorted(order[:count])


def run_row(rows: list[dict[str, Any]], *, seed: int, attack: str, attackers: list[int],
            defence: str, wall: float) -> dict[str, Any]:
    rounds = [r for r in rows if r.get("phase") == "round"]
    return {"bench": "poisoning", "kind": "run", "seed": seed, "attack": attack,
            "attackers": len(attackers) if attack != "none" else 0,
            "attacker_ids": attackers if attack != "none" else [], "defence": defence,
            "final_accuracy": rounds[-1]["accuracy"],
            "accuracy": [r.get("accuracy") for r in rows],
            "rejected": sum(r.get("rejected", 0) for r in rounds), "wall_s": round(wall, 1)}


def _paired(arm: Sequence[dict[str, Any]], base: dict[int, float]) -> tuple[float, float] | None:
    """Mean and 95% half-width, in points, of the arm's final accuracy minus ``base`` by seed."""
    diffs = [r["final_accuracy"] - base[r["seed"]] for r in arm if r["seed"] in base]
    if not diffs:
        return None
    mean, half = ci95(diffs)
    return round(100 * mean, 2), round(100 * half, 2)


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (attack, attackers, defence): mean final accuracy with its 95% interval, the paired
    difference to the no-attack, no-defence run of each seed (``diff_pt``, the issue's
    comparison) and to the no-attack run with the same defences where there is one
    (``same_defence_pt``: what the attack still does once the defences are on)."""
    def base_of(defence: str) -> dict[int, float]:
        return {r["seed"]: r["final_accuracy"] for r in runs
                if r["attack"] == "none" and r["defence"] == defence}

    base = base_of("none")
    out = []
    for key in dict.fromkeys((r["attack"], r["attackers"], r["defence"]) for r in runs):
        arm = [r for r in runs if (r["attack"], r["attackers"], r["defence"]) == key]
        mean, half = ci95([r["final_accuracy"] for r in arm])
        row = {"bench": "poisoning", "kind": "summary", "attack": key[0], "attackers": key[1],
               "defence": key[2], "seeds": sorted(r["seed"] for r in arm),
               "final_accuracy": round(mean, 4), "ci95": round(half, 4),
               "rejected": sum(r["rejected"] for r in arm)}
        paired = _paired(arm, base)
        if paired is not None:
            row.update(diff_pt=paired[0], diff_ci95_pt=paired[1],
                       within_target=abs(paired[0]) <= TARGET_PT)
        same = (_paired(arm, base_of(key[2])) if "none" not in (key[0], key[2]) else None)
        if same is not None:
            row.update(same_defence_pt=same[0], same_defence_ci95_pt=same[1])
        out.append(row)
    return out


def arms(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(attack spec or "none", defence) in the order they run."""
    honest = [("none", d) for d in ("none", "all") if d in args.arms or d == "none"]
    return honest + [(a, d) for a in args.attacks for d in args.arms]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the test's short run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--calib-seed", type=int, default=100,
                   help="the honest run the norm bounds are chosen from (no arm uses it)")
    p.add_argument("--margin", type=float, default=1.5,
                   help="bounds = this x the largest honest norms of the calibration run")
    p.add_argument("--attacks", default="scale:10,sign-flip:10")
    p.add_argument("--attackers", type=int, default=1)
    p.add_argument("--arms", default="none,clip,trimmed-mean,norm-bounded,all",
                   help=f"defences per attack, among {','.join(DEFENCES)}")
    p.add_argument("--trim-fraction", type=float, default=0.1)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=3,
                   help="local steps a round (0: one local epoch, as the demo)")
    p.add_argument("--max-eval", type=int, default=0, help="0: the whole test split")
    p.add_argument("--data", default="chatterbot",
                   help="the data source (data.source): chatterbot, the bundled corpus, or "
                        "fortunes, whose larger test split resolves smaller differences")
    p.add_argument("--out", default=OUT)
    p.add_argument("--from-rows", default="",
                   help="summarize the run rows of this file again (no run) into --out")
    return p


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from hfedmoe.errors import ConfigError
    from lab.attacks import parse_attack

    args = build_parser().parse_args(argv)
    if args.quick:
        args.seeds, args.devices, args.rounds, args.max_steps = "0", 4, 1, 1
        args.attacks, args.arms = "scale:10", "reject"
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in args.attacks:
        parse_attack(a, [0])  # a ConfigError now, not after the calibration
    bad = [a for a in args.arms if a not in DEFENCES]
    if bad or not args.seeds or args.calib_seed in args.seeds:
        raise ConfigError(f"arms must be among {DEFENCES} (got {bad}), seeds non-empty and "
                          f"the calibration seed not among them")
    if not 1 <= args.attackers < args.devices or args.margin <= 0:
        raise ConfigError("--attackers must be in [1, devices) and --margin > 0")
    return args


def calibrate_run(args: argparse.Namespace) -> tuple[Any, dict[str, float], list[int]]:
    """The budgets' calibration, the norm bounds and the attackers, from one honest run."""
    from lab.devices import calibrate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = server_config(args, args.calib_seed, str(Path(tmp) / "run"))
        calibration = calibrate(cfg)
    rows = run_one(args, args.calib_seed, "none", None, None, calibration)
    return calibration, honest_bounds(rows, args.margin), attackers_of(rows, args.attackers)


def resummarize(args: argparse.Namespace, env: dict[str, Any]) -> int:
    """``--from-rows``: the summaries of the stored run rows, appended to ``--out``."""
    from benchmarks._common import read_rows

    rows = read_rows(args.from_rows)
    runs = [r for r in rows if r.get("kind") == "run"]
    calib = [r for r in rows if r.get("kind") == "calibration"][-1]
    summary = summarize(runs)
    write_rows(args.out, [{**s, "bounds": calib["bounds"]} for s in summary], env,
               runs[-1].get("descriptor"))
    print_summary(summary)
    return 0


def print_summary(summary: Sequence[dict[str, Any]]) -> None:
    for s in summary:
        diff = (f"{s['diff_pt']:+.2f} pt +/- {s['diff_ci95_pt']:.2f}" if "diff_pt" in s else "")
        same = (f"; same defences {s['same_defence_pt']:+.2f} pt +/- "
                f"{s['same_defence_ci95_pt']:.2f}" if "same_defence_pt" in s else "")
        print(f"{s['attack']:>14} x{s['attackers']} {s['defence']:>13}: "
              f"{s['final_accuracy']:.4f} +/- {s['ci95']:.4f}  vs no attack {diff}{same}")


def main(argv: Sequence[str] | None = None) -> int:
    from lab.attacks import parse_attack

    args = parse(argv)
    env = environment(command=command_line(argv))
    if args.from_rows:
        return resummarize(args, env)
    t0 = time.perf_counter()
    calibration, bounds, attackers = calibrate_run(args)
    cfg = server_config(args, 0, "unused")
    descriptor = model_descriptor(cfg.model, cfg.train, devices=args.devices,
                                  rounds=args.rounds, data=args.data,
                                  max_steps=args.max_steps)
    print(f"bounds (x{args.margin:g} the honest maxima of seed {args.calib_seed}): {bounds}; "
          f"attackers: {attackers}", flush=True)
    write_rows(args.out, [{"bench": "poisoning", "kind": "calibration", "bounds": bounds,
                           "margin": args.margin, "calib_seed": args.calib_seed,
                           "attacker_ids": attackers}], env, descriptor)
    runs = []
    for attack_spec, defence in arms(args):
        attack = None if attack_spec == "none" else parse_attack(attack_spec, attackers)
        for seed in args.seeds:
            t = time.perf_counter()
            rows = run_one(args, seed, defence, attack, bounds, calibration)
            row = run_row(rows, seed=seed, attack=attack_spec, attackers=attackers,
                          defence=defence, wall=time.perf_counter() - t)
            runs.append(row)
            write_rows(args.out, [row], env, descriptor)
            print(f"{attack_spec:>14} {defence:>13} seed {seed}: final accuracy "
                  f"{row['final_accuracy']:.4f}, rejected {row['rejected']}, "
                  f"{row['wall_s']:.0f}s", flush=True)
    summary = summarize(runs)
    write_rows(args.out, [{**s, "bounds": bounds} for s in summary], env, descriptor)
    print_summary(summary)
    print(f"{len(runs) + 1} runs in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
