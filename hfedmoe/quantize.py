"""Weight-only quantization of a device's frozen base (``model.quantize``), with torchao.

With ``train.adapter = "lora"`` every expert weight is frozen during a round (the selected
experts train rank-r factors beside them), so a device may store the base quantized, as QLoRA
does. This module is the tensor level (quantize, dequantize, the frozen linear and its
autograd); :func:`hfedmoe.models.quantize.quantize_model` applies it to a model and replaces, in
place:

- every expert's ``w_in`` / ``w_out`` (canonical ``layers.{l}.experts.{e}.w_in|w_out``), and
- every other ``nn.Linear`` of the network whose weight is not federated (attention and dense
  projections, a causal LM's untied output layer)

with torchao weight-only tensors: ``"int8"`` is per-output-channel symmetric int8
(``Int8Tensor``, what ``Int8WeightOnlyConfig`` builds); ``"int4"`` is asymmetric int4 in groups
of :data:`INT4_GROUP_SIZE` input features (``Int4OpaqueTensor``, what torchao's
``PrototypeInt4WeightOnlyConfig`` builds: its CPU tinygemm kernel; the stable
``Int4WeightOnlyConfig`` needs GPU kernels in torchao 0.18), with bf16 scales and zero
points, so the kernel runs on bf16 activations (its float32 path ran 50-65x slower here). A
weight int4 cannot pack (``in_features`` not a multiple of the group, ``out_features`` not of
16, or not on the CPU) is stored int8 instead, and the report says which.

Never quantized: what trains or travels besides the experts' weights: the gates
(``layers.{l}.gate.*``), the shared parts (``shared.*``: the task head), every bias (kept as
fp32 parameters), embeddings and norms, tied weights and the LoRA factors.

Training through a quantized weight: torchao's own ``F.linear`` for ``Int8Tensor`` is
differentiable to its input, but autograd then keeps an fp32 copy of every weight on the
graph until the backward (the weight cast of its matmul), which undoes the saving; int4's
kernel has no derivative. :func:`frozen_linear` therefore runs torchao's kernel in an
``autograd.Function`` that keeps only the quantized weight and forms ``grad_x = grad_y @ W``
from a dequantized weight in the backward, one layer at a time; no weight gradient exists.

The server never quantizes: it keeps and aggregates fp32. A device quantizes its copy after
loading the global weights (:meth:`hfedmoe.models.MoEModel.load_state` re-quantizes a weight
stored quantized from the fp32 value it is given), and its LoRA update (factors, biases,
gates, head) does not contain a quantized tensor.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hfedmoe.config import quantize_adapter_problem
from hfedmoe.errors import ConfigError, ModelError

QuantizeMode = Literal["none", "int8", "int4"]
QUANTIZE_MODES: tuple[str, ...] = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32  # input features per int4 scale/zero pair (torchao allows 32, 64, 128)
EXPERT_WEIGHTS = ("w_in", "w_out")


def check_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"model.quantize must be one of {list(QUANTIZE_MODES)}, got {mode!r}")


def require_lora(mode: str, adapter: str) -> None:
    """A quantized base is frozen: only ``train.adapter = "lora"`` can train over it."""
    problem = quantize_adapter_problem(mode, adapter)
    if problem is not None:
        raise ConfigError(problem)


def require_eager(runtime: str) -> None:
    """The ExecuTorch training programs are exported from fp32 weights: a quantized base
    trains on the eager (PyTorch) runtime only."""
    if runtime != "eager":
        raise ConfigError(f"model.quantize stores the base quantized for the eager runtime; the "
                          f"{runtime!r} runtime exports its programs from fp32 weights: use "
                          f"runtime = \"eager\" or model.quantize = \"none\"")


# --- torchao, imported on first use ------------------------------------------------------------


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    # torchao logs a warning per optional CUDA extension it cannot load on a CPU-only torch
    names = ("torchao", "torch.utils._pytree")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _torchao() -> Any:
    try:
        with _quiet_import():
            import torchao  # noqa: F401
            from torchao.prototype.quantization.int4 import Int4OpaqueTensor
            from torchao.quantization import Int8Tensor
            from torchao.quantization.granularity import PerRow
    except ImportError as exc:
        raise ConfigError(f"model.quantize needs torchao (pip install 'hfedmoe[quantize]'): "
                          f"{exc}") from exc
    return Int8Tensor, Int4OpaqueTensor, PerRow


def is_quantized(t: Any) -> bool:
    """True for a torchao quantized tensor (checked by type, without importing torchao)."""
    return isinstance(t, torch.Tensor) and type(t).__module__.startswith("torchao.")


def weight_mode(t: torch.Tensor) -> str:
    """``"int8"``, ``"int4"`` or ``"none"``: how ``t`` is stored."""
    if not is_quantized(t):
        return "none"
    return "int4" if type(t).__name__ == "Int4OpaqueTensor" else "int8"


def int4_packable(shape: tuple[int, ...], device: torch.device) -> bool:
    """Whether torchao's CPU int4 kernel can hold a weight of ``shape`` (out, in)."""
    return (len(shape) == 2 and device.type == "cpu" and shape[1] % INT4_GROUP_SIZE == 0
            and shape[0] % 16 == 0)


