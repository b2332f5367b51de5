"""Benchmark Q3: bytes a device uploads per round, per strategy, vs dense FedAvg.

Question: how many bytes does one round's update cost on the wire for each strategy (HFedMoE,
its two ablations, FedMoE, FedAvg with a random budget) at a given expert budget, next to dense
FedAvg (every trainable parameter: all experts, gates and the head), for each wire dtype
(fp32, bf16, fp16) with zstd on and off? The updates are real: one ``train_round`` per strategy
on the same device shard from the same global model, encoded with ``hfedmoe.wire``. Ratios are
against fedavg-full in fp32 without compression. Note that an update holds the *union* of the
experts trained over the round's batches, so it can exceed the per-batch budget.

Each run is made with whole-expert fine-tuning (``train.adapter = "full"``) and with LoRA
factors on the selected experts (``"lora"``, rank ``--lora-rank``), on the same shard, model
and budget; the table gives LoRA's bytes as a share of the full update's at equal C.

    python -m benchmarks.comm [--quick] [--budgets 6,12,24] [--max-steps 5]
                              [--adapters full,lora] [--lora-rank 8] [--plan | --plan-only]
                              [--out r.jsonl]

``--plan`` adds one expert's update at the expert shapes of real MoE models (Switch-base-64,
OLMoE-1B-7B, Qwen1.5-MoE-A2.7B, DeepSeek-V2-Lite, gpt-oss-20b; from their published configs),
whole expert vs LoRA factors, encoded with the kit's wire format.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from benchmarks._common import (
    environment,
    model_descriptor,
    plot_path,
    pyplot,
    savefig,
    table,
    write_rows,
)

STRATEGIES = ("hfedmoe", "hfedmoe-importance", "hfedmoe-uniform", "fedmoe", "fedavg-random",
              "fedavg-full")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
WIRES = [(d, c) for d in ("float32", "bfloat16", "float16") for c in (False, True)]


def measure(model_cfg: dict, budgets: list[int], max_steps: int, batch_size: int, lr: float,
            seed: int, strategies: Sequence[str] = STRATEGIES,
            adapters: Sequence[str] = ("full",), lora_rank: int = 8) -> list[dict]:
    import torch

    from device_agent.train import RoundContext, RoundIds, train_round, usage_profile
    from hfedmoe.config import DataConfig, MethodConfig, ModelConfig, TrainConfig
    from hfedmoe.data import load_task
    from hfedmoe.models.registry import build_model
    from hfedmoe.names import parse_key
    from hfedmoe.strategies import get_strategy
    from hfedmoe.wire import WireConfig, encode

    torch.manual_seed(seed)
    mcfg = ModelConfig(**model_cfg, seed=seed)
    task = load_task(DataConfig(seed=seed))
    shards = task.client_datasets(6)
    shard = max(shards, key=len)  # enough data for max_steps batches
    model = build_model(mcfg, "classification", task.num_labels)
    descriptor = model_descriptor(mcfg, built=model, batch_size=batch_size, lr=lr)
    initial = model.state()
    dense_params = sum(t.numel() for t in initial.values())
    num_experts = len(model.expert_ids())
    rows = []
    for name, adapter in ((n, a) for n in strategies for a in adapters):
        tcfg = TrainConfig(batch_size=batch_size, lr=lr, max_steps=max_steps, adapter=adapter,
                           lora_rank=lora_rank, lora_alpha=2.0 * lora_rank)
        method = MethodConfig(strategy=name, seed=seed)
        strategy = get_strategy(name, method)
        for budget in (budgets if strategy.uses_budget else [num_experts]):
            model.load_state(initial)
            assignment = None
            if strategy.needs_assignment:
                usage = usage_profile(model, shard, strategy, batch_size, mcfg.max_length)
                assignment = strategy.assign(usage, budget)
            t0 = time.perf_counter()
            res = train_round(RoundContext(
                model, shard, strategy=strategy, budget=budget, train=tcfg, method=method,
                ids=RoundIds(round_idx=0, client_id="dev0"), max_length=mcfg.max_length,
                assignment=assignment))
            train_s = time.perf_counter() - t0
            upd = res.update
            experts = {parse_key(k).expert for k in upd.deltas} - {None}
            params = sum(t.numel() for t in upd.deltas.values())
            for dtype, compress in WIRES:
                t0 = time.perf_counter()
                blob = encode(upd, method.tau, WireConfig(dtype=dtype, compress=compress))
                rows.append({
                    "descriptor": descriptor, "bench": "comm", "strategy": name, "budget": budget, "adapter": adapter,
                    "lora_rank": lora_rank if adapter == "lora" else 0,
                    "expert_params_in_update": sum(
                        t.numel() for k, t in upd.deltas.items()
                        if parse_key(k).kind == "expert"),
                    "num_experts": num_experts, "experts_in_update": len(experts),
                    "aggregated_experts": len(upd.aggregated(method.tau)),
                    "steps": res.steps, "params_in_update": params,
                    "dense_params": dense_params, "wire_dtype": dtype, "zstd": compress,
                    "bytes": len(blob), "encode_s": round(time.perf_counter() - t0, 4),
                    "train_s": round(train_s, 2)})
    base = next(r["bytes"] for r in rows if r["strategy"] == "fedavg-full"
                and r["adapter"] == "full" and r["wire_dtype"] == "float32" and not r["zstd"])
    for r in rows:
        r["ratio_vs_dense_fp32"] = round(r["bytes"] / base, 4)
        full = next((f for f in rows if f["adapter"] == "full" and
                     (f["strategy"], f["budget"], f["wire_dtype"], f["zstd"])
                     == (r["strategy"], r["budget"], r["wire_dtype"], r["zstd"])), None)
        if r["adapter"] == "lora" and full is not None:
            r["lora_vs_full_bytes"] = round(r["bytes"] / full["bytes"], 4)
            r["lora_vs_full_expert_params"] = round(
                r["expert_params_in_update"] / max(full["expert_params_in_update"], 1), 4)
    return rows


# Expert shapes of real MoE models, from their published config.json (hidden_size, the
# per-expert intermediate size, gated or not, expert biases): what a phone- or Jetson-class
# fine-tune sends per selected expert. The default model's experts (384 x 192) are far smaller.
PLANNED = {
    "switch-base-64": (768, 3072, False, False),  # the paper's model (T5 FFN, ReLU)
    "olmoe-1b-7b": (2048, 1024, True, False),
    "qwen1.5-moe-a2.7b": (2048, 1408, True, False),
    "deepseek-v2-lite": (2048, 1408, True, False),
    "gpt-oss-20b": (2880, 2880, True, True),
}


def planned(rank: int, names: Sequence[str] = tuple(PLANNED)) -> list[dict]:
    """Bytes of one expert's update for real model shapes, whole expert vs LoRA factors.

    Real encodes through ``hfedmoe.wire`` of one expert's dense delta (``w_in``, ``w_out`` and
    biases) and of its rank-``rank`` factors (plus the same biases), random values, every wire
    dtype without zstd (random values do not compress). A round's update is C times this plus
    the gates and head, which are the same in both modes.
    """
    import torch

    from hfedmoe.experts import ExpertShape
    from hfedmoe.lora import factor_keys
    from hfedmoe.names import ExpertId, expert_key
    from hfedmoe.update import SparseUpdate
    from hfedmoe.wire import WireConfig, encode

    e = ExpertId(0, 0)
    rows = []
    for name in names:
        d_model, d_ff, gated, bias = PLANNED[name]
        shape = ExpertShape(d_model, d_ff, "silu" if gated else "relu", gated, bias)
        d_in = d_ff * (2 if gated else 1)
        weights = {"w_in": (d_in, d_model), "w_out": (d_model, d_ff)}
        biases = {"b_in": (d_in,), "b_out": (d_model,)} if bias else {}
        full = {expert_key(0, 0, n): torch.randn(s) for n, s in {**weights, **biases}.items()}
        lora = {expert_key(0, 0, n): torch.randn(s) for n, s in biases.items()}
        for n, (out_f, in_f) in weights.items():
            a, b = factor_keys(expert_key(0, 0, n))
            lora[a], lora[b] = torch.randn(rank, in_f), torch.randn(out_f, rank)
        for dtype in ("float32", "bfloat16"):
            sizes = {}
            for adapter, deltas in (("full", full), ("lora", lora)):
                upd = SparseUpdate("plan", 0, "dev0", 1, deltas, usage={e: 1.0},
                                   importance={e: 1.0}, routed=frozenset({e}),
                                   updated=frozenset({e}))
                sizes[adapter] = len(encode(upd, 0.0, WireConfig(dtype=dtype, compress=False)))
            rows.append({"bench": "comm", "kind": "planned", "model": name, "d_model": d_model,
                         "d_ff": d_ff, "gated": gated, "bias": bias, "lora_rank": rank,
                         "params_per_expert": shape.params_per_expert,
                         "wire_dtype": dtype, "full_expert_bytes": sizes["full"],
                         "lora_expert_bytes": sizes["lora"],
                         "lora_vs_full_bytes": round(sizes["lora"] / sizes["full"], 4)})
        del full, lora
    return rows


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    rows = [r for r in rows if r.get("adapter", "full") == "full"]
    runs = list(dict.fromkeys((r["strategy"], r["budget"]) for r in rows))
    wires = [("float32", False), ("bfloat16", False), ("bfloat16", True), ("float16", True)]
    width = 0.8 / len(wires)
    for j, (dtype, z) in enumerate(wires):
        ys = [next(r["bytes"] / 1e6 for r in rows if (r["strategy"], r["budget"]) == run
                   and r["wire_dtype"] == dtype and r["zstd"] == z) for run in runs]
        ax.bar([i + j * width for i in range(len(runs))], ys, width,
               label=f"{SHORT[dtype]}{' +zstd' if z else ''}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))])
    ax.set_xticklabels([f"{s}\nC={b}" for s, b in runs], fontsize=6, rotation=60)
    ax.set_ylabel("MB per update")
    ax.set_title("Upload per round per strategy (one device)", fontsize=9)
    ax.legend(fontsize=7)
    savefig(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="2 experts top-1, 32 tokens, 1 step, one budget, hfedmoe and fedavg-full only")
    p.add_argument("--budgets", default=None, help="comma list of C_budget (default E/8,E/4,E/2)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--adapters", default="full,lora", help="train.adapter values to compare")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--plan", action="store_true",
                   help="also one expert's update at real models' expert shapes, full vs LoRA")
    p.add_argument("--plan-only", action="store_true", help="only the --plan rows")
    p.add_argument("--out", default=None, help="append JSON lines here (plot drawn next to it)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        model_cfg = {"num_experts": 2, "top_k": 1, "max_length": 32}
        budgets, steps = [3], args.max_steps or 1
        strategies: Sequence[str] = ("hfedmoe", "fedavg-full")
    else:
        model_cfg = {"max_length": args.max_length}
        budgets, steps = [6, 12, 24], args.max_steps or 5
        strategies = STRATEGIES
    if args.budgets:
        budgets = [int(x) for x in args.budgets.split(",")]
    env = environment(benchmark="comm", device="cpu")
    if args.plan_only:
        print_plan(planned(args.lora_rank), args, env)
        return 0
    adapters = args.adapters.split(",")
    rows = measure(model_cfg, budgets, steps, args.batch_size, args.lr, args.seed, strategies,
                   adapters, args.lora_rank)
    for r in rows:
        r.update(model="minilm-moe", **{f"model_{k}": v for k, v in model_cfg.items()},
                 max_steps=steps, batch_size=args.batch_size, lr=args.lr)
    write_rows(args.out, rows, env)
    print(f"bytes per update; E={rows[0]['num_experts']} experts, {steps} local steps, "
          f"dense = {rows[0]['dense_params']:,} params")
    runs = list(dict.fromkeys((r["strategy"], r["budget"], r["adapter"]) for r in rows))
    out = []
    for s, b, a in runs:
        rs = {(r["wire_dtype"], r["zstd"]): r for r in rows
              if (r["strategy"], r["budget"], r["adapter"]) == (s, b, a)}
        first = rs[("float32", False)]
        out.append([s, b, a, first["experts_in_update"]]
                   + [f"{rs[w]['bytes'] / 1e6:.2f} MB (x{rs[w]['ratio_vs_dense_fp32']:.3f})"
                      + (f" = {rs[w]['lora_vs_full_bytes']:.3f} of full"
                         if "lora_vs_full_bytes" in rs[w] else "") for w in WIRES])
    print(table(out, ["strategy", "C", "adapter", "experts sent"]
                + [f"{SHORT[d]}{'+zstd' if z else ''}" for d, z in WIRES]))
    plot(rows, str(plot_path(args.out, "comm.png")))
    if args.plan:
        print_plan(planned(args.lora_rank), args, env)
    return 0


def print_plan(plan: list[dict], args: argparse.Namespace, env: dict) -> None:
    write_rows(args.out, plan, env)
    print(f"one expert's update at real models' expert shapes, LoRA rank {args.lora_rank} "
          "vs the whole expert (same biases), no zstd")
    print(table([[r["model"], f"{r['d_model']} x {r['d_ff']}", SHORT[r["wire_dtype"]],
                  f"{r['full_expert_bytes'] / 1e6:.2f} MB",
                  f"{r['lora_expert_bytes'] / 1e6:.3f} MB", f"{r['lora_vs_full_bytes']:.4f}"]
                 for r in plan],
                ["model", "d_model x d_ff", "wire", "full expert", "LoRA factors",
                 "LoRA / full"]))


if __name__ == "__main__":
    sys.exit(main())
