"""Eager PyTorch vs ExecuTorch (portable and XNNPACK kernels): latency and memory per step.

Inference: one forward at (batch, seq). Training: one SGD step (forward, backward, update) with
1, 2 and 4 trainable experts (plus gates and head) — eager with ``set_trainable`` and the
model's own expert path, ExecuTorch with the bucket's training program (frozen mode).
Median and spread of ``--repeats`` timed runs after ``--warmup`` runs; ratios to eager side by
side. Memory: program size, and the process RSS growth from before loading the program to after
the timed runs (an upper bound on what the runtime holds; the eager rows measure the growth
during their runs only).

``--capacity-factor F``: the training programs run the static ``"capacity"`` expert path (each
expert on ``ceil(F * tokens * top_k / num_experts)`` token rows, the rest dropped) instead of
``"dense"``, and an ``eager-capacity`` row runs eager PyTorch on the same path, for a like-with-
like ratio (``ratio_to_eager_capacity``). Every row records ``capacity_factor`` and
``dropped_fraction``: the routed token-expert pairs that path drops in an eager forward of the
benchmark batch (0 without a factor); ``expert_path`` says which path the row ran.

``--task causal-lm`` builds the model as a causal LM (a ``<family>-tiny`` name): the training
rows then take its response-only next-token loss, and train LoRA factors (rank ``--lora-rank``,
default ``train.lora_rank``'s, as ``train.adapter = "auto"`` does for a causal LM) in both the
eager row (the kit's ``EagerTrainer``, SGD) and the program (``--lora-rank 0``: full experts).
Every row records ``model_task`` and ``adapter``.

    python -m benchmarks.export --quick --out results.jsonl   # tiny model, seconds
    python -m benchmarks.export                               # minilm-moe, batch 8 x seq 64
    python -m benchmarks.export --capacity-factor 1.25        # capacity-padded programs
    python -m benchmarks.export --quick --task causal-lm      # tiny causal LM, LoRA programs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
import torch

from benchmarks._common import command_line, model_descriptor


def _env() -> dict[str, Any]:
    import executorch.version

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False).stdout.strip()
    except OSError:
        sha = ""
    return {"git": sha, "torch": torch.__version__, "executorch": executorch.version.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def _rss() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _time(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "stdev_ms": statistics.stdev(times) if len(times) > 1 else 0.0}


def _experts(model: Any, k: int) -> list[Any]:
    from hfedmoe.names import ExpertId

    n = model.layers[0].num_experts
    return [ExpertId(i % model.num_layers, (i // model.num_layers) % n) for i in range(k)]


def bench_inference(model: Any, batch: int, seq: int, backends: Sequence[str], warmup: int,
                    repeats: int) -> list[dict[str, Any]]:
    from export.common import example_inputs
    from export.executorch import export_inference_pte, load_inference, run_inference

    b = example_inputs(model, batch, seq)
    ids, mask = b["input_ids"], b["attention_mask"]
    rows = []
    rss0 = _rss()
    with torch.no_grad():
        stats = _time(lambda: model.module(input_ids=ids, attention_mask=mask), warmup, repeats)
    rows.append({"task": "inference", "runtime": "eager", **stats, "rss_growth_mib": _rss() - rss0})
    for backend in backends:
        buffer, report = export_inference_pte(model, batch, seq, backend)  # type: ignore[arg-type]
        rss0 = _rss()
        module = load_inference(buffer)
        stats = _time(lambda m=module: run_inference(m, ids, mask), warmup, repeats)
        rows.append({"task": "inference", "runtime": f"executorch-{backend}", **stats,
                     "rss_growth_mib": _rss() - rss0, "program_bytes": len(buffer),
                     "export_s": report.info["export_s"],
                     "max_abs_diff": max(report.parity.values())})
    return rows


def dropped_fraction(model: Any, batch: dict[str, torch.Tensor],
                     capacity_factor: float | None) -> float:
    """Routed token-expert pairs the ``"capacity"`` path at ``capacity_factor`` drops in an
    eager forward of ``batch`` (on a copy of ``model``; 0 without a factor)."""
    import copy

    if capacity_factor is None:
        return 0.0
    ref = copy.deepcopy(model)
    ref.set_expert_impl("capacity", capacity_factor=capacity_factor)
    with torch.no_grad():
        ref.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    dropped, routed = ref.capacity_drops()
    return dropped / routed if routed else 0.0


def _eager_step(ref: Any, b: dict[str, torch.Tensor], experts: list[Any], lr: float,
                lora: Any) -> tuple[Callable[[], Any], int]:
    """One eager SGD step on ``b`` and the trainable parameter count: plain SGD on the
    experts, gates and head, or (``lora``) the kit's eager LoRA trainer with SGD."""
    if lora is not None:
        from hfedmoe.config import MethodConfig, TrainConfig
        from hfedmoe.trainer import EagerTrainer

        cfg = TrainConfig(lr=lr, head_lr=0.0, optimizer="sgd", weight_decay=0.0,
                          adapter="lora", lora_rank=lora.rank, lora_alpha=lora.alpha)
        trainer = EagerTrainer(ref, experts, cfg, MethodConfig())
        tensors = [*ref.trainable_parameters().values(), *trainer.factor_tensors().values()]
        return (lambda: trainer.step(b)), sum(p.numel() for p in tensors)
    ref.set_trainable(experts, gates=True, shared=True)
    params = list(ref.trainable_parameters().values())
    opt = torch.optim.SGD(params, lr=lr)

    def step() -> None:
        opt.zero_grad()
        ref.module(**b).loss.backward()
        opt.step()

    return step, sum(p.numel() for p in params)


