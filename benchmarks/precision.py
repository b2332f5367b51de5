"""Benchmark: bf16 against fp32 training steps, interleaved step by step in one process.

Question: how much faster is a bf16 training step than an fp32 one on this device, at
C = E/4 and C = E trained experts, and does holding the frozen matmul weights in bf16 for the
round (:class:`hfedmoe.precision.LowPrecisionFrozen`, what ``train_round`` does) beat letting
autocast cast them on every use? On a shared or virtualised CPU the step time drifts by tens
of percent over minutes, more than the differences asked about; separate runs per variant
(``benchmarks/kernels.py``, which also measures memory in fresh processes) then compare drift.
Here one model and one batch run every variant in turn, step after step, with the order
rotated each round, so drift hits all of them alike, and the ratios are paired: variant step /
fp32 step of the same round, median with a bootstrap 95 % interval.

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
from benchmarks.stepcost import QUICK_MODEL, _batch, _build, spread_experts

VARIANTS = ("fp32", "bf16", "bf16-held")


def bootstrap_median(xs: Sequence[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median of ``xs``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def measure(model_name: str, budget: int, batch_size: int, seq_len: int, rounds: int,
            warmup: int, path: str = "sorted") -> dict[str, list[float]]:
    """Step seconds per variant, ``rounds`` interleaved samples each."""
    import torch

    from device_agent.train import make_optimizer
    from hfedmoe.config import TrainConfig
    from hfedmoe.names import ExpertId
    from hfedmoe.precision import LowPrecisionFrozen

    model = _build({"model": model_name, "path": path, "num_labels": 8})
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
        times = measure(model, budget, *shape, rounds=rounds, warmup=1 if args.quick else 2)
        rows += [{**r, "model": model, "batch_size": shape[0], "seq_len": shape[1],
                  "rounds": rounds} for r in summarize(budget, times)]
    print(f"{model}, batch {shape[0]} x {shape[1]}, {torch.get_num_threads()} threads, "
          f"{rounds} interleaved rounds; ratio: median of per-round ratios [95 % CI]")
    for r in rows:
        if r["bench"] == "precision":
            ratio = (f"{r['ratio_to_fp32']:.3f}x fp32 [{r['ratio_ci95'][0]:.3f}, "
                     f"{r['ratio_ci95'][1]:.3f}]" if "ratio_to_fp32" in r else "")
            print(f"C={r['budget']:<3} {r['variant']:<10} step {r['step_s']:.3f} s  {ratio}")
        else:
            print(f"C={r['budget']:<3} bf16-held / bf16: "
                  f"{r['held_over_cast']:.3f}x [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    env = _common.environment(loadavg=_common.loadavg())
    _common.write_rows(args.out, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
