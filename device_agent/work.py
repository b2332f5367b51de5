"""What one training step of a model computes, moves and holds, counted from its shapes.

A :class:`PlannedMode` is one way to train a model (whole experts or LoRA factors, over an
fp32 / bf16 / int8 / int4 base) as counts with no clock in them: the memory terms of a
:class:`~device_agent.budget.CostModel` and a :class:`StepWork` (the FLOPs and bytes of each
time term). :meth:`PlannedMode.cost` puts a device's rates on it: each term takes
``max(FLOPs / rate, bytes / bandwidth)`` (a roofline), and an optimizer step, which is
memory-bound, takes its bytes over the bandwidth. Planning from counts and a profile's rates
is deterministic: the same model, profile and settings give the same budget on any host.

What is counted (an estimate, stated in every plan):

- weights per dtype: fp32 4 B, bf16 2 B per parameter; int8 / int4 are what ``model.quantize``
  stores (:mod:`hfedmoe.quantize`); activations in bf16 over a bf16 or int4 base, else fp32;
- a frozen expert's step: its forward and the gradient to its input (2x its forward FLOPs,
  its weights read twice); a trained one adds the weight gradient (3x) or, with LoRA, the
  rank-r factors' forward and backward, and its optimizer step (AdamW reads and writes
  weight, gradient and both moments: 28 B per fp32 parameter; SGD 12 B);
- the non-expert step: 4 FLOPs per dense weight per token (forward and input gradient), 2
  more per trainable non-expert parameter, attention scores; the routing pass: a forward;
- the non-expert activations: ``8 x hidden`` elements per token per layer, the k expert
  outputs per token of each MoE layer (kept for the gates' gradients), a float32 row per token
  of each normalization layer's input plus, for a causal LM, what the loss holds per logit at
  its peak (:data:`LOGIT_PEAK_BYTES`), plus gradients and AdamW state of the trainable
  non-expert parts (routers, shared experts) in fp32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from device_agent.budget import (
    CostModel,
    expert_activation_bytes,
    expert_state_bytes,
    frozen_activation_bytes,
    layer_input_bytes,
    tokens_per_expert,
    update_host_bytes,
)
from hfedmoe.errors import ConfigError
from hfedmoe.experts import ExpertShape
from hfedmoe.lora import LoRASpec, factor_params
from hfedmoe.models.base import MoEModel
from hfedmoe.models.plan import expert_weight_bytes, transformer_layers, weight_bytes_by_dtype

if TYPE_CHECKING:
    from device_agent.report import DeviceReport

# the dtype a base computes in: an int4 base's kernel runs on bf16 activations, int8's on fp32
COMPUTE_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "int8": "float32", "int4": "bfloat16"}
_OPTIMIZER_BYTES = {"adamw": 28, "sgd": 12}  # bytes an optimizer step moves per fp32 parameter
_DENSE_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5625}  # per dense weight


def rate_for(report: DeviceReport, dtype: str, field: str = "train.dtype") -> float:
    """The device's sustained matmul rate for ``dtype`` in FLOP/s.

    Raises:
        ConfigError: naming ``field`` when the device has no rate for ``dtype`` (a profile
            lists the dtypes its training processor runs).
    """
    gflops = report.gflops(dtype)
    if not gflops or gflops <= 0:
        proc = "gpu" if report.accelerator == "cuda" else "cpu"
        have = ", ".join(sorted(report.matmul)) or "none"
        raise ConfigError(f"{field} = {dtype!r}: device {report.source!r} has no {dtype} rate "
                          f"([{proc}] sustained_gflops has {have}): it cannot run {dtype}")
    return gflops * 1e9


def bandwidth_for(report: DeviceReport) -> float | None:
    """The device's memory bandwidth in bytes/s (None where unknown: no roofline)."""
    bw = report.memory_bandwidth_gbps
    return bw * 1e9 if bw else None


@dataclass(frozen=True)
class StepWork:
    """FLOPs and bytes moved by the time terms of one step (one expert at its balanced share
    of the batch's tokens; the non-expert part; one batch of the routing pass)."""

    rest_flops: float
    rest_bytes: float
    rest_optimizer_bytes: float
    routing_flops: float
    routing_bytes: float
    frozen_flops: float
    frozen_bytes: float
    trained_flops: float
    trained_bytes: float
    optimizer_bytes: float  # one trained expert's optimizer step

    def seconds(self, flops_per_s: float, bytes_per_s: float | None) -> dict[str, float]:
        """Each term's seconds at the given rates: ``max(FLOPs / rate, bytes / bandwidth)``."""
        def t(flops: float, moved: float) -> float:
            return max(flops / flops_per_s, moved / bytes_per_s if bytes_per_s else 0.0)

        opt = self.optimizer_bytes / bytes_per_s if bytes_per_s else 0.0
        frozen = t(self.frozen_flops, self.frozen_bytes)
        rest_opt = self.rest_optimizer_bytes / bytes_per_s if bytes_per_s else 0.0
        return {"rest": t(self.rest_flops, self.rest_bytes) + rest_opt,
                "routing": t(self.routing_flops, self.routing_bytes), "frozen": frozen,
                "trained": max(t(self.trained_flops, self.trained_bytes), frozen) + opt,
                "optimizer": opt}