def _eager_train_row(model: Any, b: dict[str, torch.Tensor], k: int, experts: list[Any],
                     warmup: int, repeats: int, lr: float, runtime: str,
                     capacity_factor: float | None, lora: Any = None) -> dict[str, Any]:
    import copy

    ref = copy.deepcopy(model)
    if capacity_factor is not None:
        ref.set_expert_impl("capacity", capacity_factor=capacity_factor)
    path = ref.layers[0].bank.impl
    eager_step, trainable = _eager_step(ref, b, experts, lr, lora)
    rss0 = _rss()
    stats = _time(eager_step, warmup, repeats)
    return {"task": "train", "experts": k, "runtime": runtime, "expert_path": path, **stats,
            "rss_growth_mib": _rss() - rss0, "trainable_params": trainable}


def bench_training(model: Any, batch: int, seq: int, k: int, backends: Sequence[str],
                   warmup: int, repeats: int, lr: float = 1e-3,
                   capacity_factor: float | None = None, lora: Any = None
                   ) -> list[dict[str, Any]]:
    """Eager rows (the model's own path; with ``capacity_factor`` also ``eager-capacity``) and
    one ExecuTorch row per backend (``"dense"`` programs, or ``"capacity"`` ones); with
    ``lora`` (a ``LoRASpec``) both train LoRA factors of the experts."""
    from export.common import example_inputs
    from export.programs import expert_path
    from export.runtime import ExecuTorchTrainer, ProgramCache, bucket_holding

    b = example_inputs(model, batch, seq)
    experts = _experts(model, k)
    rows = [_eager_train_row(model, b, k, experts, warmup, repeats, lr, "eager", None, lora)]
    if capacity_factor is not None:
        rows.append(_eager_train_row(model, b, k, experts, warmup, repeats, lr,
                                     "eager-capacity", capacity_factor, lora))
    for backend in backends:
        cache = ProgramCache()
        trainer_bucket = bucket_holding(k)
        cache.get(model, trainer_bucket, batch, seq, backend=backend,  # type: ignore[arg-type]
                  lora=lora, capacity_factor=capacity_factor)  # export outside the RSS
        t0 = time.perf_counter()
        rss0 = _rss()
        trainer = ExecuTorchTrainer(model, experts, (batch, seq), lr, backend=backend,  # type: ignore[arg-type]
                                    cache=cache, lora=lora, capacity_factor=capacity_factor)
        setup_s = time.perf_counter() - t0
        stats = _time(lambda t=trainer: t.step(b), warmup, repeats)
        rows.append({"task": "train", "experts": k, "runtime": f"executorch-{backend}",
                     "expert_path": expert_path(capacity_factor),
                     **stats, "rss_growth_mib": _rss() - rss0, "bucket": trainer.bucket,
                     "program_bytes": len(trainer.program.buffer),
                     "trainable_params": trainer.program.trainable_params,
                     "export_s": round(trainer.program.export_s, 2),
                     "setup_s": round(setup_s, 2)})
    return rows


