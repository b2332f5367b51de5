"""Costs and budgets of a model planned from its ``config.json``
(:func:`hfedmoe.models.plan.build_meta_model`): ``hfedmoe profile --model DIR``.

:func:`plan_costs` times ONE expert of the real
:class:`~hfedmoe.experts.ExpertShape` on this device (trained in full, trained through LoRA
factors, and frozen) at its balanced share of ``batch x seq`` tokens, counts everything else
from the config, builds a :class:`device_agent.budget.CostModel` per mode (full / LoRA x fp32 /
bf16 base, LoRA over an int8 / int4 base) and decides the budget each mode allows.

What is counted, not measured (an estimate, stated in every result):

- weights per dtype: fp32 4 B, bf16 2 B per parameter; int8 / int4 are what ``model.quantize``
  stores (:mod:`hfedmoe.quantize`): expert weights and the other frozen ``nn.Linear`` weights
  quantized (int8: 1 B + one fp32 scale per output row; int4: 0.5 B + a bf16 scale and zero
  point per 32 input features, int8 where int4 cannot pack), everything else fp32;
- the non-expert step time: its matmul FLOPs (4 per frozen linear weight per token: forward and
  input gradient, 2 more for trained gates and shared parts, plus attention scores) at the
  throughput the timed frozen expert achieved here;
- the non-expert activations: ``8 x hidden`` elements per token per layer (attention inputs,
  projections, norms; encoder and decoder blocks of a text-to-text model) plus fp32 logits and
  their gradient for a language model (causal or text-to-text), plus gradients and
  AdamW state of the trainable non-expert parts (routers, shared experts) in fp32.

Run ``python -m benchmarks.plan --out benchmarks/results/plan.jsonl`` to write one JSON
line per (model, profile, mode) budget of the shipped examples (``examples/models``).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from device_agent.budget import (
    CostModel,
    expert_activation_bytes,
    expert_state_bytes,
    tokens_per_expert,
)
from device_agent.costs import _optimizer, decide_budget
from hfedmoe.experts import Expert, ExpertShape
from hfedmoe.lora import ExpertFactors, LoRASpec, factor_params
from hfedmoe.models.base import MoEModel
from hfedmoe.models.plan import (
    MODES,
    QUANT_NOTE,
    expert_weight_bytes,
    transformer_layers,
    weight_bytes_by_dtype,
)


def _median_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_expert(model: MoEModel, tokens: int, optimizer: str = "adamw", rank: int = 8,
                repeats: int = 3) -> dict[str, float]:
    """Seconds of ONE expert of the model's real shape here: trained (forward, backward,
    optimizer step), trained through rank-``rank`` LoRA factors, and frozen (forward and the
    backward to its input), on ``tokens`` rows."""
    with torch.device("cpu"):
        expert = Expert(model.layers[0].bank.shape)
    x = torch.randn(tokens, expert.shape.d_model)
    full_opt = _optimizer(list(expert.parameters()), optimizer)
    factors = ExpertFactors(expert.w_in, expert.w_out, LoRASpec(rank=rank))
    lora_params = [p for n, p in expert.named_parameters() if n.startswith("b_")]
    lora_params += list(factors.factors.values())
    lora_opt = _optimizer(lora_params, optimizer)

    def step(trained: list[torch.Tensor], opt: Any, with_factors: bool) -> None:
        expert.requires_grad_(not with_factors)
        for t in trained:
            t.requires_grad_(True)
        expert.factors = factors if with_factors else None
        expert(x.clone().requires_grad_(True)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def frozen() -> None:
        expert.requires_grad_(False)
        expert.factors = None
        expert(x.clone().requires_grad_(True)).sum().backward()

    out = {"full": _median_seconds(lambda: step(list(expert.parameters()), full_opt, False),
                                   repeats),
           "lora": _median_seconds(lambda: step(lora_params, lora_opt, True), repeats),
           "frozen": _median_seconds(frozen, repeats)}
    out["frozen"] = min(out["frozen"], out["full"], out["lora"])
    return out


def _dense_linear_params(model: MoEModel) -> int:
    seen: set[int] = set()
    n = 0
    for mod in model.module.modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            n += mod.weight.numel()
    return n


def _step_seconds(model: MoEModel, times: dict[str, float], batch: int, seq: int,
                  tokens: int, trainable_rest: int) -> tuple[float, float, float]:
    """Time terms: the throughput the timed frozen expert achieved here, and at that rate the
    non-expert step (its matmul FLOPs plus attention) and the routing pre-pass (a forward of
    the dense parts, attention and every routed expert).

    Returns:
        (FLOP/s, non-expert step seconds, routing pre-pass seconds).
    """
    shape = model.layers[0].bank.shape
    rows = batch * seq
    cfg = getattr(model.module, "config", None)
    # throughput the frozen expert achieved (forward + input gradient: 2x forward FLOPs)
    flops_per_s = 2 * shape.flops_per_token() * tokens / max(times["frozen"], 1e-9)
    n_layers = transformer_layers(model)
    hidden = shape.d_model
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads else hidden)
    attn = 4 * batch * seq * seq * heads * head_dim * n_layers  # QK^T and AV, forward
    dense = _dense_linear_params(model)
    rest_flops = 4 * dense * rows + 2 * trainable_rest * rows + 2 * attn
    rest_seconds = rest_flops / flops_per_s
    routing_seconds = (2 * dense * rows + attn
                       + sum(x.top_k for x in model.layers) * shape.flops_per_token() * rows
                       ) / flops_per_s
    return flops_per_s, rest_seconds, routing_seconds


def _activation_dtype_bytes(base: str) -> int:
    """Bytes per activation: a bf16 or int4 base computes in bf16, fp32 and int8 in fp32."""
    return 2 if base in ("bf16", "int4") else 4


def _non_expert_activation_bytes(model: MoEModel, base: str, rows: int, trainable_rest: int,
                                 optimizer: str) -> int:
    """Memory of the non-expert part of a step: ``8 x hidden`` activations per token per
    layer, a language model's fp32 logits and their gradient, and the gradients and optimizer
    state of the trainable non-expert parts (routers, shared experts)."""
    cfg = getattr(model.module, "config", None)
    n_layers = transformer_layers(model)
    hidden = model.layers[0].bank.shape.d_model
    vocab = getattr(cfg, "vocab_size", 0) or 0
    logits = 2 * rows * vocab * 4 if model.task in ("causal-lm", "seq2seq") else 0
    return (_activation_dtype_bytes(base) * rows * 8 * hidden * n_layers + logits
            + expert_state_bytes(trainable_rest, optimizer))


def _lora_rest(model: MoEModel, trainable_rest: int, rank: int) -> int:
    """The trainable non-expert elements of a LoRA round: those of a full one less the LoRA
    bases' weights (shared experts), plus the rank-``rank`` factors of every base."""
    trained = model.trainable_parameters()
    frozen = sum(trained[k].numel() for k in model.lora_bases if k in trained)
    factors = sum(rank * sum(model.parameter(k).shape) for k in model.lora_bases)
    return trainable_rest - frozen + factors


