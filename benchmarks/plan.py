"""Plan every shipped example model (``examples/models``) for every shipped device profile:
one JSON line per (model, profile, mode) budget, from ``config.json`` alone (no weights).

    python -m benchmarks.plan --out benchmarks/results/plan.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._common import environment, write_rows
from device_agent.budget import tokens_per_expert
from device_agent.plan import plan_costs, time_expert
from device_agent.profiles import list_profiles, load_profile
from device_agent.resources import probe_device
from hfedmoe.models.plan import build_meta_model, plan_model

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples" / "models"


def example_dirs() -> list[Path]:
    return sorted(p for p in EXAMPLES_DIR.iterdir() if (p / "config.json").is_file())


def main(argv: list[str] | None = None) -> int:
    """Plan every shipped example for every shipped profile; one JSON line per mode."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default="benchmarks/results/plan.jsonl")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--deadline", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profiles", nargs="*", default=None)
    args = ap.parse_args(argv)
    host = probe_device(matmul_seconds=0.5)
    env = environment()
    for d in example_dirs():
        model = build_meta_model(d)
        plan = plan_model(model)
        layer = model.layers[0]
        times = time_expert(model, tokens_per_expert(args.batch, args.seq, layer.top_k,
                                                     layer.num_experts))
        rows = []
        for prof in args.profiles or list_profiles():
            report = load_profile(prof)
            costs = plan_costs(model, report, args.batch, args.seq, args.deadline, args.steps,
                               host=host, times=times)
            for name, m in costs["modes"].items():
                b = m["budget"]
                rows.append({"model": d.name, "profile": prof, "mode": name,
                             "adapter": m["adapter"], "base": m["base"],
                             "total_params": plan["total_params"],
                             "active_params_per_token": plan["active_params_per_token"],
                             "params_per_expert": plan["params_per_expert"][0],
                             "num_experts": b["cost"]["num_experts"],
                             "weight_bytes": m["weight_bytes"],
                             "per_trained_expert_bytes": m["per_trained_expert_bytes"],
                             "c_budget": b["c_budget"], "limit": b["limit"],
                             "reason": b["reason"], "memory_max": b["memory_max"],
                             "time_max": b["time_max"], "step_seconds": b["step_seconds"],
                             "peak_bytes": b["peak_bytes"], "batch": args.batch,
                             "seq": args.seq, "deadline": args.deadline, "steps": args.steps,
                             "expert_seconds": times, "tokens_per_expert":
                             costs["tokens_per_expert"]})
        write_rows(args.out, rows, env)
        print(f"{d.name}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
