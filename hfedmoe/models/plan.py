"""Plan a real model size from its ``config.json`` alone: no weights are read or allocated.

:func:`build_meta_model` instantiates the model of a config-only directory on the meta device
(``torch.device("meta")``: shapes, no storage) and runs the kit's own conversion on it (the
hand adapters and the generic interface adapter both work on meta tensors), so the layout is
exactly the one a real checkpoint would get. :func:`plan_model` reads layers, MoE layers,
experts, top-k, parameters per expert, shared-expert and non-expert parameters, total vs
active parameters per token and the weights' memory per storage dtype from it.

Costs and budgets of a planned model (timing one real-shape expert on the device) are
:mod:`device_agent.plan`; the JSON lines of the shipped examples come from
``python -m benchmarks.plan``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hfedmoe.errors import ModelError
from hfedmoe.models.base import MoEModel
from hfedmoe.models.quantize import frozen_linears
from hfedmoe.quantize import INT4_GROUP_SIZE, int4_packable

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.msgpack", "*.h5")
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
    from hfedmoe.models.hf import family_for_model_type, module_for_task, read_config, wrap_hf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    cfg = read_config(path)
    family = family_for_model_type(cfg.model_type)  # ModelError for an unsupported family
    if task == "causal-lm" and not family.causal:
        task = "seq2seq"  # an encoder-decoder's language model is text-to-text
    try:
        with _meta_conversion():
            module = module_for_task(cfg, family, task, num_labels)
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
    rows, cols = shape
    if mode == "int4" and int4_packable(shape, torch.device("cpu")):
        return rows * cols // 2 + rows * (cols // INT4_GROUP_SIZE) * 2 * 2  # bf16 scale + zero
    return rows * cols + rows * 5  # int8, an fp32 scale and an int8 zero point per output row


def _frozen_linear_weights(model: MoEModel) -> list[tuple[int, int]]:
    return [tuple(mod.weight.shape) for _, mod in frozen_linears(model)]


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


def transformer_layers(model: MoEModel) -> int:
    """Transformer blocks the model runs: its config's layer count, plus the decoder's of a
    text-to-text encoder-decoder (``task="seq2seq"``)."""
    cfg = getattr(model.module, "config", None)
    layers = next((getattr(cfg, a) for a in ("num_hidden_layers", "num_layers", "n_layer")
                   if isinstance(getattr(cfg, a, None), int)), model.num_layers)
    if model.task == "seq2seq":
        layers += getattr(cfg, "num_decoder_layers", None) or layers
    return int(layers)


def plan_model(model: MoEModel) -> dict[str, Any]:
    """Everything ``hfedmoe models inspect`` prints for a planned (or real) model."""
    info = model.summary()
    cfg = getattr(model.module, "config", None)
    layers = transformer_layers(model)
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
