"""Benchmark: the bytes of one *whole* update of a real MoE language model, at its real shapes.

Question: what does a device upload in one HFedMoE round of OLMoE-1B-7B, Qwen1.5-MoE-A2.7B,
DeepSeek-V2-Lite or gpt-oss-20b (``examples/models``) with C selected experts, whole experts
or LoRA rank r (with and without LoRA on the attention projections), next to FedAvg of the
full model and FedAvg of a dense LoRA adapter on every expert (FlowerTune-style)?

How it is measured. A model at its real widths (hidden size, expert width, vocabulary,
attention) but with few decoder layers is built with random weights from its ``config.json``
(no weights exist here) and converted by the kit; the kit's own round (``train_round``,
strategy hfedmoe, budget C, one local step on a two-example batch) trains it and the update
is encoded with the kit's wire format. This is done at two depths; everything that grows with
depth (gates, shared-expert and attention factors, the header's per-expert statistics) is the
difference between the two, so the whole update at the real depth is the shallow one plus
that per-layer cost times the remaining layers. The selected experts' part does not grow with
depth (C experts either way). The parameter count of the extrapolated update is checked
against the kit's key set of the full-depth model built on the meta device (no storage):
``planned_params``; they must agree exactly.

The comparisons, both at the same wire dtype: FedAvg of the full model sends every parameter
(``total_params`` of the meta model). The dense LoRA adapter carries rank-r factors on every
routed and shared expert of every MoE layer (and on the attention projections when the row's
mode has them) and no gates: the kit's per-expert factor size times the model's experts.

    python -m benchmarks.update_bytes [--models olmoe-1b-7b-0924,...] [--budget 8]
                                      [--rank 8] [--out benchmarks/results/update-bytes.jsonl]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import environment, table, write_rows

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
# (train.adapter, model.lora_targets): what a row's update carries besides the C experts
MODES: dict[str, tuple[str, tuple[str, ...]]] = {
    "full": ("full", ()),
    "lora": ("lora", ()),
    "lora+attention": ("lora", ("attention",)),
}
WIRE_DTYPES = ("float32", "bfloat16")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
BYTES_PER = {"float32": 4, "bfloat16": 2}
PARTS = ("experts", "shared_experts", "attention", "gates", "other")


@dataclass(frozen=True)
class Measured:
    """One round's update at one depth: wire bytes per dtype and parameters per part."""

    layers: int
    wire: dict[str, int]
    params: dict[str, int]
    experts_sent: int
    seconds: float


def truncated_model(path: Path, layers: int, targets: tuple[str, ...]) -> Any:
    """The model of ``path``'s config at its real widths with ``layers`` decoder layers, random
    weights, converted by the kit, with the offline byte tokenizer (ids < 259 are in every
    vocabulary) and the LoRA ``targets``."""
    import torch

    from hfedmoe.models.attention import use_kit_attention
    from hfedmoe.models.hf import family_for_model_type, module_for_task, read_config, wrap_hf
    from hfedmoe.models.lora_targets import add_lora_targets
    from hfedmoe.models.tokenizer import byte_tokenizer

    cfg = read_config(path)
    full = cfg.num_hidden_layers
    for name, value in list(vars(cfg).items()):  # per-layer lists (layer_types, mlp_layer_types)
        if isinstance(value, list) and len(value) == full:
            setattr(cfg, name, value[:layers])
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    family = family_for_model_type(cfg.model_type)
    module = module_for_task(cfg, family, "causal-lm")
    model = wrap_hf(module, family, "causal-lm", "grouped",
                    byte_tokenizer(), info={"source": f"{path} ({layers} layers, random)"})
    use_kit_attention(model.module)
    add_lora_targets(model, targets)
    return model


def part_of(model: Any, key: str) -> str:
    """Which part of the model an update key belongs to (:data:`PARTS`)."""
    from hfedmoe.lora import split_factor_key
    from hfedmoe.names import parse_key

    factor = split_factor_key(key)
    base = factor[0] if factor else key
    kind = parse_key(base).kind
    if kind == "expert":
        return "experts"
    if kind == "gate":
        return "gates"
    if base in model.lora_only:
        return "attention"
    if base in model.lora_bases:
        return "shared_experts"
    return "other"