def _with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base: dict[tuple, float] = {}
    base_capacity: dict[tuple, float] = {}
    for r in rows:
        if r["runtime"] == "eager":
            base[(r["task"], r.get("experts"))] = r["median_ms"]
        if r["runtime"] == "eager-capacity":
            base_capacity[(r["task"], r.get("experts"))] = r["median_ms"]
    for r in rows:
        eager = base.get((r["task"], r.get("experts")))
        r["ratio_to_eager"] = r["median_ms"] / eager if eager else None
        if r.get("expert_path") == "capacity":
            same = base_capacity.get((r["task"], r.get("experts")))
            r["ratio_to_eager_capacity"] = r["median_ms"] / same if same else None
    return rows


def _print(rows: list[dict[str, Any]], title: str) -> None:
    print(title)
    print(f"{'task':<10}{'k':>3} {'runtime':<22}{'median ms':>10}{'min':>9}{'max':>9}"
          f"{'x eager':>9}{'RSS+ MiB':>10}{'program KiB':>13}")
    for r in rows:
        prog = f"{r['program_bytes'] / 1024:,.0f}" if "program_bytes" in r else "-"
        print(f"{r['task']:<10}{r.get('experts') or '-':>3} {r['runtime']:<22}"
              f"{r['median_ms']:>10.2f}{r['min_ms']:>9.2f}{r['max_ms']:>9.2f}"
              f"{r['ratio_to_eager']:>9.2f}{r['rss_growth_mib']:>10.1f}{prog:>13}")


def _parser() -> argparse.ArgumentParser:
    """The command line (``main``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model (qwen3-moe-tiny), 2 x 16")
    p.add_argument("--model", default=None, help="model name (default minilm-moe; quick: tiny)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--experts", default="1,2,4", help="trainable expert counts")
    p.add_argument("--backends", default="portable,xnnpack")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="training programs (and an eager-capacity row) on the 'capacity' "
                        "expert path with this factor (default: dense programs)")
    p.add_argument("--task", choices=["classification", "causal-lm"], default="classification",
                   help="the model's head (causal-lm: a <family>-tiny name or causal checkpoint)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="training rows train LoRA factors of this rank (0: full experts; "
                        "default: as train.adapter 'auto' for --task)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hfedmoe.config import ModelConfig, TrainConfig
    from hfedmoe.models.registry import build_model

    name = args.model or ("qwen3-moe-tiny" if args.quick else "minilm-moe")
    batch = args.batch or (2 if args.quick else 8)
    seq = args.seq or (16 if args.quick else 64)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 2)
    repeats = args.repeats or (20 if args.quick else 7)
    backends = [b for b in args.backends.split(",") if b]
    if args.capacity_factor is not None and not args.capacity_factor > 0:
        p.error(f"--capacity-factor must be > 0, got {args.capacity_factor}")
    model = build_model(ModelConfig(name=name), args.task, num_labels=4)
    from export.common import example_inputs
    from export.training import adapter_for

    lora = adapter_for(args.task, args.lora_rank, TrainConfig().lora_alpha)
    dropped = dropped_fraction(model, example_inputs(model, batch, seq), args.capacity_factor)
    env = {**_env(), "model": name, "batch": batch, "seq": seq, "warmup": warmup,
           "repeats": repeats, "capacity_factor": args.capacity_factor,
           "dropped_fraction": dropped, "model_task": args.task,
           "adapter": f"lora r={lora.rank} alpha={lora.alpha:g}" if lora else "full"}
    print(json.dumps(env))
    rows = bench_inference(model, batch, seq, backends, warmup, repeats)
    for r in rows:
        r["expert_path"] = "dense" if r["runtime"] != "eager" else model.layers[0].bank.impl
    print(json.dumps(rows), flush=True)  # progress: full mode runs for many minutes
    if not args.skip_training:
        for k in (int(x) for x in args.experts.split(",")):
            new = bench_training(model, batch, seq, k, backends, warmup, repeats,
                                 capacity_factor=args.capacity_factor, lora=lora)
            rows += new
            print(json.dumps(new), flush=True)
    rows = _with_ratios(rows)
    title = (f"{name} ({args.task}, {env['adapter']} training) batch {batch} x seq {seq}: "
             f"median of {repeats} after {warmup} warm-up")
    if args.capacity_factor is not None:
        title += (f"; training programs on the capacity path, factor {args.capacity_factor:g} "
                  f"({100 * dropped:.1f}% of routed pairs dropped on the benchmark batch)")
    _print(rows, title)
    if args.out:
        descriptor = model_descriptor(ModelConfig(name=name), built=model, batch_size=batch,
                                      seq_len=seq)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({"bench": "export", **env, **r, "descriptor": descriptor,
                                    "command": command_line()}) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
