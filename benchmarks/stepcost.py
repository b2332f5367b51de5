"""Shared measurement for the step benchmarks: one training configuration in a fresh process.

:func:`measure_in_subprocess` runs ``python -m benchmarks.stepcost '<json spec>'`` and reads back
one JSON object. A fresh process per configuration makes its peak memory honest: nothing that an
earlier configuration allocated (optimizer state, the C allocator's free lists, oneDNN caches)
is resident, and ``ru_maxrss`` is this configuration's own.

Inside the worker (:func:`measure`), as ``device_agent.train.train_round`` does per batch:

1. routing pre-pass: a forward without autograd that captures the gate scores, plus the batch
   statistics (Eq. 3-14); timed on its own;
2. training step: forward + backward + AdamW step + ``zero_grad`` with ``budget`` experts
   trainable (:func:`spread_experts`), gates and head trainable; ``trained_row_fraction`` is
   the share of the routed token-expert rows that went to trained experts.

Under bf16 (``"dtype": "bfloat16"``) autocast casts the fp32 weights on every use;
``"frozen_lowp": true`` stores the frozen matmul weights in bf16 for the measurement instead, as
``train_round`` does with ``train.hold_frozen_lowp`` (:class:`hfedmoe.precision.LowPrecisionFrozen`).

Time: wall-clock ``step_s`` (median of the timed steps, with min and max) and the process CPU
time per step ``step_cpu_s`` (all threads; less sensitive to other processes on a shared
machine, a check on the wall-clock figures).

Memory: RSS is sampled every millisecond (:class:`device_agent.throughput.PeakRSSSampler`) during
the untimed warm-up steps, where the allocator's peak shows (optimizer state is created in the
first step). ``train_peak_bytes`` = that peak minus the RSS just before the first step
(grads + optimizer state + activations + transient buffers); ``model_peak_bytes`` = the peak minus
the RSS before the model was built (adds the weights). Timed steps run without the sampler.

Expert FLOPs per step (stated accounting, ``f = ExpertShape.flops_per_token()`` =
``2 * (d_in * d + d * d_ff)`` per routed token-expert row): forward ``f`` for every row; backward
``f`` for the weight gradient of a trained expert's row, plus ``f`` for the input gradient of
any row whose layer input requires grad (not the first MoE layer, whose input comes from frozen
embeddings and attention), except rows of frozen experts under ``detach_frozen`` (0).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import _common

QUICK_MODEL = "qwen3-moe-tiny"


def environment() -> dict[str, Any]:
    """The shared environment record plus the load average now (noisy shared machines)."""
    return _common.environment(loadavg=_common.loadavg())


def spread_experts(routed: dict[int, Any], budget: int) -> list[tuple[int, int]]:
    """``budget`` (layer, expert) pairs dealt round-robin over the layers, in expert order.

    ``routed[l]`` is layer l's (tokens, top_k) expert ids; experts no token reached are never
    picked (``train_round`` trains ``selection & routed`` too). Expert order, not usage order,
    so the trained experts' share of the routed rows is about budget / E on average (usage is
    uneven: picking the most-routed first would train most of the rows at small budgets).
    """
    import torch

    ranked = []
    for li in sorted(routed):
        ids = routed[li].reshape(-1)
        counts = torch.bincount(ids[ids >= 0])
        ranked.append([(li, e) for e in range(len(counts)) if counts[e] > 0])
    dealt = [pair for rank in range(max(map(len, ranked), default=0)) for lst in ranked
             if rank < len(lst) for pair in [lst[rank]]]
    return dealt[:budget]


def _build(spec: dict[str, Any]) -> Any:
    from hfedmoe.models.registry import build_model

    return build_model(_model_config(spec), "classification", spec.get("num_labels", 8))


def _model_config(spec: dict[str, Any]) -> Any:
    """The spec's ModelConfig: its model, expert path and (when given) experts per layer and
    top-k (the fine-grained model: 32 experts top-4)."""
    from hfedmoe.config import ModelConfig

    shape = {k: spec[k] for k in ("num_experts", "top_k") if spec.get(k)}
    return ModelConfig(name=spec.get("model", "minilm-moe"), expert_impl=spec["path"], **shape)


def _descriptor(model: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The row's model descriptor (:func:`benchmarks._common.model_descriptor`)."""
    return _common.model_descriptor(_model_config({"path": "sorted", **spec}), built=model,
                                    batch_size=spec["batch_size"], seq_len=spec["seq_len"])


