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
in the backward from the weight dequantized a slice at a time (:func:`grad_input`); no weight
gradient exists.

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
        out_f, in_f = w.shape
        unpacked = _int4_rows(w, 0, out_f)
        if unpacked is not None:
            return unpacked.float()
        # torchao gives Int4OpaqueTensor no dequantize op; its own kernel applied to the
        # identity returns W^T exactly (the way torchao's tinygemm linears unpack weights),
        # at in x in x out multiply-adds
        eye = torch.eye(in_f, dtype=w.scale_and_zero.dtype, device=w.device)
        return F.linear(eye, w).t().float().contiguous()  # (out, in)
    return w.dequantize().float()


# torch's CPU int4 pack (``_convert_weight_to_int4pack_for_cpu``, the layout torchao's
# Int4OpaqueTensor holds) stores the rows in blocks whose size depends on the kernel's ISA: per
# block and input column, block/2 bytes; byte d holds row d in its low nibble and row d +
# block/2 in its high one. A value q stands for (q - 8) * scale + zero, with scale and zero per
# row and group of INT4_GROUP_SIZE columns ([in / group, out, 2], bf16).
_INT4_BLOCK_ROWS = {"AVX512": 64, "AVX2": 32}
_int4_layout_checked: dict[str, bool] = {}


def _int4_rows(w: torch.Tensor, r0: int, r1: int) -> torch.Tensor | None:
    """Rows ``r0:r1`` of an int4 weight, unpacked at ``(r1 - r0) x in`` work: the values the
    kernel computes with, in its output dtype (bf16) as the identity trick gives them; or None where the pack's layout is not one this module reads: another ISA, a
    partial block, or a layout that failed its check against the kernel. ``r0`` and ``r1``
    must be multiples of the block (or ``r1`` the number of rows)."""
    cap = torch.backends.cpu.get_cpu_capability()
    block = _INT4_BLOCK_ROWS.get(cap)
    out_f, in_f = w.shape
    if block is None or w.device.type != "cpu" or out_f % block or r0 % block \
            or (r1 % block and r1 != out_f) or _int4_layout_checked.get(cap) is False:
        return None
    if cap not in _int4_layout_checked:  # once per process: the decoded rows against the kernel
        _int4_layout_checked[cap] = _int4_layout_matches(w, block)
        if not _int4_layout_checked[cap]:
            return None
    return _unpack_int4(w, block, r0, r1)


