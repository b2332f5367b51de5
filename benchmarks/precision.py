"""Benchmark: bf16 against fp32 training steps, interleaved step by step in one process.

Question: how much faster is a bf16 training step than an fp32 one on this device, at
C = E/4 and C = E trained experts, and does holding the frozen matmul weights in bf16 for the
round (:class:`hfedmoe.precision.LowPrecisionFrozen`, what ``train_round`` does) beat letting
autocast cast them on every use? On a shared or virtualised CPU the step time drifts by tens
of percent over minutes, more than the differences asked about; separate runs per variant
(``benchmarks/kernels.py``, which also measures memory in fresh processes) then compare drift.
Here one model and one batch run every variant in turn, step after step, with the order
rotated each round, so drift hits all of them alike, and the ratios are paired: variant step /
fp32 step of the same round, median with a bootstrap 95 % interval. The same interleaving times
the parts that decide the ratio (:func:`op_timings`): one expert block's GEMM in fp32 and bf16
and one layer's attention forward+backward in the forms a CPU could run it.

Variants: ``fp32``; ``bf16`` (autocast casts the fp32 weights on every use; fp32 masters for
what trains: ``train.dtype = "bfloat16"``); ``bf16-held`` (the same with the frozen matmul
weights held in bf16: ``train.hold_frozen_lowp``). Each step is forward +
backward + AdamW + ``zero_grad`` with ``budget`` experts (spread over the layers), gates and
head trainable, as ``benchmarks.stepcost`` does; switching variants (lowering and restoring the
frozen weights) happens between the timed steps.

    python -m benchmarks.precision [--quick] [--budgets 12,48] [--rounds 15] [--threads 2]
                                   [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import _common
from benchmarks.stepcost import QUICK_MODEL, _batch, _build, _descriptor, spread_experts

VARIANTS = ("fp32", "bf16", "bf16-held")


def bootstrap_median(xs: Sequence[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median of ``xs``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def measure(model_name: str, budget: int, batch_size: int, seq_len: int, rounds: int,
            warmup: int, path: str = "sorted") -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Step seconds per variant, ``rounds`` interleaved samples each, and the model's
    descriptor."""
    import torch

    from hfedmoe.config import TrainConfig
    from hfedmoe.names import ExpertId
    from hfedmoe.precision import LowPrecisionFrozen
    from hfedmoe.trainer import make_optimizer

    spec = {"model": model_name, "path": path, "num_labels": 8, "batch_size": batch_size,
            "seq_len": seq_len}
    model = _build(spec)
    batch = _batch(model, batch_size, seq_len, 8)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), model.capture(batch["attention_mask"]) as cap:
        model.module(**inputs)
    model.set_trainable({ExpertId(li, e) for li, e in spread_experts(cap.routed, budget)})
    optimizer = make_optimizer(model.trainable_parameters(), TrainConfig(lr=1e-6))
    low = LowPrecisionFrozen(model.module, torch.bfloat16)

    def step(variant: str) -> float:
        if variant == "bf16-held":
            low.lower()  # frozen weights only: the trainable ones are not lowerable
        ctx = (contextlib.nullcontext() if variant == "fp32"
               else torch.autocast("cpu", dtype=torch.bfloat16))
        t0 = time.perf_counter()
        with ctx:
            loss = model.module(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        low.restore()
        return dt

    for _ in range(warmup):
        for v in VARIANTS:
            step(v)
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            out[v].append(step(v))
    return out, _descriptor(model, spec)


def op_timings(rounds: int, quick: bool) -> list[dict[str, Any]]:
    """What bf16 buys on this CPU outside the model, interleaved the same way: one expert
    block's GEMM (rows x d_model x d_ff of the default model) and one layer's attention
    forward+backward ([batch, heads, seq, head_dim]) as the flash kernel in fp32 (what bf16
    steps run on a CPU, ``hfedmoe.models.attention``), the flash kernel in bf16, and plain
    bf16 matmuls with an fp32 softmax."""
    import torch
    import torch.nn.functional as F

    rows_, d, f = (64, 32, 16) if quick else (256, 384, 192)
    b, h, s, hd = (2, 2, 16, 8) if quick else (8, 12, 128, 32)
    g = torch.Generator().manual_seed(0)

    def gemm(dtype: Any) -> Any:
        x, w = torch.randn(rows_, d, generator=g).to(dtype), torch.randn(f, d, generator=g).to(dtype)
        return lambda: F.linear(x, w)

    def attention(kind: str) -> Any:
        dtype = torch.float32 if kind == "flash fp32" else torch.bfloat16
        q, k, v = (torch.randn(b, h, s, hd, generator=g).to(dtype).requires_grad_()
                   for _ in range(3))

        def run() -> None:
            if kind == "math bf16":
                p = torch.softmax((q @ k.transpose(-1, -2)).float() * hd ** -0.5, -1)
                out = p.to(dtype) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v)
            out.sum().backward()
        return run

    ops = {"gemm fp32": gemm(torch.float32), "gemm bf16": gemm(torch.bfloat16),
           "attention flash fp32": attention("flash fp32"),
           "attention flash bf16": attention("flash bf16"),
           "attention math bf16": attention("math bf16")}
    times: dict[str, list[float]] = {k: [] for k in ops}
    names = list(ops)
    for r in range(rounds + 2):
        for name in names[r % len(names):] + names[:r % len(names)]:
            n = 20 if name.startswith("gemm") else 1  # a GEMM alone is well under 1 ms
            t0 = time.perf_counter()
            for _ in range(n):
                ops[name]()
            if r >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - t0) / n)
    out = []
    for name, ts in times.items():
        row: dict[str, Any] = {"bench": "precision-ops", "op": name,
                               "ms": round(1e3 * statistics.median(ts), 3)}
        if name.startswith("gemm"):
            row.update(shape=[rows_, d, f],
                       # 3 significant digits: a quick run's small GEMM on a loaded host
                       # runs under 0.05 GFLOP/s, which one decimal rounded to 0
                       gflops=float(f"{2 * rows_ * d * f / statistics.median(ts) / 1e9:.3g}"))
        else:
            row["shape"] = [b, h, s, hd]
        out.append(row)
    return out


