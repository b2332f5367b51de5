"""Costs and budgets of a model per training mode: ``hfedmoe profile --model DIR``.

A model (often a directory with only its ``config.json``, built on the meta device:
:func:`hfedmoe.models.plan.build_meta_model`) is counted per mode (whole experts or LoRA over an
fp32 / bf16 base, LoRA over an int8 / int4 base: :mod:`device_agent.work`) and each mode gets the
budget it allows on the device:

- on an emulated device (a profile), every time term is the mode's counted FLOPs and bytes at
  the profile's sustained rate for the dtype the mode computes in (bf16 for a bf16 or int4 base,
  fp32 for fp32 and int8) and its memory bandwidth: no host timing enters, so the plan is the
  same on every machine. A mode whose dtype the device has no rate for is not planned, and the
  plan says so;
- on this device (a live report), ONE expert of the real :class:`~hfedmoe.experts.ExpertShape`
  is timed here (trained in full, through LoRA factors, and frozen) at its balanced share of
  ``batch x seq`` tokens, and the non-expert step is its FLOPs at the rate that timing reached.

The round's window (in minutes, as field trials have them) and local steps are the server's
settings; ``hfedmoe profile`` prints them with the plan. Run
``python -m benchmarks.plan --out benchmarks/results/plan.jsonl`` to write one JSON line per
(model, profile, mode) budget of the shipped examples (``examples/models``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.console import Console
from rich.table import Table

from device_agent.budget import DEFAULT_MEMORY_MARGIN, CostModel, tokens_per_expert
from device_agent.costs import decide_budget
from device_agent.emulation import planned_budget
from device_agent.timing import time_expert
from device_agent.work import PlannedMode, planned_mode
from hfedmoe.errors import ConfigError
from hfedmoe.models.base import MoEModel
from hfedmoe.models.plan import MODES, QUANT_NOTE


def timed_cost(planned: PlannedMode, times: dict[str, float]) -> CostModel:
    """A mode's cost model from one expert timed here over the mode's base
    (:func:`device_agent.timing.time_expert`): the timed expert's seconds, and the non-expert step and routing pass as their FLOPs at the rate the frozen
    expert reached (forward and input gradient: its counted FLOPs over its time)."""
    work = planned.work
    flops_per_s = work.frozen_flops / max(times["frozen"], 1e-9)
    trained = times["full"] if planned.adapter == "full" else times["lora"]
    return dataclasses.replace(
        planned.memory, rest_step_seconds=work.rest_flops / flops_per_s,
        routing_seconds=work.routing_flops / flops_per_s, expert_frozen_seconds=times["frozen"],
        expert_trained_seconds=max(trained, times["frozen"]))


def _mode_row(planned: PlannedMode, budget: Any) -> dict[str, Any]:
    cost = budget.cost
    return {"adapter": planned.adapter, "base": planned.base, "dtype": planned.dtype,
            "per_trained_expert_bytes": cost.per_trained_expert_bytes,
            "weight_bytes": cost.resident_bytes, "runnable": True,
            "budget": {k: v for k, v in dataclasses.asdict(budget).items() if k != "limits"}}


def _not_runnable(planned: PlannedMode, why: str) -> dict[str, Any]:
    return {"adapter": planned.adapter, "base": planned.base, "dtype": planned.dtype,
            "per_trained_expert_bytes": planned.memory.per_trained_expert_bytes,
            "weight_bytes": planned.memory.resident_bytes, "runnable": False, "reason": why}


def plan_costs(model: MoEModel, report: Any, batch: int, seq: int, window_s: float,
               steps: int, host: Any = None, optimizer: str = "adamw", rank: int = 8,
               repeats: int = 3, times: dict[str, float] | None = None,
               margin: float = DEFAULT_MEMORY_MARGIN) -> dict[str, Any]:
    """The budget of every mode on ``report``'s device for a ``window_s`` round of ``steps``
    local steps: from the profile's rates when it is emulated, else from one expert timed here
    over each mode's base (``times``: base -> :func:`~device_agent.timing.time_expert`'s
    seconds, measured when not given)."""
    layer = model.layers[0]
    tokens = tokens_per_expert(batch, seq, layer.top_k, layer.num_experts)
    if not report.emulated and times is None:
        times = {base: time_expert(layer.bank.shape, tokens, base, optimizer, rank, repeats)
                 for base in dict.fromkeys(b for _, b in MODES)}
    modes = {}
    for adapter, base in MODES:
        planned = planned_mode(model, adapter, base, batch, seq, optimizer, rank)
        name = f"{adapter}-{base}"
        if report.emulated:
            try:
                budget = planned_budget(planned, report, window_s=window_s, steps=steps,
                                        margin=margin, dtype_field=f"mode {name}")
            except ConfigError as exc:  # the device cannot run the mode's dtype
                modes[name] = _not_runnable(planned, str(exc))
                continue
        else:
            budget = decide_budget(report, timed_cost(planned, times[base]), window_s, steps,
                                   host=host, margin_fraction=margin)
        modes[name] = _mode_row(planned, budget)
    how = ("every time from the profile's sustained rate for the mode's dtype and its memory "
           "bandwidth" if report.emulated else
           "one expert timed here over each mode's base, the non-expert step time from its "
           "FLOPs at that expert's rate")
    return {"model": str(model.info.get("source", model.family)), "family": model.family,
            "device": report.source, "batch": batch, "seq": seq, "tokens_per_expert": tokens,
            "lora_rank": rank, "window_s": window_s, "steps": steps, "margin": margin,
            "expert_seconds": times, "planned": True, "note": QUANT_NOTE,
            "estimated": "weights, state and activations counted from the config; " + how,
            "modes": modes}


def check_window(costs: dict[str, Any], field: str = "--window") -> None:
    """Refuse a plan whose window holds no step in any mode the device can run.

    Raises:
        ConfigError: naming ``field``, with the shortest step.
    """
    runnable = [m["budget"] for m in costs["modes"].values() if m["runnable"]]
    if not runnable or any(b["steps"] >= 1 for b in runnable):
        return
    shortest = min(runnable, key=lambda b: b["step_seconds"])
    raise ConfigError(f"{field} = {costs['window_s'] / 60:g} min is shorter than one step in "
                      f"every mode on {costs['device']}: the shortest is "
                      f"{shortest['step_seconds'] / 60:.3g} min ({shortest['c_budget']} "
                      f"expert(s) trained)")


def _limit_text(m: dict[str, Any]) -> str:
    if not m["runnable"]:
        return "cannot run: " + m["reason"].split(": ", 1)[-1]
    b = m["budget"]
    mem = "nothing fits" if b["memory_max"] < 0 else f"memory allows {b['memory_max']}"
    if b.get("host_memory_max") is not None:  # a discrete GPU: both pools
        mem += f": gpu {b['gpu_memory_max']}, host {b['host_memory_max']}"
    time_ = "no step fits" if b["time_max"] < 0 else f"time {b['time_max']}"
    return f"{b['limit']} ({mem}, {time_})"


def print_plan_costs(costs: dict[str, Any]) -> None:
    t = costs["expert_seconds"]
    timed = (f"; one expert timed here on {next(iter(t.values()))['device']}, LoRA "
             f"r{costs['lora_rank']} / frozen per base: " + ", ".join(
                 f"{b} {v['lora'] * 1e3:.1f} / {v['frozen'] * 1e3:.1f} ms" for b, v in t.items())
             if t else f"; times from {costs['device']}'s rates")
    table = Table(title=f"{costs['model']} on {costs['device']}: a {costs['window_s'] / 60:g}-"
                        f"minute window of {costs['steps']} local steps, batch {costs['batch']} "
                        f"x seq {costs['seq']} ({costs['tokens_per_expert']} tokens per "
                        f"expert), {costs['margin']:.0%} memory margin{timed}")
    for col in ("mode", "dtype", "weights", "per trained expert", "C_budget", "limited by",
                "step / peak"):
        table.add_column(col)
    for name, m in costs["modes"].items():
        b = m.get("budget")
        table.add_row(name, m["dtype"], f"{m['weight_bytes'] / 2**30:.2f} GiB",
                      f"{m['per_trained_expert_bytes'] / 2**20:.1f} MiB",
                      f"{b['c_budget']} of {b['cost']['num_experts']}" if b else "-",
                      _limit_text(m),
                      f"{b['step_seconds']:.2f} s / {b['peak_bytes'] / 2**30:.2f} GiB" if b
                      else "-")
    Console().print(table)
    for name, m in costs["modes"].items():
        if m["runnable"] and m["budget"]["c_budget"] == 0:
            print(f"{name}: {m['budget']['reason']}")
    print(costs["note"] + "; " + costs["estimated"] + ".")