def _lora_trained_params(shape: ExpertShape, rank: int) -> int:
    """Elements a LoRA-trained expert trains: its rank-``rank`` factors and its biases."""
    d_in = shape.d_ff * (2 if shape.gated else 1)
    biases = (d_in + shape.d_model) if shape.bias else 0
    return factor_params(shape.d_model, d_in, shape.d_ff, LoRASpec(rank=rank)) + biases


def _trained_expert_bytes(shape: ExpertShape, adapter: str, base: str, tokens: int,
                          optimizer: str, rank: int, lora_trained: int) -> dict[str, int]:
    """Memory terms of one expert in a mode: what a trained one holds (optimizer state,
    gradients, the starting values for the delta, saved activations with LoRA's rank-r
    intermediates) and what a frozen one saves, as :class:`CostModel` fields."""
    act = _activation_dtype_bytes(base)
    pbytes = 2 if base == "bf16" else 4
    if adapter == "full":
        ppe = shape.params_per_expert
        trained, grad_b = ppe, pbytes
        state = expert_state_bytes(ppe, optimizer, param_dtype_bytes=pbytes)
        snapshot, rank_act = pbytes * ppe, 0
    else:
        trained, grad_b = lora_trained, 4
        state = expert_state_bytes(trained, optimizer)
        snapshot, rank_act = 4 * trained, tokens * 2 * rank * act
    d_in = shape.d_ff * (2 if shape.gated else 1)
    return {"expert_state_bytes": state,
            "expert_activation_bytes": expert_activation_bytes(
                tokens, shape.d_model, shape.d_ff, dtype_bytes=act, gated=shape.gated)
            + rank_act,
            "expert_grad_bytes": grad_b * trained, "expert_snapshot_bytes": snapshot,
            "expert_frozen_activation_bytes": tokens * d_in * act}