def measure_depth(path: Path, layers: int, mode: str, budget: int, rank: int) -> Measured:
    """Build the ``layers``-deep model, run one round of the kit and encode its update."""
    from device_agent.train import RoundContext, RoundIds, train_round
    from hfedmoe.config import TrainConfig
    from hfedmoe.data import PairDataset
    from hfedmoe.strategies import get_strategy
    from hfedmoe.wire import WireConfig, encode

    adapter, targets = MODES[mode]
    model = truncated_model(path, layers, targets)
    data = PairDataset(("What is a mixture of experts?", "Name a phone."),
                       ("A sparse model.", "A small computer."), (0, 1), ("a", "b"))
    train = TrainConfig(batch_size=2, lr=1e-4, max_steps=1, adapter=adapter, lora_rank=rank,
                        lora_alpha=2.0 * rank, selection_batches=1)
    start = time.perf_counter()
    res = train_round(RoundContext(model, data, strategy=get_strategy("hfedmoe"), budget=budget,
                                   train=train, ids=RoundIds(client_id="dev0"), max_length=32))
    seconds = time.perf_counter() - start
    update = res.update
    params = dict.fromkeys(PARTS, 0)
    for key, delta in update.deltas.items():
        params[part_of(model, key)] += delta.numel()
    wire = {d: len(encode(update, 0.0, WireConfig(dtype=d, compress=False)))
            for d in WIRE_DTYPES}
    sent = len(update.updated)
    del model, res, update
    gc.collect()
    return Measured(layers, wire, params, sent, seconds)


def _decoder_index(path: str) -> int:
    """The decoder layer of an MoE block's module path (``model.layers.3.mlp`` -> 3)."""
    import re

    found = re.search(r"\.(\d+)\.", f".{path}.")
    if found is None:
        raise ValueError(f"no layer index in the module path {path!r}")
    return int(found.group(1))


def planned_params(path: Path, mode: str, budget: int, rank: int) -> dict[str, Any]:
    """The full-depth model on the meta device: its parameters, and what one update of
    ``mode`` carries by the kit's keys (C experts' factors or weights, every gate, every
    shared-expert and targeted base's factors) and what a dense LoRA adapter carries."""
    from hfedmoe.lora import LoRASpec, factor_params
    from hfedmoe.models.lora_targets import add_lora_targets
    from hfedmoe.models.plan import build_meta_model, plan_model
    from hfedmoe.names import parse_key

    adapter, targets = MODES[mode]
    model = build_meta_model(path)
    add_lora_targets(model, targets)
    plan = plan_model(model)
    shape = model.layers[0].bank.shape
    e = model.layers[0].bank.experts[0]
    bias = shape.params_per_expert - e.w_in.numel() - e.w_out.numel()
    lora_expert = factor_params(shape.d_model, e.w_in.shape[0], shape.d_ff,
                                LoRASpec(rank, 2.0 * rank)) + bias
    per_expert = lora_expert if adapter == "lora" else shape.params_per_expert
    base_factors = {k: rank * sum(model.parameter(k).shape) for k in model.lora_bases}
    shared_bases = sum(v for k, v in base_factors.items() if k not in model.lora_only)
    attention = sum(v for k, v in base_factors.items() if k in model.lora_only)
    gates = sum(model.parameter(k).numel() for k in model.keys() if parse_key(k).kind == "gate")
    small = sum(model.parameter(k).numel() for k in model.keys()
                if parse_key(k).kind == "shared" and k not in model.lora_bases
                and k not in model.lora_only)
    shared_full = sum(model.parameter(k).numel() for k in model.lora_bases
                      if k not in model.lora_only)
    shared = shared_bases if adapter == "lora" else shared_full
    experts_total = sum(layer.num_experts for layer in model.layers)
    return {"plan": plan, "experts": budget * per_expert, "shared_experts": shared,
            "attention": attention if adapter == "lora" else 0, "gates": gates, "other": small,
            "dense_lora": experts_total * lora_expert + shared_bases + attention,
            "experts_total": experts_total, "first_moe_layer": _decoder_index(model.layers[0].path)}


def measure_json(path: str, layers: int, mode: str, budget: int, rank: int) -> dict[str, Any]:
    """:func:`measure_depth` as JSON (for a fresh interpreter per depth: peak memory)."""
    m = measure_depth(Path(path), layers, mode, budget, rank)
    return {"layers": m.layers, "wire": m.wire, "params": m.params,
            "experts_sent": m.experts_sent, "seconds": round(m.seconds, 2)}


