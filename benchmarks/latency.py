"""Benchmark Q1: per-device step latency and peak memory vs the expert budget and dtype.

Question: on this device, how long do a forward pass, a forward+backward and an optimizer step
take, and how much memory does training add on top of the loaded model, when the device trains
0, 1, E/4, E/2 or all E experts (gates and head always train), in fp32 and under bf16
autocast? Two models: the default ``minilm-moe`` (MiniLM-L6 upcycled to 6 layers x 8 experts,
top-2, classification) and a small causal Qwen3-MoE (random init, 4 layers x 8 experts, top-2,
next-token loss). The trained experts are spread evenly over the layers. Each (model, dtype,
budget) runs in a fresh process: warm-up, then repeats, median and [min, max]. CUDA is used
when present (times synchronised, peak from ``torch.cuda.max_memory_allocated``); on CPU the
peak is the resident set sampled every 2 ms, above the state before the first step. This is
the table a field trial starts from.

    python -m benchmarks.latency [--quick] [--models minilm-moe,qwen3-moe-small]
                                 [--dtypes float32,bfloat16] [--batch-size 8] [--seq-len 128]
                                 [--repeats 4] [--out r.jsonl]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from benchmarks._common import (
    RssSampler,
    environment,
    loadavg,
    med,
    model_descriptor,
    plot_path,
    pyplot,
    run_isolated,
    savefig,
    spread,
    table,
    write_rows,
)

MB = 1e6
# A causal MoE larger than the test-sized tiny config, still random-init (no download).
QWEN_SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=512,
                  moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                  vocab_size=8192, max_position_embeddings=512)


def build(name: str, seq_len: int):  # noqa: ANN201 - MoEModel, imported lazily
    from hfedmoe.config import ModelConfig
    from hfedmoe.models.hf import build_hf_model
    from hfedmoe.models.registry import build_model

    if name == "minilm-moe":
        return build_model(ModelConfig(max_length=seq_len), "classification", 10)
    if name == "qwen3-moe-small":
        return build_hf_model("qwen3-moe", "causal-lm", **QWEN_SMALL)
    if name.endswith("-tiny"):
        return build_model(ModelConfig(name=name, max_length=seq_len), "causal-lm")
    raise ValueError(f"unknown model {name!r}")


def budgets_for(num_experts: int) -> list[int]:
    return sorted({0, 1, num_experts // 4, num_experts // 2, num_experts})


def spread_experts(model, budget: int) -> list:  # noqa: ANN001
    """``budget`` experts, spread over the layers: expert 0 of every layer, then expert 1..."""
    order = sorted(model.expert_ids(), key=lambda e: (e.expert_idx, e.layer_idx))
    return order[:budget]


def run_config(model: str, dtype: str, budget: int, batch_size: int, seq_len: int,
               repeats: int, warmup: int, threads: int = 0) -> dict:
    """One (model, dtype, budget), meant for a fresh process (:func:`run_isolated`)."""
    import contextlib

    import torch

    from hfedmoe.trainer import DTYPES

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = build(model, seq_len)
    m.module.to(dev)
    vocab = getattr(m.tokenizer, "vocab_size", None) or m.module.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = (torch.zeros(batch_size, dtype=torch.long) if m.task == "classification"
                       else ids.clone())
    batch = {k: v.to(dev) for k, v in batch.items()}
    experts = spread_experts(m, budget)
    m.set_trainable(experts)
    params = [m.parameter(k) for k in m.keys()]  # as train_round: frozen ones get no grad
    opt = torch.optim.AdamW(params, lr=1e-4)
    trained_params = sum(p.numel() for p in params if p.requires_grad)
    cast = (contextlib.nullcontext() if dtype == "float32"
            else torch.autocast(dev.type, dtype=DTYPES[dtype]))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {"forward": [], "fwd_bwd": [], "optimizer": []}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    with RssSampler() as mem:
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            with torch.no_grad(), cast:
                m.module(**{k: v for k, v in batch.items() if k != "labels"})
            sync()
            t1 = time.perf_counter()
            with cast:
                loss = m.module(**batch).loss
            loss.backward()
            sync()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t3 = time.perf_counter()
            if i >= warmup:
                times["forward"].append(t1 - t0)
                times["fwd_bwd"].append(t2 - t1)
                times["optimizer"].append(t3 - t2)
    row = {"model": model, "dtype": dtype, "budget": budget,
           "num_experts": len(m.expert_ids()), "device": dev.type,
           "threads": torch.get_num_threads(), "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "warmup": warmup,
           "trained_params": trained_params,
           "total_params": sum(p.numel() for p in m.module.parameters())}
    for name, ts in times.items():
        row[f"{name}_s"] = round(med(ts), 4)
        row[f"{name}_spread_s"] = spread(ts)
    row["step_s"] = round(row["fwd_bwd_s"] + row["optimizer_s"], 4)
    if model == "minilm-moe":
        from hfedmoe.config import ModelConfig

        row["descriptor"] = model_descriptor(ModelConfig(max_length=seq_len), built=m,
                                             batch_size=batch_size)
    row["loadavg_at_measurement"] = loadavg()
    row["peak_rss_mb"] = round(mem.peak / MB, 1)
    row["train_peak_delta_mb"] = round(mem.delta / MB, 1)
    if dev.type == "cuda":
        row["gpu_peak_delta_mb"] = round((torch.cuda.max_memory_allocated() - base_gpu) / MB, 1)
    return row


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    for (model, dtype) in dict.fromkeys((r["model"], r["dtype"]) for r in rows):
        rs = sorted((r for r in rows if (r["model"], r["dtype"]) == (model, dtype)),
                    key=lambda r: r["budget"])
        xs = [r["budget"] / r["num_experts"] for r in rs]
        style = "o-" if dtype == "float32" else "s--"
        a.plot(xs, [r["step_s"] for r in rs], style, label=f"{model} {dtype}")
        b.plot(xs, [r["train_peak_delta_mb"] for r in rs], style, label=f"{model} {dtype}")
    a.set_xlabel("fraction of experts trained")
    a.set_ylabel("fwd+bwd+optimizer step (s)")
    a.set_yscale("log")
    b.set_xlabel("fraction of experts trained")
    b.set_ylabel("training peak above model (MB)")
    a.legend(fontsize=6)
    fig.suptitle("Step latency and memory vs budget (CPU)", fontsize=9)
    savefig(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="qwen3-moe-tiny only, fp32, budgets 0 and all, 1 repeat")
    p.add_argument("--models", default=None, help="minilm-moe, qwen3-moe-small, <family>-tiny")
    p.add_argument("--dtypes", default=None, help="comma list: float32,bfloat16,float16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (quick: 16)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--out", default=None, help="append JSON lines here (plot drawn next to it)")
    args = p.parse_args(argv)
    if args.quick:
        models, dtypes, seq, repeats = ["qwen3-moe-tiny"], ["float32"], 16, 1
    else:
        models, dtypes, seq, repeats = ["minilm-moe", "qwen3-moe-small"], \
            ["float32", "bfloat16"], 128, 4
    models = args.models.split(",") if args.models else models
    dtypes = args.dtypes.split(",") if args.dtypes else dtypes
    seq = args.seq_len or seq
    repeats = args.repeats or repeats
    import torch

    env = environment(benchmark="latency",
                      device="cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for model in models:
        n_experts = len(run_isolated("benchmarks.latency", "count_experts",
                                     {"model": model, "seq_len": seq})["experts"])
        budgets = budgets_for(n_experts)
        if args.quick:
            budgets = [0, n_experts]
        for dtype in dtypes:
            for budget in budgets:
                r = run_isolated("benchmarks.latency", "run_config",
                                 {"model": model, "dtype": dtype, "budget": budget,
                                  "batch_size": args.batch_size, "seq_len": seq,
                                  "repeats": repeats, "warmup": args.warmup,
                                  "threads": args.threads})
                r["bench"] = "latency"
                rows.append(r)
                print(f"  {model} {dtype} C={budget}: step {r['step_s']} s, "
                      f"+{r['train_peak_delta_mb']} MB", flush=True)
    for r in rows:
        ref = next(x for x in rows if (x["model"], x["dtype"], x["budget"])
                   == (r["model"], r["dtype"], 0))
        r["step_ratio_vs_budget0"] = round(r["step_s"] / ref["step_s"], 2)
        fp = next((x for x in rows if (x["model"], x["budget"], x["dtype"])
                   == (r["model"], r["budget"], "float32")), None)
        if fp:
            r["step_ratio_vs_fp32"] = round(r["step_s"] / fp["step_s"], 2)
    write_rows(args.out, rows, env)
    print(f"batch {args.batch_size} x {seq} tokens, device {rows[0]['device']}, "
          f"median of {repeats} after {args.warmup} warm-up")
    print(table([[r["model"], r["dtype"], f"{r['budget']}/{r['num_experts']}",
                  f"{r['forward_s']:.3f}", f"{r['fwd_bwd_s']:.3f}", f"{r['optimizer_s']:.3f}",
                  f"{r['step_s']:.3f}", r["step_ratio_vs_budget0"],
                  r.get("step_ratio_vs_fp32", ""), r["train_peak_delta_mb"], r["peak_rss_mb"]]
                 for r in rows],
                ["model", "dtype", "C/E", "fwd s", "fwd+bwd s", "opt s", "step s",
                 "x C=0", "x fp32", "train +MB", "peak RSS MB"]))
    plot(rows, str(plot_path(args.out, "latency.png")))
    return 0


def count_experts(model: str, seq_len: int) -> dict:
    return {"experts": [str(e) for e in build(model, seq_len).expert_ids()]}


if __name__ == "__main__":
    sys.exit(main())
