"""Benchmark: are HFedMoE's signals alive on a model, before any training?

Question: for each upcycling of the default model (``copy``: S identical experts and a fresh
router; ``moefy``: neurons clustered into experts with a fitted router), on the bundled data
split over ``--devices`` clients by Dirichlet(alpha), how often do IB ranking (Eq. 14) and
importance ranking (Eq. 5) choose different experts at a binding budget, how many experts fall
below tau (Eq. 17) per client, how much does usage u_c(e) (Eq. 16) differ across clients, and
how much do the gate weights alpha(c) (Eq. 20) differ? Each client runs the round's routing pass
(``device_agent.train.routing_pass``, its first ``--batches`` batches) on the initial model;
nothing is trained, so the numbers say what selection and aggregation have to work with in
round one.

    python -m benchmarks.signals [--quick] [--upcycles copy,moefy] [--alphas 0.5,0.1]
                                 [--betas 0.1,1] [--tau 0.01] [--devices 10] [--budget 12]
                                 [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from benchmarks._common import environment, model_descriptor, table, write_rows

SCALES = ("raw", "standardized")  # method.layer_scale


def measure(upcycle: str, alpha: float, args: argparse.Namespace) -> dict[str, Any]:
    from device_agent.train import round_batches, routing_pass
    from hfedmoe.aggregation import _summaries, gate_alphas
    from hfedmoe.config import DataConfig, MethodConfig, ModelConfig, TrainConfig
    from hfedmoe.data import load_task
    from hfedmoe.models.registry import build_model
    from hfedmoe.selection import select_experts
    from hfedmoe.signals import ranking_disagreement, round_signals
    from hfedmoe.update import SparseUpdate

    task = load_task(DataConfig(alpha=alpha, seed=args.seed))
    cfg = ModelConfig(upcycle=upcycle, num_experts=args.num_experts, top_k=args.top_k,
                      max_length=args.max_length, name=args.model)
    model = build_model(cfg, "classification", task.num_labels)
    mcfg = MethodConfig(tau=args.tau, beta=args.beta)
    train = TrainConfig(batch_size=8)
    usage, dis, reports, updates = {}, {}, {}, []
    picks: dict[str, list[int]] = {scale: [0] * model.num_layers for scale in SCALES}
    for i, shard in enumerate(task.client_datasets(args.devices)):
        if len(shard) == 0:
            continue
        batches = round_batches(shard, train, args.seed, 0)[: args.batches]
        stats = routing_pass(model, shard, batches, mcfg, train, args.max_length)
        client = f"c{i}"
        for scale in SCALES:  # which layers a budget of --budget experts lands in
            sel = select_experts(stats, args.budget, replace(mcfg, layer_scale=scale))
            for e in sel.experts:
                picks[scale][e.layer_idx] += 1
        usage[client] = dict(stats.usage)
        dis[client] = ranking_disagreement(stats.scores("ib"), stats.scores("importance"),
                                           args.budget)
        updates.append(SparseUpdate("s", 0, client, len(shard), {}, usage=dict(stats.usage),
                                    importance=dict(stats.importance),
                                    routed=stats.routed, updated=stats.routed))
        below = {e for e, u in stats.usage.items() if u < args.tau}
        reports[client] = {"updated": sorted(map(str, stats.routed)),
                           "aggregated": sorted(map(str, stats.routed - below))}
    alphas = gate_alphas(list(_summaries(updates, args.tau).values()))
    for client, a in alphas.items():
        reports[client]["alpha"] = a
    sig = round_signals(reports, usage, dis, args.tau)
    sig["clients_with_disagreement"] = sum(1 for v in dis.values() if v > 0)
    sig["clients"] = len(usage)
    sig["ib_disagreement_max"] = max(dis.values(), default=0.0)
    for scale, counts in picks.items():  # share of all picks that went to each layer
        total = max(sum(counts), 1)
        sig[f"layer_share_{scale}"] = [round(c / total, 3) for c in counts]
    return {"descriptor": model_descriptor(cfg, train, built=model, lr=None, head_lr=None),
            "bench": "signals", "upcycle": upcycle, "alpha": alpha, "budget": args.budget,
            "tau": args.tau, "beta": args.beta, "devices": args.devices, "batches": args.batches, **sig}


def _shares(shares: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in shares)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny family, 3 devices, 1 batch")
    p.add_argument("--upcycles", default="copy,moefy")
    p.add_argument("--alphas", default="0.5,0.1")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--budget", type=int, default=12, help="C for the IB/importance comparison")
    p.add_argument("--batches", type=int, default=4, help="routing-pass batches per client")
    p.add_argument("--tau", type=float, default=0.01)
    p.add_argument("--betas", default="0.1", help="comma list of Eq. 14's beta")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.model = "minilm-moe"
    if args.quick:
        args.devices, args.batches, args.budget = 3, 1, 2
        args.num_experts, args.top_k, args.max_length = 4, 1, 32
    rows = []
    for beta in args.betas.split(","):
        args.beta = float(beta)
        rows += [measure(u, float(a), args) for u in args.upcycles.split(",")
                 for a in args.alphas.split(",")]
    write_rows(args.out, rows, environment(benchmark="signals"))
    print(table([[r["upcycle"], r["alpha"], r["beta"], r["tau"], f"{r['ib_disagreement']:.3f}",
                  f"{r['clients_with_disagreement']}/{r['clients']}",
                  f"{r['below_tau']:.3f}", r["tau_removed"], f"{r['usage_spread']:.4f}",
                  f"[{r['usage_min']:.3f}, {r['usage_max']:.3f}]",
                  f"{r['alpha_cv']:.3f}", _shares(r["layer_share_raw"]),
                  _shares(r["layer_share_standardized"])] for r in rows],
                ["upcycle", "alpha", "beta", "tau", f"IB vs s_b (C={args.budget})", "clients differing",
                 "share < tau", "experts < tau", "usage spread", "usage range",
                 "alpha CV", "layer shares raw", "standardized"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
