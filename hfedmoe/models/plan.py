"""Plan a real model size from its ``config.json`` alone: no weights are read or allocated.

:func:`build_meta_model` instantiates the model of a config-only directory on the meta device
(``torch.device("meta")``: shapes, no storage) and runs the kit's own conversion on it (the
hand adapters and the generic interface adapter both work on meta tensors), so the layout is
exactly the one a real checkpoint would get. :func:`plan_model` reads layers, MoE layers,
experts, top-k, parameters per expert, shared-expert and non-expert parameters, total vs
active parameters per token and the weights' memory per storage dtype from it.

:func:`plan_costs` (``hfedmoe profile --model DIR``) times ONE expert of the real
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
  projections, norms) plus fp32 logits and their gradient for a causal LM, plus gradients and
  AdamW state of the trainable non-expert parts (routers, shared experts) in fp32.

Run ``python -m hfedmoe.models.plan --out benchmarks/results/plan.jsonl`` to write one JSON
line per (model, profile, mode) budget of the shipped examples (``examples/models``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfedmoe.errors import ModelError
from hfedmoe.models.base import MoEModel

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.msgpack", "*.h5")
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples" / "models"
DTYPES = ("fp32", "bf16", "int8", "int4")
# (train.adapter, storage of the frozen base); a quantized base trains LoRA factors only
MODES: tuple[tuple[str, str], ...] = (("full", "fp32"), ("full", "bf16"), ("lora", "fp32"),
                                      ("lora", "bf16"), ("lora", "int8"), ("lora", "int4"))
QUANT_NOTE = "int8/int4 base only with LoRA: a quantized base cannot train (hfedmoe.quantize)"


def is_config_only(path: str | Path) -> bool:
    """A directory with a ``config.json`` and no weight files."""
    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file()
            and not any(next(p.glob(pat), None) for pat in WEIGHT_PATTERNS))


@contextlib.contextmanager
def _meta_conversion() -> Iterator[None]:
    """Build and convert on the meta device. The generic adapter's activation probe compares
    values, which meta tensors do not have: it runs on the CPU (a 257-point vector)."""
    from hfedmoe.models import generic

    probe = generic._probe_activation

    def cpu_probe(act_fn: Any) -> str | None:
        with torch.device("cpu"):
            return probe(act_fn)

    generic._probe_activation = cpu_probe
    try:
        with torch.device("meta"):
            yield
    finally:
        generic._probe_activation = probe


def build_meta_model(path: str | Path, task: str = "causal-lm", num_labels: int = 2) -> MoEModel:
    """The kit's MoE view of the model in ``path`` (a ``config.json``), on the meta device."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from hfedmoe.models.hf import _classifier, config_error, family_for_model_type, wrap_hf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise ModelError(f"{path}: {config_error(path, exc)}") from exc
    family = family_for_model_type(cfg.model_type)  # ModelError for an unsupported family
    try:
        with _meta_conversion():
            if task == "causal-lm" and family.causal:
                module = AutoModelForCausalLM.from_config(cfg)
            elif family.causal:
                module = _classifier(cfg, family, num_labels, AutoModel.from_config(cfg))
            else:
                from transformers import SwitchTransformersEncoderModel

                module = _classifier(cfg, family, num_labels, SwitchTransformersEncoderModel(cfg))
                task = "classification"
            model = wrap_hf(module, family, task, "grouped", info={"source": f"{path} (meta)"})
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything transformers raises on a bad config
        raise ModelError(f"{path}: cannot plan {cfg.model_type!r}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    real = [n for n, p in model.module.named_parameters() if not p.is_meta]
    if real:  # never expected: everything above ran under the meta device
        raise ModelError(f"{path}: {len(real)} tensors were allocated for real, e.g. {real[0]}")
    model.info["weights"] = "none (meta device)"
    return model


# --- sizes -------------------------------------------------------------------------------------
def _quantized_bytes(shape: tuple[int, int], mode: str) -> int:
    from hfedmoe.quantize import INT4_GROUP_SIZE, int4_packable

    rows, cols = shape
    if mode == "int4" and int4_packable(shape, torch.device("cpu")):
        return rows * cols // 2 + rows * (cols // INT4_GROUP_SIZE) * 2 * 2  # bf16 scale + zero
    return rows * cols + rows * 4  # int8 + an fp32 scale per output row


def _frozen_linear_weights(model: MoEModel) -> list[tuple[int, int]]:
    from hfedmoe.quantize import _frozen_linears

    return [tuple(mod.weight.shape) for _, mod in _frozen_linears(model)]


def shared_expert_params(model: MoEModel) -> int:
    """Parameters of the MoE blocks' shared experts (children named ``*shared*``)."""
    seen: set[int] = set()
    n = 0
    for layer in model.layers:
        block = model.module.get_submodule(layer.path)
        for name, child in block.named_children():
            if "shared" in name:
                for p in child.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        n += p.numel()
    return n


def weight_bytes_by_dtype(model: MoEModel) -> dict[str, int]:
    """Memory of every weight stored as fp32, bf16, or quantized as ``model.quantize`` does."""
    total = sum(p.numel() for p in model.module.parameters())
    out = {"fp32": 4 * total, "bf16": 2 * total}
    expert_shapes = []
    for layer in model.layers:
        for expert in layer.bank.experts:
            expert_shapes += [tuple(expert.w_in.shape), tuple(expert.w_out.shape)]
    shapes = expert_shapes + _frozen_linear_weights(model)
    quantized_numel = sum(r * c for r, c in shapes)
    for mode in ("int8", "int4"):
        out[mode] = 4 * (total - quantized_numel) + sum(_quantized_bytes(s, mode) for s in shapes)
    return out


def expert_weight_bytes(model: MoEModel, base: str) -> int:
    """One expert's weights stored as ``base``."""
    shape = model.layers[0].bank.shape
    if base in ("fp32", "bf16"):
        return shape.params_per_expert * (4 if base == "fp32" else 2)
    e = model.layers[0].bank.experts[0]
    biases = shape.params_per_expert - e.w_in.numel() - e.w_out.numel()
    return (_quantized_bytes(tuple(e.w_in.shape), base)
            + _quantized_bytes(tuple(e.w_out.shape), base) + 4 * biases)


def plan_model(model: MoEModel) -> dict[str, Any]:
    """Everything ``hfedmoe models inspect`` prints for a planned (or real) model."""
    info = model.summary()
    cfg = getattr(model.module, "config", None)
    layers = next((getattr(cfg, a) for a in ("num_hidden_layers", "num_layers", "n_layer")
                   if isinstance(getattr(cfg, a, None), int)), model.num_layers)
    shared = shared_expert_params(model)
    total = info["total_params"]
    plan = {
        "family": info["family"], "task": info["task"],
        "model_type": getattr(cfg, "model_type", ""),
        "layers": layers, "moe_layers": info["moe_layers"],
        "experts_per_layer": info["experts_per_layer"], "top_k": info["top_k"],
        "params_per_expert": info["params_per_expert"], "expert_shape": info["expert_shape"],
        "expert_params": info["expert_params"], "shared_expert_params": shared,
        "non_expert_params": total - info["expert_params"],
        "total_params": total, "active_params_per_token": info["active_params_per_token"],
        "weight_bytes": weight_bytes_by_dtype(model),
    }
    plan.update({k: v for k, v in info.items() if k not in plan and k not in
                 ("federated_keys",)})
    return plan


def plan_dir(path: str | Path, task: str = "causal-lm", num_labels: int = 2) -> dict[str, Any]:
    return plan_model(build_meta_model(path, task, num_labels))


# --- costs and budgets -------------------------------------------------------------------------
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
    from device_agent.costs import _optimizer
    from hfedmoe.experts import Expert
    from hfedmoe.lora import ExpertFactors, LoRASpec

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


def cost_models(model: MoEModel, times: dict[str, float], batch: int, seq: int,
                optimizer: str = "adamw", rank: int = 8) -> dict[str, Any]:
    """A :class:`~device_agent.budget.CostModel` per mode from the timed expert and the
    config's counts (see the module doc for what is estimated)."""
    from device_agent.budget import (
        CostModel,
        expert_activation_bytes,
        expert_state_bytes,
        tokens_per_expert,
    )
    from hfedmoe.lora import LoRASpec, factor_params

    layer = model.layers[0]
    shape = layer.bank.shape
    tokens = tokens_per_expert(batch, seq, layer.top_k, layer.num_experts)
    rows = batch * seq
    cfg = getattr(model.module, "config", None)
    num_experts = sum(x.num_experts for x in model.layers)
    ppe = shape.params_per_expert
    d_in = shape.d_ff * (2 if shape.gated else 1)
    weights = weight_bytes_by_dtype(model)
    model.set_trainable(())
    trainable_rest = sum(p.numel() for p in model.trainable_parameters().values())
    # throughput the frozen expert achieved (forward + input gradient: 2x forward FLOPs)
    flops_per_s = 2 * shape.flops_per_token() * tokens / max(times["frozen"], 1e-9)
    n_layers = getattr(cfg, "num_hidden_layers", model.num_layers)
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
    vocab = getattr(cfg, "vocab_size", 0) or 0
    lora = LoRASpec(rank=rank)
    biases = (d_in + shape.d_model) if shape.bias else 0
    n_factors = factor_params(shape.d_model, d_in, shape.d_ff, lora)
    out = {}
    for adapter, base in MODES:
        act = 2 if base in ("bf16", "int4") else 4
        pbytes = 2 if base == "bf16" else 4
        logits = 2 * rows * vocab * 4 if model.task == "causal-lm" else 0
        non_expert_act = (act * rows * 8 * hidden * n_layers + logits
                          + expert_state_bytes(trainable_rest, optimizer))
        e_weight = expert_weight_bytes(model, base)
        if adapter == "full":
            trained, grad_b, seconds = ppe, pbytes, times["full"]
            state = expert_state_bytes(ppe, optimizer, param_dtype_bytes=pbytes)
            snapshot, rank_act = pbytes * ppe, 0
        else:
            trained, grad_b, seconds = n_factors + biases, 4, times["lora"]
            state = expert_state_bytes(trained, optimizer)
            snapshot, rank_act = 4 * trained, tokens * 2 * rank * act
        out[f"{adapter}-{base}"] = CostModel(
            num_experts=num_experts,
            non_expert_weight_bytes=weights[base] - num_experts * e_weight,
            expert_weight_bytes=e_weight,
            expert_state_bytes=state,
            expert_activation_bytes=expert_activation_bytes(
                tokens, shape.d_model, shape.d_ff, dtype_bytes=act, gated=shape.gated) + rank_act,
            expert_grad_bytes=grad_b * trained,
            expert_snapshot_bytes=snapshot,
            expert_frozen_activation_bytes=tokens * d_in * act,
            non_expert_activation_bytes=non_expert_act,
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
    import dataclasses

    from device_agent.budget import tokens_per_expert
    from device_agent.costs import decide_budget

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
    from rich.console import Console
    from rich.table import Table

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


# --- results of the shipped examples -----------------------------------------------------------
def example_dirs() -> list[Path]:
    return sorted(p for p in EXAMPLES_DIR.iterdir() if (p / "config.json").is_file())


def main(argv: list[str] | None = None) -> int:
    """Plan every shipped example for every shipped profile; one JSON line per mode."""
    from benchmarks._common import environment, write_rows
    from device_agent.profiles import list_profiles, load_profile

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default="benchmarks/results/plan.jsonl")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--deadline", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profiles", nargs="*", default=None)
    args = ap.parse_args(argv)
    from device_agent.resources import probe_device

    host = probe_device(matmul_seconds=0.5)
    env = environment()
    for d in example_dirs():
        model = build_meta_model(d)
        plan = plan_model(model)
        layer = model.layers[0]
        from device_agent.budget import tokens_per_expert

        times = time_expert(model, tokens_per_expert(args.batch, args.seq, layer.top_k,
                                                     layer.num_experts))
        rows = []
        for prof in args.profiles or list_profiles():
            report = load_profile(prof)
            costs = plan_costs(model, report, args.batch, args.seq, args.deadline, args.steps,
                               host=host, times=times)
            for name, m in costs["modes"].items():
                b = m["budget"]
                rows.append({"model": d.name, "profile": prof, "mode": name,
                             "adapter": m["adapter"], "base": m["base"],
                             "total_params": plan["total_params"],
                             "active_params_per_token": plan["active_params_per_token"],
                             "params_per_expert": plan["params_per_expert"][0],
                             "num_experts": b["cost"]["num_experts"],
                             "weight_bytes": m["weight_bytes"],
                             "per_trained_expert_bytes": m["per_trained_expert_bytes"],
                             "c_budget": b["c_budget"], "limit": b["limit"],
                             "reason": b["reason"], "memory_max": b["memory_max"],
                             "time_max": b["time_max"], "step_seconds": b["step_seconds"],
                             "peak_bytes": b["peak_bytes"], "batch": args.batch,
                             "seq": args.seq, "deadline": args.deadline, "steps": args.steps,
                             "expert_seconds": times, "tokens_per_expert":
                             costs["tokens_per_expert"]})
        write_rows(args.out, rows, env)
        print(f"{d.name}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