@dataclass(frozen=True)
class PlannedMode:
    """One way to train a model, counted: memory terms (times 0) and the step's work."""

    adapter: str  # "full" or "lora"
    base: str  # storage of the frozen base: fp32, bf16, int8, int4
    dtype: str  # the dtype its matmuls run in (the rate that applies)
    memory: CostModel
    work: StepWork
    model_params: int

    def cost(self, flops_per_s: float, bytes_per_s: float | None) -> CostModel:
        """The cost model at a device's rates (FLOP/s for :attr:`dtype`, bytes/s)."""
        s = self.work.seconds(flops_per_s, bytes_per_s)
        return dataclasses.replace(
            self.memory, rest_step_seconds=s["rest"], routing_seconds=s["routing"],
            expert_frozen_seconds=s["frozen"], expert_trained_seconds=s["trained"],
            expert_optimizer_seconds=s["optimizer"])

    def cost_on(self, report: DeviceReport, field: str = "train.dtype") -> CostModel:
        """The cost model at ``report``'s rate for :attr:`dtype` and its bandwidth."""
        return self.cost(rate_for(report, self.dtype, field), bandwidth_for(report))


def base_for(quantize: str, dtype: str) -> str:
    """The plan's base for a device's ``model.quantize`` and ``train.dtype``."""
    if quantize in ("int8", "int4"):
        return quantize
    return "fp32" if dtype == "float32" else "bf16"


def dense_linear_params(model: MoEModel) -> int:
    """Weights of the network's ``nn.Linear`` layers (the experts are not among them)."""
    seen: set[int] = set()
    n = 0
    for mod in model.module.modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            n += mod.weight.numel()
    return n


