"""Benchmark: at a real model's size, does the plan predict a LoRA round's memory and step time?

Question: ``hfedmoe profile --model DIR`` plans a model from its config (``device_agent.work``:
weights per dtype, what a trained expert holds, the non-expert part's activations and logits)
and, on a live device, one expert timed over the mode's base (``device_agent.timing``). Is that
plan right for the model at its real size? This builds OLMoE-1B-7B's architecture (or any
``examples/models`` directory) with random weights, its experts stored int4 (or int8) as soon
as each exists (``hfedmoe.models.materialize``) and the frozen linears quantized as
``model.quantize`` stores them, then trains LoRA factors on C experts (the C with the most
routed tokens) for real steps at a small batch, and compares with the plan for this machine:

- the weights: planned bytes against the resident size the build added;
- what training adds (the figure a memory budget limits): planned against the peak over the
  resident size just before training (the kernel's high-water mark);
- the whole-process peak: the resident size before the build, plus the planned weights and
  what training adds, against the measured peak;
- the step: the planned step under the real routing against the median measured step.

    python -m benchmarks.realsize [--model examples/models/olmoe-1b-7b-0924] [--quantize int4]
        [--budgets 16,128,1024] [--batch 1] [--seq 128] [--steps 3] [--threads 2] [--out F]
        [--device cuda] [--layers N]

``--device cuda`` builds and trains on the GPU (memory: the CUDA allocator's, and the process's
RSS beside it); ``--layers N`` keeps the first N decoder layers at the real widths
(``tools/gpu_check.py`` runs a tiny and a mid-size model this way).

It needs about 8 GB of memory for OLMoE and minutes on a laptop CPU: it is not in the test run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import _common

EXAMPLE = "examples/models/olmoe-1b-7b-0924"


def truncated_dir(path: str, layers: int, into: str) -> str:
    """A copy of ``path``'s config.json with only its first ``layers`` decoder layers."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(path) / "config.json").read_text())
    full = cfg["num_hidden_layers"]
    cfg = {k: (v[:layers] if isinstance(v, list) and len(v) == full else v)
           for k, v in cfg.items()}
    cfg["num_hidden_layers"] = layers
    (Path(into) / "config.json").write_text(json.dumps(cfg))
    return into


def build(path: str, quantize: str, seed: int, device: str = "cpu"
          ) -> tuple[Any, dict[str, Any]]:
    """The model of ``path`` at its real size with random weights, stored as a device holds it
    with ``model.quantize = quantize`` (``"none"``: fp32); what the process held before and
    after (:func:`device_agent.costs.held_bytes`), the build's time."""
    import torch

    from device_agent.costs import held_bytes, release_freed_memory
    from device_agent.heap import bound_heap
    from hfedmoe.config import ModelConfig
    from hfedmoe.models.materialize import materialize
    from hfedmoe.models.plan import build_meta_model
    from hfedmoe.models.quantize import quantize_model

    bound_heap()
    release_freed_memory()
    dev = torch.device(device)
    before = held_bytes(dev)
    t0 = time.perf_counter()
    model = materialize(build_meta_model(path), quantize, seed, device=dev)
    model.set_expert_impl(ModelConfig().expert_impl)  # the path a device trains with
    report = quantize_model(model, quantize)
    release_freed_memory()
    return model, {"resident_before_build_bytes": before, "resident_after_build_bytes":
                   held_bytes(dev), "build_s": round(time.perf_counter() - t0, 1),
                   "quantized": report.to_dict()}


