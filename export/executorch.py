"""ExecuTorch programs: ``.pte`` inference lowered to XNNPACK, and on-device training programs.

Inference: ``torch.export.export`` of :class:`~export.programs.InferenceProgram` at a fixed
(batch, seq), then ``to_edge_transform_and_lower`` with the XNNPACK partitioner (the expert
matmuls go to XNNPACK; ``topk``/``scatter_add`` stay on portable kernels).

Training (the recipe of executorch's ``extension/training`` examples)::

    ep = torch.export.export(TrainingProgram(...), (input_ids, attention_mask, labels, slots))
    ep = torch.export.experimental._export_forward_backward(ep)   # joint graph; loss first
    program = to_edge(ep).to_executorch()                          # portable kernels
    # or to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()

Only parameters with ``requires_grad=True`` get gradients in the joint graph, so a program
trains exactly its slots plus the gates and shared head. ``lora=LoRASpec(...)`` exports the
LoRA variant (:class:`~export.programs.LoRATrainingProgram`: factor slots, base expert
weights as constants) through the same route. A causal LM's program takes ``labels`` (B, S)
and computes its response-only next-token loss inside (:func:`export.programs.task_forward`;
``pad``, ``log_softmax`` and ``nll_loss`` with ignore index -100 are core ATen). The experts run the ``"dense"`` path (every
expert on every token), or with ``capacity_factor=f`` the ``"capacity"`` path (each expert on a
fixed block of ``min(T, ceil(f * T * k / E))`` rows, pairs past it dropped; see
:mod:`export.programs`). Two things the model needs for this:

- attention runs ``"eager"`` while the training program is exported: the backward of SDPA's CPU
  flash kernel is not a core ATen op (``to_edge`` rejects it). Inference keeps ``sdpa``.
- SiLU is ``x * sigmoid(x)`` (:func:`hfedmoe.experts.silu`): ``F.silu``'s backward emits
  ``aten.empty_permuted``. ``F.gelu``'s backward (``aten.gelu_backward``) is core ATen and
  exports as it is.

executorch is imported inside the functions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from export.common import ExportReport, example_inputs, program_key
from export.programs import (
    DropMode,
    InferenceProgram,
    LoRATrainingProgram,
    TrainingProgram,
    expert_path,
    export_mode,
    flat_expert_index,
)
from hfedmoe.errors import ExportError
from hfedmoe.lora import LoRASpec
from hfedmoe.models.base import MoEModel
from hfedmoe.names import ExpertId

log = logging.getLogger(__name__)

Backend = Literal["portable", "xnnpack"]
INFERENCE_TOL = 1e-4  # .pte vs eager logits (float32; XNNPACK reorders sums)


def _lower(ep: Any, backend: Backend, training: bool = False) -> bytes:
    from executorch.exir import to_edge, to_edge_transform_and_lower

    if backend == "portable":
        return to_edge(ep).to_executorch().buffer
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition import config as xnn_config
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        configs, kwargs = None, {}
        if training:
            # The joint graph returns the router softmax (saved for backward) as an output; a
            # delegate whose output is also its input is rejected ("Output node ... is already
            # in the inputs"), so softmax stays on portable kernels in training programs.
            configs = [c for c in xnn_config.ALL_PARTITIONER_CONFIGS
                       if c is not xnn_config.SoftmaxConfig]
            # Every GEMM of a training program has a computed operand: the expert weights are
            # assembled from slots at run time, and the backward multiplies activations by
            # gradients. XNNPACK takes fp32 mm/addmm/linear with non-constant weights only when
            # asked; otherwise they all run on the portable (reference) kernels.
            kwargs["force_non_static_weights_for_f32_linear"] = True
        partitioner = XnnpackPartitioner(configs=configs, **kwargs)
        return to_edge_transform_and_lower(ep, partitioner=[partitioner]).to_executorch().buffer
    raise ExportError(f"unknown ExecuTorch backend {backend!r} (portable, xnnpack)")


def load_inference(buffer: bytes) -> Any:
    """An ExecuTorch module from a ``.pte`` buffer; ``module.forward((ids, mask))[0]``."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    return _load_for_executorch_from_buffer(buffer)


def run_inference(module: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
                  ) -> torch.Tensor:
    return module.forward((input_ids, attention_mask))[0]