def _unpack_int4(w: torch.Tensor, block: int, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` unpacked in the kernel's output dtype (bf16), each group's scale and zero
    broadcast rather than repeated: about 7 bytes of transients per element."""
    out_f, in_f = w.shape
    packed = w.qdata.reshape(out_f // block, in_f, block // 2)[r0 // block:r1 // block]
    q = torch.cat([packed & 0xF, packed >> 4], dim=2)  # (blocks, in, block): rows d, d + b/2
    sz = w.scale_and_zero[:, r0:r1]  # (in / group, rows, 2)
    groups = sz.shape[0]
    # (rows, groups, group) in float32: q - 8, times the scale, plus the zero, in place
    x = q.permute(0, 2, 1).reshape(r1 - r0, groups, in_f // groups).float()
    del q
    x.sub_(8).mul_(sz[..., 0].t().float().unsqueeze(-1)).add_(sz[..., 1].t().float().unsqueeze(-1))
    return x.reshape(r1 - r0, in_f).to(w.scale_and_zero.dtype)


def _int4_layout_matches(w: torch.Tensor, block: int) -> bool:
    """Whether the unpacked weight equals the kernel's own output on rows of the identity, at
    the first group of input columns and the last column (every row; ``33 x in x out`` work,
    once per process)."""
    out_f, in_f = w.shape
    cols = torch.tensor([*range(min(INT4_GROUP_SIZE, in_f)), in_f - 1], device=w.device)
    probe = torch.zeros(len(cols), in_f, dtype=w.scale_and_zero.dtype, device=w.device)
    probe[torch.arange(len(cols)), cols] = 1
    kernel = F.linear(probe, w).t().float()  # W[:, cols] through the kernel
    return torch.equal(_unpack_int4(w, block, 0, out_f)[:, cols].float(), kernel)


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
        return grad_input(grad, ctx.weight).to(ctx.x_dtype), None


DEQUANT_SLICE_BYTES = 8 << 20  # what one slice of a dequantized weight may hold in the backward


def grad_input(grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``grad @ W`` for a quantized ``W`` (out, in), dequantized a slice of rows at a time, so
    the backward's transient memory is bounded by :data:`DEQUANT_SLICE_BYTES` plus the result
    rather than a float32 copy of the whole weight (a 50k-token LM head over 2048 features:
    412 MB, with the casts about 800 MB, in every step). The products of each slice are summed
    in float32 and rounded to ``grad``'s dtype once, as one matmul would.

    int8 slices and int4 slices unpacked from the CPU pack (:func:`_int4_rows`) cost their
    size; where the int4 pack cannot be read, columns ``j..j+k`` of W come from torchao's
    kernel on rows of the identity, at ``k x in x out`` work per slice."""
    out_f, in_f = w.shape
    g = grad.reshape(-1, out_f)
    item = max(g.element_size(), 2)
    mode = weight_mode(w)
    block = _INT4_BLOCK_ROWS.get(torch.backends.cpu.get_cpu_capability(), 0)
    if mode == "int4" and (not block or _int4_rows(w, 0, min(block, out_f)) is None):
        return _grad_input_by_probes(grad, g, w, item)
    step = block if mode == "int4" else 1
    k = max(step, DEQUANT_SLICE_BYTES // (in_f * item) // step * step)
    if k >= out_f:
        whole = _int4_rows(w, 0, out_f) if mode == "int4" else dequantize_weight(w)
        return grad @ whole.to(grad.dtype)
    out = g.new_zeros(g.shape[0], in_f, dtype=torch.float32)
    for r in range(0, out_f, k):
        rows = (_int4_rows(w, r, min(r + k, out_f)) if mode == "int4"
                else dequantize_weight(w[r:r + k]))
        out += g[:, r:r + k].float() @ rows.to(g.dtype).float()
    return out.to(grad.dtype).reshape(*grad.shape[:-1], in_f)


def _grad_input_by_probes(grad: torch.Tensor, g: torch.Tensor, w: torch.Tensor,
                          item: int) -> torch.Tensor:
    """:func:`grad_input` for an int4 pack this module cannot read: ``W^T[j:j+k]`` is the
    kernel's output on rows ``j..j+k`` of the identity."""
    out_f, in_f = w.shape
    k = max(1, min(in_f, DEQUANT_SLICE_BYTES // (out_f * item)))
    if k >= in_f:
        return grad @ dequantize_weight(w).to(grad.dtype)
    out = g.new_empty(g.shape[0], in_f)
    for j in range(0, in_f, k):
        n = min(k, in_f - j)
        probe = torch.zeros(n, in_f, dtype=w.scale_and_zero.dtype, device=w.device)
        probe[torch.arange(n), torch.arange(j, j + n)] = 1
        out[:, j:j + n] = g @ F.linear(probe, w).to(g.dtype).t()  # W^T[j:j+n] -> W[:, j:j+n]
    return out.reshape(*grad.shape[:-1], in_f)


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


__all__ = ["DEQUANT_SLICE_BYTES", "EXPERT_WEIGHTS", "INT4_GROUP_SIZE", "QUANTIZE_MODES",
           "QuantizedLinear", "check_mode", "dequantize_weight", "frozen_linear", "grad_input",
           "int4_packable", "is_quantized", "plain_weight", "quantize_weight",
           "release_freed_memory", "require_eager", "require_lora", "requantize",
           "tensor_bytes", "weight_bytes", "weight_mode"]