def plan_here(path: str, quantize: str, batch: int, seq: int, rank: int,
              device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """The plan of the LoRA-over-``quantize`` mode for this machine: the mode counted from the
    config, one expert timed here over that base."""
    import torch

    from device_agent.plan import timed_cost
    from device_agent.timing import time_expert
    from device_agent.work import planned_mode
    from hfedmoe.models.plan import build_meta_model

    meta = build_meta_model(path)
    base = "fp32" if quantize == "none" else quantize
    planned = planned_mode(meta, "lora", base, batch, seq, rank=rank)
    times = time_expert(meta.layers[0].bank.shape, planned.memory.expert_rows, base,
                        rank=rank, repeats=5, device=torch.device(device))
    return planned, timed_cost(planned, times), times


def random_batch(model: Any, batch: int, seq: int, seed: int) -> dict[str, Any]:
    import torch

    vocab = model.module.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.module.parameters()).device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def routed_rows(model: Any, batch: dict[str, Any], dtype: Any) -> dict[Any, float]:
    """Token rows each expert gets in one forward of ``batch`` (the round's routing pass)."""
    import torch

    device = batch["input_ids"].device.type
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32), \
            model.capture(batch["attention_mask"]) as cap:
        model.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    from hfedmoe.names import ExpertId

    return {ExpertId(layer, e): float(n) for layer, rows in cap.expert_rows.items()
            for e, n in enumerate(rows.tolist())}


def measure(model: Any, chosen: list[Any], batches: list[dict[str, Any]], rank: int,
            dtype: str) -> dict[str, Any]:
    """Train LoRA factors on ``chosen`` over ``batches`` (the first a warm-up): what the
    process held before, its peak over every step (on CUDA the allocator's, with the RSS peak
    beside it), the steps' seconds."""
    import torch

    from device_agent.costs import held_bytes, release_freed_memory
    from device_agent.heap import after_step
    from device_agent.throughput import PeakRSSSampler
    from hfedmoe.config import MethodConfig, TrainConfig
    from hfedmoe.trainer import EagerTrainer

    release_freed_memory()
    device = batches[0]["input_ids"].device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    resident = held_bytes(device)
    cfg = TrainConfig(batch_size=batches[0]["input_ids"].shape[0], lr=1e-4, adapter="lora",
                      lora_rank=rank, lora_alpha=2.0 * rank, dtype=dtype)
    steps = []
    with PeakRSSSampler(interval=0.05) as peak:
        trainer = EagerTrainer(model, chosen, cfg, MethodConfig())
        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            trainer.step(b)
            after_step()  # as the agent's round does (device_agent.train)
            if cuda:
                torch.cuda.synchronize(device)
            if i:
                steps.append(time.perf_counter() - t0)
    top = torch.cuda.max_memory_allocated(device) if cuda else peak.max_bytes
    trainer.deltas()  # the round ends: factors leave the model
    del trainer
    return {"resident_bytes": resident, "measured_peak_bytes": top,
            "process_peak_rss_bytes": peak.max_bytes, "device": device.type,
            "step_s": statistics.median(steps), "step_samples_s": [round(s, 3) for s in steps]}


