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
                              [--adapters full,lora] [--lora-rank 8] [--out r.jsonl]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from benchmarks._common import environment, plot_path, pyplot, savefig, table, write_rows

STRATEGIES = ("hfedmoe", "hfedmoe-importance", "hfedmoe-uniform", "fedmoe", "fedavg-random",
              "fedavg-full")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
WIRES = [(d, c) for d in ("float32", "bfloat16", "float16") for c in (False, True)]


def measure(model_cfg: dict, budgets: list[int], max_steps: int, batch_size: int, lr: float,
            seed: int, strategies: Sequence[str] = STRATEGIES,
            adapters: Sequence[str] = ("full",), lora_rank: int = 8) -> list[dict]:
    import torch

    from device_agent.train import train_round, usage_profile
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
            res = train_round(model, shard, strategy=strategy, budget=budget, train_cfg=tcfg,
                              method_cfg=method, round_idx=0, client_id="dev0",
                              max_length=mcfg.max_length, assignment=assignment)
            train_s = time.perf_counter() - t0
            upd = res.update
            experts = {parse_key(k).expert for k in upd.deltas} - {None}
            params = sum(t.numel() for t in upd.deltas.values())
            for dtype, compress in WIRES:
                t0 = time.perf_counter()
                blob = encode(upd, method.tau, WireConfig(dtype=dtype, compress=compress))
                rows.append({
                    "bench": "comm", "strategy": name, "budget": budget, "adapter": adapter,
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