def extrapolate(shallow: dict[str, Any], deep: dict[str, Any], layers: int) -> dict[str, Any]:
    """Linear in depth: the shallow run plus (deep - shallow) per added layer, up to
    ``layers``."""
    steps = deep["layers"] - shallow["layers"]
    extra = layers - shallow["layers"]

    def at(a: int, b: int) -> int:
        per = (b - a) / steps
        return round(a + extra * per)

    return {"wire": {d: at(shallow["wire"][d], deep["wire"][d]) for d in WIRE_DTYPES},
            "params": {p: at(shallow["params"][p], deep["params"][p]) for p in PARTS},
            "per_layer_wire": {d: (deep["wire"][d] - shallow["wire"][d]) // steps
                               for d in WIRE_DTYPES}}


def model_rows(path: Path, mode: str, budget: int, rank: int, threads: int,
               isolate: bool = True) -> list[dict]:
    """Rows of one (model, mode): the whole update per wire dtype and its comparisons. Each
    depth runs in a fresh interpreter (``isolate``: a real model's memory is returned between
    them) or in this one (tiny models)."""
    from benchmarks._common import run_isolated

    plan = planned_params(path, mode, budget, rank)
    info = plan["plan"]
    first = plan["first_moe_layer"]
    kwargs = [{"path": str(path), "layers": first + n, "mode": mode, "budget": budget,
               "rank": rank} for n in (1, 2)]
    runs = [run_isolated("benchmarks.update_bytes", "measure_json", kw, threads=threads)
            if isolate else measure_json(**kw) for kw in kwargs]
    whole = extrapolate(runs[0], runs[1], info["layers"])
    planned = {p: plan[p] for p in PARTS}
    rows = []
    for dtype in WIRE_DTYPES:
        size = BYTES_PER[dtype]
        full_model = info["total_params"] * size
        dense_lora = plan["dense_lora"] * size
        rows.append({
            "bench": "update_bytes", "model": path.name, "mode": mode, "wire_dtype": dtype,
            "budget": budget, "lora_rank": rank, "layers": info["layers"],
            "moe_layers": info["moe_layers"], "experts_total": plan["experts_total"],
            "total_params": info["total_params"],
            "depths_run": [r["layers"] for r in runs],
            "experts_sent": runs[0]["experts_sent"], "seconds": [r["seconds"] for r in runs],
            "measured_bytes": [r["wire"][dtype] for r in runs],
            "per_layer_bytes": whole["per_layer_wire"][dtype],
            "whole_update_bytes": whole["wire"][dtype],
            "params_by_part": whole["params"], "planned_params_by_part": planned,
            "planned_matches": whole["params"] == planned,
            "full_model_fedavg_bytes": full_model, "dense_lora_fedavg_bytes": dense_lora,
            "vs_full_model": whole["wire"][dtype] / full_model,
            "vs_dense_lora": whole["wire"][dtype] / dense_lora})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from hfedmoe.errors import ModelError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None,
                   help="comma list of examples/models directories (default: every causal LM)")
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--budget", type=int, default=8, help="C: experts a device trains")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    names = (args.models.split(",") if args.models
             else sorted(d.name for d in EXAMPLES.iterdir() if (d / "config.json").is_file()))
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    env = environment(benchmark="update_bytes", device="cpu")
    rows: list[dict] = []
    for name in names:
        for mode in modes:
            try:
                got = model_rows(EXAMPLES / name, mode, args.budget, args.rank, args.threads)
            except (ModelError, RuntimeError) as exc:
                print(f"{name} {mode}: not measured: {str(exc).splitlines()[0]}")
                continue
            write_rows(args.out, got, env)
            rows += got
    print_rows(rows, args)
    return 0


def print_rows(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"one whole update at real shapes, C = {args.budget}, LoRA rank {args.rank}, no zstd")
    print(table([[r["model"], r["mode"], SHORT[r["wire_dtype"]], f"{r['whole_update_bytes'] / 1e6:.2f} MB",
                  f"{r['full_model_fedavg_bytes'] / 1e9:.2f} GB", f"{r['vs_full_model']:.5f}",
                  f"{r['dense_lora_fedavg_bytes'] / 1e6:.1f} MB", f"{r['vs_dense_lora']:.4f}",
                  "yes" if r["planned_matches"] else "NO"] for r in rows],
                ["model", "mode", "wire", "whole update", "FedAvg full model", "share",
                 "FedAvg dense LoRA", "share", "= planned keys"]))


if __name__ == "__main__":
    sys.exit(main())