def budget_row(model: Any, cost: Any, c: int, rows: dict[Any, float], batches: list[Any],
               rank: int, dtype: str, built: dict[str, Any]) -> dict[str, Any]:
    """Plan against measurement with the ``c`` most-routed experts trained."""
    from device_agent.budget import layers_of

    ranked = sorted(rows, key=lambda e: (-rows[e], e))[:c]
    all_rows, batch_rows = sum(rows.values()), batches[0]["attention_mask"].numel()
    trained = [rows[e] for e in ranked]
    m = measure(model, ranked, batches, rank, dtype)
    here = dataclasses.replace(cost, process_baseline_bytes=m["resident_bytes"])
    added = (here.routed_peak_bytes(trained, all_rows, batch_rows, layers_of(ranked))
             - m["resident_bytes"])
    whole = built["resident_before_build_bytes"] + cost.resident_bytes + added
    step = here.routed_step_seconds(trained, all_rows, batch_rows)
    measured_added = m["measured_peak_bytes"] - m["resident_bytes"]
    return {**m, "budget": c, "predicted_added_bytes": added,
            "measured_added_bytes": measured_added,
            "added_error": round(added / max(measured_added, 1) - 1, 3),
            "predicted_peak_bytes": whole,
            "peak_error": round(whole / m["measured_peak_bytes"] - 1, 3),
            "predicted_step_s": step, "step_error": round(step / m["step_s"] - 1, 3),
            "trained_row_fraction": round(sum(trained) / max(all_rows, 1.0), 4)}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model
    if args.layers:
        import tempfile

        path = truncated_dir(args.model, args.layers, tempfile.mkdtemp(prefix="realsize-"))
    planned, cost, times = plan_here(path, args.quantize, args.batch, args.seq, args.rank,
                                     args.device)
    model, built = build(path, args.quantize, args.seed, args.device)
    weights = built["resident_after_build_bytes"] - built["resident_before_build_bytes"]
    batches = [random_batch(model, args.batch, args.seq, args.seed + i)
               for i in range(args.steps)]
    dtype = "bfloat16" if planned.dtype == "bfloat16" else "float32"
    rows = routed_rows(model, batches[0], getattr(torch, dtype))
    env = _common.environment()
    head = {"bench": "realsize", "model": args.model, "layers": args.layers or None,
            "impl": model.layers[0].bank.impl,
            "device": args.device, "quantize": args.quantize,
            "adapter": "lora", "lora_rank": args.rank, "batch_size": args.batch,
            "seq_len": args.seq, "train_dtype": dtype, "threads": args.threads,
            "params": planned.model_params, "expert_seconds": times,
            "predicted_weight_bytes": cost.resident_bytes, "measured_weight_bytes": weights,
            "weight_error": round(cost.resident_bytes / weights - 1, 3), **built}
    out = []
    for c in args.budgets:
        row = {**head, "kind": "round",
               **budget_row(model, cost, c, rows, batches, args.rank, dtype, built)}
        out.append({**row, "env": {**env, "loadavg_end": _common.loadavg()}})
        print(f"  done C={c}", file=sys.stderr, flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EXAMPLE, help="a model directory (config.json)")
    p.add_argument("--quantize", default="int4", choices=("none", "int8", "int4"),
                   help="how the frozen base is stored (none: fp32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--layers", type=int, default=0,
                   help="keep the first N decoder layers (0: all)")
    p.add_argument("--budgets", default="16,128,1024", help="comma list of C")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="steps per C (the first a warm-up)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    args.budgets = [int(c) for c in args.budgets.split(",")]
    if args.steps < 2:
        p.error("--steps must be >= 2 (one warm-up and one timed)")
    rows = run(args)
    print_rows(rows)
    if args.out:
        env = rows[0].get("env", {})
        _common.write_rows(args.out, ({k: v for k, v in r.items() if k != "env"} for r in rows),
                           env, None)
    return 0


def print_rows(rows: list[dict[str, Any]]) -> None:
    r0 = rows[0]
    print(f"{r0['model']} ({r0['params'] / 1e9:.2f} B params), LoRA r{r0['lora_rank']} over "
          f"{r0['quantize']}, batch {r0['batch_size']} x {r0['seq_len']}, {r0['train_dtype']}; "
          f"built in {r0['build_s']:.0f} s")
    print(f"weights: planned {r0['predicted_weight_bytes'] / 2**30:.2f} GiB, measured "
          f"{r0['measured_weight_bytes'] / 2**30:.2f} GiB ({100 * r0['weight_error']:+.1f}%)")
    print(f"{'C':>6}{'adds pred':>11}{'meas':>9}{'err':>8}{'peak pred':>11}{'meas':>9}"
          f"{'err':>8}{'step pred':>11}{'meas':>9}{'err':>8}")
    for r in rows:
        print(f"{r['budget']:>6}{r['predicted_added_bytes'] / 2**20:>9.0f}Mi"
              f"{r['measured_added_bytes'] / 2**20:>7.0f}Mi{100 * r['added_error']:>7.1f}%"
              f"{r['predicted_peak_bytes'] / 2**30:>9.2f}Gi"
              f"{r['measured_peak_bytes'] / 2**30:>7.2f}Gi{100 * r['peak_error']:>7.1f}%"
              f"{r['predicted_step_s']:>10.2f}s{r['step_s']:>8.2f}s{100 * r['step_error']:>7.1f}%")


if __name__ == "__main__":
    sys.exit(main())
