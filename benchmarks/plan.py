"""Plan every shipped example model (``examples/models``) for every shipped device profile:
one JSON line per (model, profile, mode) budget, from ``config.json`` alone (no weights) and
the profile's rates (no timing: the rows are the same on any machine).

    python -m benchmarks.plan --out benchmarks/results/plan.jsonl [--window 10] [--steps 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks._common import environment, write_rows
from device_agent.budget import DEFAULT_MEMORY_MARGIN
from device_agent.plan import plan_costs
from device_agent.profiles import list_profiles, load_profile
from hfedmoe.models.plan import build_meta_model, plan_model

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples" / "models"


def example_dirs() -> list[Path]:
    return sorted(p for p in EXAMPLES_DIR.iterdir() if (p / "config.json").is_file())


def mode_row(model: str, profile: str, name: str, m: dict[str, Any], plan: dict[str, Any],
             args: argparse.Namespace) -> dict[str, Any]:
    """One (model, profile, mode) row: the budget and what limited it, or why the device
    cannot run the mode."""
    row = {"model": model, "profile": profile, "mode": name, "adapter": m["adapter"],
           "base": m["base"], "dtype": m["dtype"], "total_params": plan["total_params"],
           "active_params_per_token": plan["active_params_per_token"],
           "params_per_expert": plan["params_per_expert"][0],
           "num_experts": sum(plan["experts_per_layer"]), "weight_bytes": m["weight_bytes"],
           "per_trained_expert_bytes": m["per_trained_expert_bytes"], "runnable": m["runnable"],
           "batch": args.batch, "seq": args.seq, "window_min": args.window,
           "steps": args.steps, "margin": args.margin}
    if not m["runnable"]:
        return {**row, "c_budget": None, "limit": "dtype", "reason": m["reason"]}
    b = m["budget"]
    return {**row, "c_budget": b["c_budget"], "limit": b["limit"], "reason": b["reason"],
            "memory_max": b["memory_max"], "time_max": b["time_max"],
            "step_seconds": b["step_seconds"], "round_seconds": b["round_seconds"],
            "planned_steps": b["steps"], "peak_bytes": b["peak_bytes"]}


def main(argv: list[str] | None = None) -> int:
    """Plan every shipped example for every shipped profile; one JSON line per mode."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default="benchmarks/results/plan.jsonl")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--window", type=float, default=10.0, help="training window, minutes")
    ap.add_argument("--steps", type=int, default=10, help="local steps per round")
    ap.add_argument("--margin", type=float, default=DEFAULT_MEMORY_MARGIN)
    ap.add_argument("--profiles", nargs="*", default=None)
    args = ap.parse_args(argv)
    env = environment()
    for d in example_dirs():
        model = build_meta_model(d)
        plan = plan_model(model)
        rows = []
        for prof in args.profiles or list_profiles():
            costs = plan_costs(model, load_profile(prof), args.batch, args.seq,
                               args.window * 60.0, args.steps, margin=args.margin)
            rows += [mode_row(d.name, prof, name, m, plan, args)
                     for name, m in costs["modes"].items()]
        write_rows(args.out, rows, env)
        print(f"{d.name}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
