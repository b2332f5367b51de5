"""One expert of a model's real shape, timed as this device will train it.

The plan of a live device (``hfedmoe profile --model DIR`` without ``--emulate``) takes its time
terms from one expert timed here. The expert is timed in the way each training mode runs it:

- over an fp32 or bf16 base, its weights stored in that dtype, trained in full or through
  rank-r LoRA factors; a bf16 base computes under autocast to bfloat16, as ``train.dtype``
  does;
- over an int8 or int4 base, its weights stored quantized (:func:`hfedmoe.quantize.
  quantize_weight`, the same torchao kernels ``model.quantize`` uses), trained through LoRA
  factors only, the int4 kernel on bfloat16 activations;
- on the device that trains: the GPU when one is there (``torch.cuda``), with the queue
  synchronised before every clock read, else the CPU.

Every mode's step is timed as the optimizer runs it (forward, backward, optimizer step); the
frozen expert is its forward and the gradient to its input. Seconds are medians of ``repeats``
calls after one warm-up.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from hfedmoe.experts import Expert, ExpertShape
from hfedmoe.lora import ExpertFactors, LoRASpec
from hfedmoe.quantize import EXPERT_WEIGHTS, quantize_weight

QUANTIZED_BASES = ("int8", "int4")
_COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32,
            "int4": torch.bfloat16}


def training_device() -> torch.device:
    """The device this host trains on: the first GPU when torch sees one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def _autocast(base: str, device: torch.device) -> Iterator[None]:
    if _COMPUTE[base] is torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield


def _expert_on(shape: ExpertShape, base: str, device: torch.device) -> Expert:
    with torch.device(device):
        expert = Expert(shape)
    if base == "bf16":
        expert.to(torch.bfloat16)
    elif base in QUANTIZED_BASES:
        for name in EXPERT_WEIGHTS:
            w = getattr(expert, name).detach()
            w = w.to(torch.bfloat16) if base == "int4" else w
            setattr(expert, name, torch.nn.Parameter(quantize_weight(w, base),
                                                     requires_grad=False))
    return expert


def time_expert(shape: ExpertShape, tokens: int, base: str = "fp32", optimizer: str = "adamw",
                rank: int = 8, repeats: int = 3, device: torch.device | None = None
                ) -> dict[str, Any]:
    """Seconds of ONE expert of ``shape`` on ``tokens`` rows over a ``base`` base (module doc):
    ``full`` (whole expert trained, fp32 weights under the base's autocast; fp32 and bf16
    bases only), ``lora`` (rank-``rank`` factors trained) and ``frozen``; with the ``base``,
    its compute dtype and the device."""
    from device_agent.costs import _optimizer

    device = device or training_device()
    expert = _expert_on(shape, base, device)  # frozen, and the base of LoRA factors
    x = torch.randn(tokens, shape.d_model, device=device)
    factors = ExpertFactors(expert.w_in, expert.w_out, LoRASpec(rank=rank))
    lora_params = [p for n, p in expert.named_parameters() if n.startswith("b_")]
    lora_params += list(factors.factors.values())
    lora_opt = _optimizer(lora_params, optimizer)

    def step(trained: list[torch.Tensor], opt: Any, with_factors: bool) -> None:
        if base not in QUANTIZED_BASES:
            expert.requires_grad_(False)
        for t in trained:
            t.requires_grad_(True)
        expert.factors = factors if with_factors else None
        with _autocast(base, device):
            out = (expert if with_factors else master)(x.clone().requires_grad_(True))
        out.float().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def frozen() -> None:
        if base not in QUANTIZED_BASES:
            expert.requires_grad_(False)
        expert.factors = None
        with _autocast(base, device):
            out = expert(x.clone().requires_grad_(True))
        out.float().sum().backward()

    out: dict[str, Any] = {"lora": _median_seconds(lambda: step(lora_params, lora_opt, True),
                                                   repeats, device)}
    if base not in QUANTIZED_BASES:  # a trained expert's weights are fp32 (the masters)
        with torch.device(device):
            master = Expert(shape)
        full = list(master.parameters())
        full_opt = _optimizer(full, optimizer)
        out["full"] = _median_seconds(lambda: step(full, full_opt, False), repeats, device)
    out["frozen"] = min([_median_seconds(frozen, repeats, device)]
                        + [out[k] for k in ("full", "lora") if k in out])
    return {**out, "base": base, "dtype": str(_COMPUTE[base]).removeprefix("torch."),
            "device": device.type}