def _rest_flops(model: MoEModel, batch: int, seq: int, trainable_rest: int
                ) -> tuple[float, float]:
    """FLOPs of the non-expert step and of one routing batch (a forward of everything)."""
    shape = model.layers[0].bank.shape
    rows = batch * seq
    cfg = getattr(model.module, "config", None)
    n_layers = transformer_layers(model)
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    head_dim = getattr(cfg, "head_dim", None) or (shape.d_model // heads if heads else 0)
    attn = 4 * batch * seq * seq * heads * head_dim * n_layers  # QK^T and AV, forward
    dense = dense_linear_params(model)
    rest = 4 * dense * rows + 2 * trainable_rest * rows + 2 * attn
    routing = (2 * dense * rows + attn
               + sum(x.top_k for x in model.layers) * shape.flops_per_token() * rows)
    return float(rest), float(routing)


def _lora_factor_flops(shape: ExpertShape, rank: int) -> int:
    """Forward FLOPs per token of one expert's rank-``rank`` factors (both projections)."""
    d_in = shape.d_ff * (2 if shape.gated else 1)
    return 2 * rank * (shape.d_model + d_in) + 2 * rank * (shape.d_ff + shape.d_model)


def step_work(model: MoEModel, adapter: str, base: str, batch: int, seq: int,
              optimizer: str, rank: int, trainable_rest: int) -> StepWork:
    """The FLOPs and bytes of a step's time terms for one mode (see the module doc)."""
    layer = model.layers[0]
    shape = layer.bank.shape
    tokens = tokens_per_expert(batch, seq, layer.top_k, layer.num_experts)
    fwd = shape.flops_per_token() * tokens
    w = expert_weight_bytes(model, base)
    per_param = _OPTIMIZER_BYTES.get(optimizer, _OPTIMIZER_BYTES["adamw"])
    if adapter == "full":
        trained_flops, trained_params = 3.0 * fwd, shape.params_per_expert
    else:
        trained_flops = 2.0 * fwd + 3.0 * _lora_factor_flops(shape, rank) * tokens
        trained_params = _lora_trained_params(shape, rank)
    rest, routing = _rest_flops(model, batch, seq, trainable_rest)
    dense = dense_linear_params(model) * _DENSE_BYTES[base]
    num_experts = sum(x.num_experts for x in model.layers)
    return StepWork(
        rest_flops=rest, rest_bytes=2 * dense, rest_optimizer_bytes=trainable_rest * per_param,
        routing_flops=routing, routing_bytes=dense + num_experts * w,
        frozen_flops=2.0 * fwd, frozen_bytes=2.0 * w,
        trained_flops=trained_flops, trained_bytes=3.0 * w,
        optimizer_bytes=float(trained_params * per_param))


def planned_mode(model: MoEModel, adapter: str, base: str, batch: int, seq: int,
                 optimizer: str = "adamw", rank: int = 8, dtype: str | None = None
                 ) -> PlannedMode:
    """Count one mode of ``model`` at ``batch x seq``: memory terms and step work.

    Args:
        adapter: "full" (whole experts train) or "lora" (rank-``rank`` factors train).
        base: storage of the frozen base: fp32, bf16, int8 or int4.
        dtype: the dtype its matmuls run in (default: the base's, :data:`COMPUTE_DTYPE`).
    """
    if adapter not in ("full", "lora") or base not in COMPUTE_DTYPE:
        raise ConfigError(f"unknown mode {adapter}-{base}: adapter full or lora, base one of "
                          f"{sorted(COMPUTE_DTYPE)}")
    layer = model.layers[0]
    shape = layer.bank.shape
    tokens = tokens_per_expert(batch, seq, layer.top_k, layer.num_experts)
    num_experts = sum(x.num_experts for x in model.layers)
    model.set_trainable(())  # gates and head train in every step
    trainable_rest = sum(p.numel() for p in model.trainable_parameters().values())
    rest = trainable_rest if adapter == "full" else _lora_rest(model, trainable_rest, rank)
    e_weight = expert_weight_bytes(model, base)
    memory = CostModel(
        num_experts=num_experts,
        non_expert_weight_bytes=weight_bytes_by_dtype(model)[base] - num_experts * e_weight,
        expert_weight_bytes=e_weight,
        **_trained_expert_bytes(shape, adapter, base, tokens, optimizer, rank,
                                _lora_trained_params(shape, rank)),
        non_expert_activation_bytes=_non_expert_activation_bytes(model, base, batch * seq,
                                                                 rest, optimizer),
        expert_rows=tokens, batch_rows=batch * seq, num_layers=len(model.layers),
        layer_input_bytes=layer_input_bytes(tokens, layer.num_experts, shape.d_model,
                                            dtype_bytes=_activation_dtype_bytes(base)))
    return PlannedMode(adapter, base, dtype or COMPUTE_DTYPE[base], memory,
                       step_work(model, adapter, base, batch, seq, optimizer, rank, rest),
                       sum(p.numel() for p in model.module.parameters()))


def _activation_dtype_bytes(base: str) -> int:
    """Bytes per activation: a bf16 or int4 base computes in bf16, fp32 and int8 in fp32."""
    return 2 if base in ("bf16", "int4") else 4


# Bytes per logit element at a causal-LM step's peak with transformers' loss: the logits
# (kept by the output), their fp32 copy, the log-softmax output saved for the backward, then
# the loss's, the log-softmax's and the shift's gradients. Measured by RSS on this project's
# CPU for 128 x 50,304 logits: 17.1 B with fp32 compute, 20.0 B under bf16 autocast (the
# fp32 upcast on top of the bf16 logits); by the activation dtype's size.
LOGIT_PEAK_BYTES = {4: 17, 2: 20}


def _non_expert_activation_bytes(model: MoEModel, base: str, rows: int, trainable_rest: int,
                                 optimizer: str) -> int:
    """Memory of the non-expert part of a step: ``8 x hidden`` activations per token per
    layer; each MoE layer's k expert outputs per token, which the combine keeps for the
    gates' gradients; each norm's input, upcast to fp32 and kept (:func:`norm_modules`); a
    causal LM's logits as its loss holds them at the peak; and the gradients and optimizer
    state of the trainable non-expert parts (routers, shared experts).

    The combine and the norms were measured with saved-tensor hooks on OLMoE-1B-7B's first two
    decoder layers at the real widths (batch 1 x 128, bf16): per decoder layer 4.2 MB of
    expert outputs (128 x 8 x 2048 in bf16) and four fp32 norm inputs of 1.05 MB each, where
    ``8 x hidden`` alone counted 4.2 MB per layer."""
    cfg = getattr(model.module, "config", None)
    n_layers = transformer_layers(model)
    hidden = model.layers[0].bank.shape.d_model
    act = _activation_dtype_bytes(base)
    vocab = getattr(cfg, "vocab_size", 0) or 0
    logits = (rows * vocab * LOGIT_PEAK_BYTES[act]
              if model.task in ("causal-lm", "seq2seq") else 0)
    combine = act * rows * hidden * sum(layer.top_k for layer in model.layers)
    norms = 4 * rows * hidden * norm_modules(model)
    return (act * rows * 8 * hidden * n_layers + combine + norms + logits
            + expert_state_bytes(trainable_rest, optimizer))


def norm_modules(model: MoEModel) -> int:
    """The network's normalization layers (RMSNorm and LayerNorm of any family, by class
    name): each keeps its input as a float32 row per token for the backward (transformers'
    RMSNorm upcasts; autocast runs layer_norm in float32)."""
    return sum(1 for m in model.module.modules()
               if type(m).__name__.endswith("Norm"))


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
    intermediates), what a frozen one saves, and its update's host buffers (a discrete GPU's
    host pool), as :class:`CostModel` fields."""
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
    return {"expert_state_bytes": state,
            "expert_activation_bytes": expert_activation_bytes(
                tokens, shape.d_model, shape.d_ff, dtype_bytes=act, gated=shape.gated,
                with_input=False, activation=shape.activation) + rank_act,
            "expert_grad_bytes": grad_b * trained, "expert_snapshot_bytes": snapshot,
            "host_per_expert_bytes": update_host_bytes(trained),
            "expert_frozen_activation_bytes": frozen_activation_bytes(
                tokens, shape.d_ff, gated=shape.gated, activation=shape.activation,
                dtype_bytes=act)}