def _batch(model: Any, batch_size: int, seq_len: int, num_labels: int) -> dict[str, Any]:
    import torch

    vocab = getattr(model.tokenizer, "vocab_size", None) or 512
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, num_labels, (batch_size,), generator=g)}


def _flops(model: Any, routed: dict[int, Any], input_grad: dict[int, bool],
           detach: bool) -> dict[str, float]:
    import torch

    fwd = bwd = trained_rows = all_rows = 0.0
    for layer in model.layers:
        f = layer.bank.shape.flops_per_token()
        rows = torch.bincount(routed[layer.layer_idx].reshape(-1).clamp_min(0),
                              minlength=layer.num_experts).tolist()
        for e, n in enumerate(rows):
            trained = layer.bank.experts[e].trainable
            fwd += n * f
            all_rows += n
            trained_rows += n * trained
            bwd += n * f * (int(trained) + int(input_grad[layer.layer_idx]
                                               and (trained or not detach)))
    return {"expert_fwd_flops": fwd, "expert_bwd_flops": bwd, "expert_flops": fwd + bwd,
            "trained_row_fraction": round(trained_rows / max(all_rows, 1.0), 4)}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and measure one configuration in this process (see the module docstring)."""
    import torch

    from device_agent.costs import _experts_skipped
    from device_agent.throughput import PeakRSSSampler, _rss_bytes
    from hfedmoe.config import MethodConfig, TrainConfig
    from hfedmoe.importance import compute_batch_stats
    from hfedmoe.names import ExpertId
    from hfedmoe.trainer import make_optimizer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rss_runtime = _rss_bytes()
    model = _build(spec)
    model.set_expert_impl(spec["path"], bool(spec.get("detach_frozen")))
    batch = _batch(model, spec["batch_size"], spec["seq_len"], spec.get("num_labels", 8))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if spec.get("dtype") == "bfloat16"
                else None)

    def ctx() -> Any:
        import contextlib

        return autocast if autocast is not None else contextlib.nullcontext()

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # as train_round does under bf16 with train.hold_frozen_lowp: frozen matmul weights stored
    # in bf16 for the round (the routing pass included), what trains put back to fp32
    low = None
    if autocast is not None and spec.get("frozen_lowp", False):
        from hfedmoe.precision import LowPrecisionFrozen

        low = LowPrecisionFrozen(model.module, torch.bfloat16)
        low.lower()
    with torch.no_grad(), ctx(), model.capture(batch["attention_mask"]) as cap:
        model.module(**inputs)
    active = {ExpertId(li, e) for li, e in spread_experts(cap.routed, spec["budget"])}
    model.set_trainable(active)
    if low is not None:
        low.restore(only=model.trainable_parameters().values())
    # as train_round's trainer builds it: the round's experts, gates and head only
    optimizer = make_optimizer(model.trainable_parameters(), TrainConfig(lr=1e-4))
    capture = spec.get("recipe") in ("round", "compare")  # usage from the training forward
    input_grad: dict[int, bool] = {}
    hooks = [layer.bank.register_forward_pre_hook(
        lambda _m, args, li=layer.layer_idx: input_grad.__setitem__(li, args[0].requires_grad))
        for layer in model.layers]
    skip = spec.get("skip_experts", False)

    def step() -> None:
        with ctx():
            if skip:
                with _experts_skipped(model):
                    loss = model.module(**batch).loss
            elif capture:
                with model.capture(batch["attention_mask"]) as c:
                    loss = model.module(**batch).loss
                compute_batch_stats(c.scores, c.routed, MethodConfig())
            else:
                loss = model.module(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def routing() -> None:
        with torch.no_grad(), ctx(), model.capture(batch["attention_mask"]) as c:
            model.module(**inputs)
        compute_batch_stats(c.scores, c.routed, MethodConfig())

    rss_before = _rss_bytes()
    with PeakRSSSampler() as sampler:
        for _ in range(spec["warmup"]):
            step()
    for h in hooks:
        h.remove()
    steps, routes, cpu = [], [], []
    plain: list[float] = []
    compare = spec.get("recipe") == "compare"
    for _ in range(spec["repeats"]):  # interleaved, so load drift hits both alike
        if compare:
            # the per-batch recipe (routing pre-pass, then a step without capture), alternated
            # with the round recipe's step (its forward captures the gates) below
            capture = False
            t0 = time.perf_counter()
            routing()
            step()
            plain.append(time.perf_counter() - t0)
            capture = True
        t0 = time.perf_counter()
        routing()
        routes.append(time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        steps.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    with model.capture(batch["attention_mask"]) as cap, torch.no_grad(), ctx():
        model.module(**inputs)
    flops = ({"expert_fwd_flops": 0.0, "expert_bwd_flops": 0.0, "expert_flops": 0.0,
              "trained_row_fraction": 0.0} if skip
             else _flops(model, cap.routed, input_grad, bool(spec.get("detach_frozen"))))
    return {
        "descriptor": _descriptor(model, spec),
        "trained_experts": len(active),
        "step_s": statistics.median(steps), "step_min_s": min(steps), "step_max_s": max(steps),
        "routing_s": statistics.median(routes), "routing_min_s": min(routes),
        "routing_max_s": max(routes),
        "train_peak_bytes": max(0, sampler.max_bytes - rss_before),
        "model_peak_bytes": max(0, sampler.max_bytes - rss_runtime),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_samples_s": [round(t, 4) for t in steps],
        "step_cpu_s": statistics.median(cpu),
        **({"per_batch_recipe_s": statistics.median(plain),
            "per_batch_recipe_samples_s": [round(t, 4) for t in plain]} if plain else {}),
        **flops,
    }


def measure_round(spec: dict[str, Any]) -> dict[str, Any]:
    """A device's round as the agent runs it, predicted and then measured, in this process.

    Build the model, measure its costs at the announced shape (``measure_costs``, as the agent
    does at start-up), run the round's routing pass over real local batches (the bundled data,
    padded to the announced length), select ``budget`` experts by HFedMoE's Eq. 15 on the
    round's mean I_b, predict the step time and the whole-process peak from the routed rows
    (``CostModel.routed_step_seconds`` / ``routed_peak_bytes``, baseline = this process's RSS
    just before training), then train that set on real batches: peak RSS over the warm-up
    steps (optimizer state is created in the first) and the median time of the timed steps.
    """
    import dataclasses

    import torch

    from device_agent.budget import layers_of
    from device_agent.costs import measure_costs, release_freed_memory, resident_bytes
    from device_agent.heap import after_step, cpu_matmul, heap_policy, training_kernels
    from device_agent.throughput import PeakRSSSampler
    from device_agent.train import round_batches, routing_pass, selection_sample
    from hfedmoe.config import DataConfig, MethodConfig, TrainConfig
    from hfedmoe.data import collate, load_task
    from hfedmoe.strategies import get_strategy
    from hfedmoe.trainer import EagerTrainer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    batch_size, seq_len = spec["batch_size"], spec["seq_len"]
    task = load_task(DataConfig())
    model = _build({**spec, "num_labels": task.num_labels})
    if model.tokenizer is None:  # a tiny random family: MiniLM's tokenizer for real text
        from hfedmoe.models.hf import build_hf_model
        from hfedmoe.models.minilm import load_minilm

        tokenizer = load_minilm()[1]
        model = build_hf_model(model.family, "classification", num_labels=task.num_labels,
                               vocab_size=tokenizer.vocab_size)
        model.tokenizer = tokenizer
        model.set_expert_impl(spec["path"])
    adapter = spec.get("adapter", "full")
    if spec.get("quantize", "none") != "none":  # the frozen base, as a device stores it
        from hfedmoe.models.quantize import quantize_model

        quantize_model(model, spec["quantize"])
    costs = measure_costs(model, batch_size, seq_len, repeats=spec.get("cost_repeats", 3),
                          adapter=adapter)
    train_cfg = TrainConfig(batch_size=batch_size, lr=1e-4, adapter=adapter)
    mcfg = MethodConfig()
    batches = round_batches(task.train, train_cfg, 0, 0)
    stats = routing_pass(model, task.train, selection_sample(batches, spec.get("selection", 4)),
                         mcfg, train_cfg, seq_len, pad_to_max_length=True)
    ranked = list(get_strategy("hfedmoe", mcfg).select(stats, spec["budget"]).ranked())
    release_freed_memory()  # as the agent's planner does before reading its baseline
    resident = resident_bytes()
    cost = dataclasses.replace(costs.cost, process_baseline_bytes=resident)
    rows = dict(stats.expert_rows)
    all_rows = sum(rows.values())
    trained_rows = [rows.get(e, 0.0) for e in ranked]
    predicted_step = cost.routed_step_seconds(trained_rows, all_rows, stats.batch_rows)
    predicted_peak = cost.routed_peak_bytes(trained_rows, all_rows, stats.batch_rows,
                                            layers_of(ranked))
    trainer = EagerTrainer(model, ranked, train_cfg, mcfg)
    encoded = [collate(task.train, idx, model.tokenizer, seq_len, pad_to_max_length=True)
               for idx in batches[: spec["warmup"] + spec["repeats"]]]
    steps = []
    with training_kernels("float32", "cpu"), PeakRSSSampler(interval=0.05) as sampler:
        # the peak over every step of the round, on the kernels the agent's round uses
        for i, batch in enumerate(encoded):
            t0 = time.perf_counter()
            trainer.step(batch)
            after_step()  # as the agent's round does (device_agent.train)
            if i >= spec["warmup"]:
                steps.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    routing_pass(model, task.train, batches[:1], mcfg, train_cfg, seq_len, pad_to_max_length=True)
    return {
        "descriptor": _descriptor(model, spec),
        "trained_experts": len(ranked), "optimizer_experts": trainer.state_experts(),
        "trained_row_fraction": round(sum(trained_rows) / max(all_rows, 1.0), 4),
        "balanced_row_fraction": round(len(ranked) / cost.num_experts, 4),
        "predicted_step_s": predicted_step, "balanced_step_s": cost.step_seconds(len(ranked)),
        "step_s": statistics.median(steps), "step_min_s": min(steps), "step_max_s": max(steps),
        "routing_batch_s": time.perf_counter() - t0,
        "predicted_peak_bytes": predicted_peak, "measured_peak_bytes": sampler.max_bytes,
        "resident_bytes": resident, "heap": heap_policy(), "cpu_matmul": cpu_matmul(),
        "step_samples_s": [round(t, 4) for t in steps],
        "cost": dataclasses.asdict(cost),
    }


def measure_in_subprocess(spec: dict[str, Any], timeout: float = 600,
                          isolate: bool = True) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process; returns its result merged with ``spec``.

    ``isolate=False`` measures in this process instead (quick smoke runs: no interpreter start
    per configuration, but memory figures then include what earlier configurations left).
    """
    if not isolate:
        run = measure_round if spec.get("mode") == "round" else measure
        before = os.environ.get("HFEDMOE_CPU_MATMUL")
        if spec.get("cpu_matmul"):  # read at each round, so it applies in this process too
            os.environ["HFEDMOE_CPU_MATMUL"] = spec["cpu_matmul"]
        try:
            return {**spec, **run(spec), "isolated": False}
        finally:
            if before is None:
                os.environ.pop("HFEDMOE_CPU_MATMUL", None)
            else:
                os.environ["HFEDMOE_CPU_MATMUL"] = before
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if spec.get("heap"):  # the C heap's policy of the worker (device_agent.heap)
        env["HFEDMOE_HEAP"] = spec["heap"]
    if spec.get("cpu_matmul"):  # a float32 round's CPU matmuls (device_agent.heap)
        env["HFEDMOE_CPU_MATMUL"] = spec["cpu_matmul"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.stepcost", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed for {spec}: {proc.stderr[-2000:]}")
    return {**spec, **json.loads(lines[-1]), "isolated": True}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m benchmarks.stepcost '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(args[0])
    print(json.dumps(measure_round(spec) if spec.get("mode") == "round" else measure(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