def summarize(budget: int, times: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = []
    base = times["fp32"]
    for v, ts in times.items():
        row: dict[str, Any] = {"bench": "precision", "variant": v, "budget": budget,
                               "step_s": round(statistics.median(ts), 4),
                               "step_samples_s": [round(t, 4) for t in ts]}
        if v != "fp32":
            ratios = [a / b for a, b in zip(ts, base, strict=True)]
            lo, hi = bootstrap_median(ratios)
            row.update(ratio_to_fp32=round(statistics.median(ratios), 3),
                       ratio_ci95=[round(lo, 3), round(hi, 3)])
        rows.append(row)
    cast, held = times["bf16"], times["bf16-held"]
    ratios = [a / b for a, b in zip(held, cast, strict=True)]
    lo, hi = bootstrap_median(ratios)
    rows.append({"bench": "precision-frozen", "budget": budget,
                 "held_over_cast": round(statistics.median(ratios), 3),
                 "ci95": [round(lo, 3), round(hi, 3)]})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few rounds (smoke test)")
    p.add_argument("--budgets", default=None, help="comma list (default E/4,E)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = QUICK_MODEL if args.quick else "minilm-moe"
    num_experts = 8 if args.quick else 48
    budgets = ([int(b) for b in args.budgets.split(",")] if args.budgets
               else [num_experts // 4, num_experts])
    rounds = args.rounds or (3 if args.quick else 15)
    shape = (2, 16) if args.quick else (8, 128)
    rows: list[dict[str, Any]] = []
    for budget in budgets:
        times, descriptor = measure(model, budget, *shape, rounds=rounds,
                                    warmup=1 if args.quick else 2)
        rows += [{**r, "descriptor": descriptor, "model": model, "batch_size": shape[0], "seq_len": shape[1],
                  "rounds": rounds} for r in summarize(budget, times)]
    ops = op_timings(rounds, args.quick)
    rows += ops
    print(f"{model}, batch {shape[0]} x {shape[1]}, {torch.get_num_threads()} threads, "
          f"{rounds} interleaved rounds; ratio: median of per-round ratios [95 % CI]")
    for r in rows:
        if r["bench"] == "precision":
            ratio = (f"{r['ratio_to_fp32']:.3f}x fp32 [{r['ratio_ci95'][0]:.3f}, "
                     f"{r['ratio_ci95'][1]:.3f}]" if "ratio_to_fp32" in r else "")
            print(f"C={r['budget']:<3} {r['variant']:<10} step {r['step_s']:.3f} s  {ratio}")
        elif r["bench"] == "precision-ops":
            extra = f", {r['gflops']} GFLOP/s" if "gflops" in r else ""
            print(f"{r['op']:<22} {r['shape']}: {r['ms']:.3f} ms{extra}")
        else:
            print(f"C={r['budget']:<3} bf16-held / bf16: "
                  f"{r['held_over_cast']:.3f}x [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    env = _common.environment(loadavg=_common.loadavg())
    _common.write_rows(args.out, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