def quantize_weight(w: torch.Tensor, mode: str) -> torch.Tensor:
    """A torchao weight-only quantized copy of the 2-D float weight ``w`` (out, in).

    ``int4`` falls back to ``int8`` where :func:`int4_packable` is false."""
    check_mode(mode)
    if mode == "none":
        raise ValueError("quantize_weight needs 'int8' or 'int4'")
    int8_tensor, int4_tensor, per_row = _torchao()
    w = w.detach()
    if w.dim() != 2 or not w.is_floating_point():
        raise ModelError(f"can only quantize a 2-D float weight, got {tuple(w.shape)} {w.dtype}")
    with _quiet_import():
        if mode == "int4" and int4_packable(tuple(w.shape), w.device):
            # bf16 scales and zero points: the kernel then takes bf16 activations, which its
            # CPU path runs vectorized (with float32 it ran 50-65x slower here)
            return int4_tensor.from_hp(w.to(torch.bfloat16), [1, INT4_GROUP_SIZE])
        return int8_tensor.from_hp(w.float(), granularity=per_row())


def dequantize_weight(w: torch.Tensor) -> torch.Tensor:
    """The float32 weight a quantized tensor stands for (a plain tensor passes through)."""
    if not is_quantized(w):
        return w.detach().float()
    if weight_mode(w) == "int4":
        # torchao gives Int4OpaqueTensor no dequantize op; its own kernel applied to the
        # identity returns W^T exactly (the way torchao's tinygemm linears unpack weights)
        out_f, in_f = w.shape
        eye = torch.eye(in_f, dtype=w.scale_and_zero.dtype, device=w.device)
        return F.linear(eye, w).t().float().contiguous()  # (out, in)
    return w.dequantize().float()


def plain_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` itself, or for a quantized weight its dequantized float32 value (no gradient)."""
    return dequantize_weight(w) if is_quantized(w) else w


class _FrozenQuantizedLinear(torch.autograd.Function):
    """``x @ W^T`` with torchao's kernel; the backward gives ``grad_x`` only, from W
    dequantized on the spot (nothing but the quantized weight is kept for it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.weight = w  # a frozen, quantized parameter: already resident, nothing copied
        ctx.x_dtype = x.dtype
        device = x.device.type
        # the dtype F.linear would return here (the autocast dtype under autocast)
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
            else x.dtype
        # int4's kernel takes activations in its scales' dtype (bfloat16, quantize_weight)
        dtype = w.scale_and_zero.dtype if weight_mode(w) == "int4" else out_dtype
        with torch.autocast(device, enabled=False):
            return F.linear(x.to(dtype), w).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        w = dequantize_weight(ctx.weight)
        return (grad @ w.to(grad.dtype)).to(ctx.x_dtype), None


def frozen_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``F.linear(x, w, b)``; a quantized ``w`` runs as a frozen weight (see the module doc)."""
    if not is_quantized(w):
        return F.linear(x, w, b)
    y = _FrozenQuantizedLinear.apply(x, w)
    return y if b is None else y + b.to(y.dtype)


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is a torchao quantized tensor (bias stays float)."""

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={weight_mode(self.weight)}")


def release_freed_memory() -> None:
    """Hand the memory of the replaced fp32 weights back to the OS where the C library
    allows it (glibc keeps freed heap pages otherwise, so the resident size would not fall)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the pages stay reusable
        pass


def requantize(current: torch.Tensor, value: torch.Tensor) -> nn.Parameter:
    """``value`` stored the way ``current`` is (for loading a new global model into a
    quantized device copy): a float value is quantized, a quantized one taken as it is."""
    if is_quantized(value):
        return nn.Parameter(value, requires_grad=False)
    return nn.Parameter(quantize_weight(value.to(current.device), weight_mode(current)),
                        requires_grad=False)


# --- memory ------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds: a torchao tensor counts its inner data, scales and zero points."""
    if is_quantized(t) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


__all__ = ["EXPERT_WEIGHTS", "INT4_GROUP_SIZE", "QUANTIZE_MODES", "QuantizedLinear",
           "check_mode", "dequantize_weight", "frozen_linear", "int4_packable", "is_quantized",
           "plain_weight", "quantize_weight", "release_freed_memory", "require_eager",
           "require_lora", "requantize", "tensor_bytes", "weight_bytes", "weight_mode"]