def cost_models(model: MoEModel, times: dict[str, float], batch: int, seq: int,
                optimizer: str = "adamw", rank: int = 8) -> dict[str, Any]:
    """A :class:`~device_agent.budget.CostModel` per mode from the timed expert and the
    config's counts (see the module doc for what is estimated)."""
    layer = model.layers[0]
    shape = layer.bank.shape
    tokens = tokens_per_expert(batch, seq, layer.top_k, layer.num_experts)
    rows = batch * seq
    num_experts = sum(x.num_experts for x in model.layers)
    weights = weight_bytes_by_dtype(model)
    model.set_trainable(())
    trainable_rest = sum(p.numel() for p in model.trainable_parameters().values())
    flops_per_s, rest_seconds, routing_seconds = _step_seconds(model, times, batch, seq, tokens,
                                                               trainable_rest)
    lora_trained = _lora_trained_params(shape, rank)
    rest = {"full": trainable_rest, "lora": _lora_rest(model, trainable_rest, rank)}
    out = {}
    for adapter, base in MODES:
        e_weight = expert_weight_bytes(model, base)
        seconds = times["full"] if adapter == "full" else times["lora"]
        out[f"{adapter}-{base}"] = CostModel(
            num_experts=num_experts,
            non_expert_weight_bytes=weights[base] - num_experts * e_weight,
            expert_weight_bytes=e_weight,
            **_trained_expert_bytes(shape, adapter, base, tokens, optimizer, rank, lora_trained),
            non_expert_activation_bytes=_non_expert_activation_bytes(
                model, base, rows, rest[adapter], optimizer),
            rest_step_seconds=rest_seconds,
            expert_frozen_seconds=times["frozen"],
            expert_trained_seconds=max(seconds, times["frozen"]),
            routing_seconds=routing_seconds,
            expert_rows=tokens, batch_rows=rows)
    return {"tokens_per_expert": tokens, "lora_rank": rank, "costs": out,
            "flops_per_second": flops_per_s}


def plan_costs(model: MoEModel, report: Any, batch: int, seq: int, deadline: float,
               steps: int, host: Any = None, optimizer: str = "adamw", rank: int = 8,
               repeats: int = 3, times: dict[str, float] | None = None) -> dict[str, Any]:
    """Time one expert of the real shape here and decide the budget of every mode."""
    layer = model.layers[0]
    tokens = tokens_per_expert(batch, seq, layer.top_k, layer.num_experts)
    times = times or time_expert(model, tokens, optimizer, rank, repeats)
    built = cost_models(model, times, batch, seq, optimizer, rank)
    modes = {}
    for name, cost in built["costs"].items():
        budget = decide_budget(report, cost, deadline, steps, host=host)
        adapter, base = name.split("-")
        modes[name] = {"adapter": adapter, "base": base,
                       "per_trained_expert_bytes": cost.per_trained_expert_bytes,
                       "weight_bytes": cost.resident_bytes,
                       "budget": {k: v for k, v in dataclasses.asdict(budget).items()
                                  if k not in ("limits",)}}
    return {"model": str(model.info.get("source", model.family)), "family": model.family,
            "batch": batch, "seq": seq, "tokens_per_expert": tokens, "lora_rank": rank,
            "expert_seconds": times, "planned": True, "note": QUANT_NOTE,
            "estimated": "weights, state and activations counted from the config; the "
                         "non-expert step time from its FLOPs at the timed expert's rate",
            "modes": modes}


def print_plan_costs(costs: dict[str, Any]) -> None:
    t = costs["expert_seconds"]
    table = Table(title=f"{costs['model']}: batch {costs['batch']} x seq {costs['seq']} "
                        f"({costs['tokens_per_expert']} tokens per expert); one expert here: "
                        f"full {t['full'] * 1e3:.1f} ms, LoRA r{costs['lora_rank']} "
                        f"{t['lora'] * 1e3:.1f} ms, frozen {t['frozen'] * 1e3:.1f} ms")
    for col in ("mode", "weights", "per trained expert", "C_budget", "limited by",
                "step / peak"):
        table.add_column(col)
    for name, m in costs["modes"].items():
        b = m["budget"]
        table.add_row(name, f"{m['weight_bytes'] / 2**30:.2f} GiB",
                      f"{m['per_trained_expert_bytes'] / 2**20:.1f} MiB",
                      f"{b['c_budget']} of {b['cost']['num_experts']}",
                      f"{b['limit']} (memory allows {b['memory_max']}, "
                      f"time {b['time_max']})",
                      f"{b['step_seconds']:.2f} s / {b['peak_bytes'] / 2**30:.2f} GiB")
    Console().print(table)
    print(costs["note"] + "; " + costs["estimated"] + ".")