def _eager_logits(model: MoEModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.module(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits


def export_inference_pte(model: MoEModel, batch: int = 1, seq: int = 64,
                         backend: Backend = "xnnpack", out: str | Path | None = None,
                         check: bool = True) -> tuple[bytes, ExportReport]:
    """Export ``model`` for inference at a fixed (batch, seq); returns the ``.pte`` bytes and
    a report whose parity compares the program with the eager model on two inputs."""
    inputs = example_inputs(model, batch, seq)
    t0 = time.perf_counter()
    try:
        with export_mode(model), torch.no_grad():
            ep = torch.export.export(InferenceProgram(model).eval(),
                                     (inputs["input_ids"], inputs["attention_mask"]))
            buffer = _lower(ep, backend)
    except ExportError:
        raise
    except Exception as exc:  # torch/executorch raise many types; keep the cause
        raise ExportError(f"ExecuTorch inference export failed: {exc}") from exc
    seconds = time.perf_counter() - t0
    report = ExportReport("pte", str(out) if out else None, len(buffer), 0,
                          tolerance=INFERENCE_TOL,
                          info={"backend": backend, "shape": f"{batch}x{seq}",
                                "export_s": round(seconds, 2)})
    if check:
        module = load_inference(buffer)
        for name, seed in (("example", 0), ("fresh", 1)):
            b = example_inputs(model, batch, seq, seed=seed)
            got = run_inference(module, b["input_ids"], b["attention_mask"])
            report.parity[name] = (got - _eager_logits(model, b)).abs().max().item()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(buffer)
    return buffer, report


@dataclass
class TrainingExport:
    """A training program and how its parameters map back to canonical names."""

    buffer: bytes
    key: str
    bucket: int
    batch: int
    seq: int
    mode: DropMode
    backend: Backend
    slot_params: list[str]  # expert param names, slot tensor "slot_<name>"
    canonical: dict[str, str]  # program parameter name -> canonical key (gates, shared)
    trainable_params: int
    export_s: float
    # LoRA programs (adapter "lora"): rank and alpha, and slot tensor -> canonical key suffix
    # under an expert ("slot_lora_A_in" -> "w_in.lora_A", "slot_b_in" -> "b_in")
    adapter: str = "full"
    lora_rank: int = 0
    lora_alpha: float = 0.0
    slots: dict[str, str] = field(default_factory=dict)
    # the "capacity" expert path's factor; None: the "dense" path
    capacity_factor: float | None = None

    def slot_map(self) -> dict[str, str]:
        """Program slot tensor -> the suffix of its canonical key under an expert."""
        return self.slots or {f"slot_{n}": n for n in self.slot_params}

    @property
    def lora(self) -> LoRASpec | None:
        return LoRASpec(self.lora_rank, self.lora_alpha) if self.adapter == "lora" else None


def training_key(model: MoEModel, bucket: int, batch: int, seq: int, mode: DropMode = "frozen",
                 backend: Backend = "portable", gates: bool = True, shared: bool = True,
                 lora: LoRASpec | None = None, capacity_factor: float | None = None) -> str:
    """Cache key of a training program (full-expert dense keys are as before LoRA programs and
    capacity factors)."""
    extra: dict[str, Any] = {} if lora is None else {"adapter": "lora", "lora_rank": lora.rank,
                                                     "lora_alpha": lora.alpha}
    if capacity_factor is not None:
        extra["capacity_factor"] = float(capacity_factor)
    return program_key(model, "train-pte", bucket=bucket, batch=batch, seq=seq, mode=mode,
                       backend=backend, gates=gates, shared=shared, **extra)


def _example_train_args(model: MoEModel, program: TrainingProgram | LoRATrainingProgram,
                        batch: int, seq: int,
                        experts: Sequence[ExpertId]) -> tuple[torch.Tensor, ...]:
    b = example_inputs(model, batch, seq)
    if "labels" not in b:
        raise ExportError(f"{model.family}: no classification head and not a causal LM: "
                          "nothing to train")
    return (b["input_ids"], b["attention_mask"], b["labels"],
            flat_expert_index(model, experts, program.bucket))


def export_training_program(model: MoEModel, bucket: int, batch: int, seq: int,
                            mode: DropMode = "frozen", backend: Backend = "portable",
                            gates: bool = True, shared: bool = True,
                            lora: LoRASpec | None = None,
                            capacity_factor: float | None = None) -> TrainingExport:
    """Export the training program of one bucket for ``model``'s current weights.

    The program is valid for any expert set of at most ``bucket`` experts (the slots' values
    and the ``slot_expert_index`` input are set at run time), for this model state only.
    With ``lora`` the slots are the experts' LoRA factors (and biases) instead of their
    weights (:class:`~export.programs.LoRATrainingProgram`; ``mode`` must be ``"frozen"``).
    ``capacity_factor``: the experts run the ``"capacity"`` path with this factor instead of
    ``"dense"`` (less expert work; pairs past an expert's capacity are dropped).
    """
    if lora is not None and mode != "frozen":
        raise ExportError(f"LoRA training programs keep the other experts frozen, not {mode!r}")
    expert_path(capacity_factor)  # checks the factor
    key = training_key(model, bucket, batch, seq, mode, backend, gates, shared, lora,
                       capacity_factor)
    t0 = time.perf_counter()
    try:
        from torch.export.experimental import _export_forward_backward

        with export_mode(model, attn="eager", capacity_factor=capacity_factor):
            program: TrainingProgram | LoRATrainingProgram
            if lora is None:
                program = TrainingProgram(model, bucket, mode, gates, shared, capacity_factor)
                args = _example_train_args(model, program, batch, seq, [])
                with program.without_expert_tensors():
                    ep = torch.export.export(program, args)
            else:
                program = LoRATrainingProgram(model, bucket, lora, gates, shared,
                                              capacity_factor)
                args = _example_train_args(model, program, batch, seq, [])
                ep = torch.export.export(program, args)
            ep = _export_forward_backward(ep)
            buffer = _lower(ep, backend, training=True)
            by_id = {id(model.parameter(k)): k for k in model.keys()}
            canonical = {name: by_id[id(p)] for name, p in program.named_parameters()
                         if p.requires_grad and id(p) in by_id}
            trainable = sum(p.numel() for p in program.parameters() if p.requires_grad)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ExecuTorch training export failed: {exc}") from exc
    if lora is None:
        assert isinstance(program, TrainingProgram)
        return TrainingExport(buffer, key, bucket, batch, seq, mode, backend,
                              list(program.param_names), canonical, trainable,
                              time.perf_counter() - t0, capacity_factor=capacity_factor)
    assert isinstance(program, LoRATrainingProgram)
    return TrainingExport(buffer, key, bucket, batch, seq, mode, backend,
                          list(program.slots.values()), canonical, trainable,
                          time.perf_counter() - t0, adapter="lora", lora_rank=lora.rank,
                          lora_alpha=lora.alpha, slots=dict(program.slots),
                          capacity_factor=capacity_factor)


def load_training(buffer: bytes) -> Any:
    """An ExecuTorch ``TrainingModule`` from a training program's bytes."""
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer

    return _load_for_executorch_for_training_from_buffer(buffer)
