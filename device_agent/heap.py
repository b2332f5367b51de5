"""The C heap's policy while a device trains: a resident size that follows what training holds.

glibc serves an allocation below its *dynamic* mmap threshold from its heap, and the threshold
rises (up to 32 MiB) each time a larger mapped block is freed. A training step frees and
allocates activations of a few hundred KB to a few MB every step, so they end up on the heap,
which fragments and keeps its freed pages: the process's resident size climbs step after step.
Measured on the default model (C = 1, batch 8 x 64, one thread): +99 MB after the first step,
+179 MB after nine, for a step that holds about 63 MB live. A budget limited by memory cannot be
predicted from that, and a low-memory killer sees the inflated figure.

:func:`bound_heap` fixes the threshold at 128 KiB (``mallopt(M_MMAP_THRESHOLD)``, which also
turns the dynamic adjustment off): blocks of 128 KiB and more are mapped when allocated and
unmapped when freed, so the resident size follows live memory (+63 to +70 MB over the same nine
steps). The cost is a page fault per fresh page of those blocks; ``benchmarks/budget.py
--heap bounded,dynamic`` measures both side by side. ``measure_costs`` applies the policy, so
every device path (the agent, the simulator, ``hfedmoe profile``) trains under it.

Blocks under the threshold still come from the heap, whose free chunks (left by loading the
model and measuring its costs, and trimmed before the round reads its baseline) a step's
allocations land in all over; their pages stay resident after the step frees them, and the
next step touches others. Measured on the default model (C = 1, batch 8 x 64, one thread):
the resident size after a step was +39 to +58 MB over the baseline for 3-5 MB held live, and
each step's peak rose with it, 75 MB after one step to 101 after six. Under the bounded policy
the round therefore hands those pages back after every step (:func:`after_step`, glibc's
``malloc_trim``: 6-17 ms a step there), and every step's peak stays near the first one's
(79-81 MB over the same six steps). Set
``HFEDMOE_HEAP=dynamic`` to keep glibc's default. Elsewhere (Android's bionic, macOS) this is a
no-op and the C library's own policy holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
BOUNDED_THRESHOLD = 128 * 1024
_applied: str | None = None


def heap_policy() -> str:
    """The policy in force: ``"bounded"``, ``"dynamic"`` (glibc's default) or ``"libc"``
    (not glibc: the C library's own)."""
    return _applied or "dynamic"


def bound_heap(policy: str | None = None) -> str:
    """Apply ``policy`` (default: ``HFEDMOE_HEAP``, else ``"bounded"``) to this process's C
    heap; returns the policy in force. Idempotent."""
    global _applied
    policy = policy or os.environ.get("HFEDMOE_HEAP", "bounded")
    if policy not in ("bounded", "dynamic"):
        raise ValueError(f"HFEDMOE_HEAP must be 'bounded' or 'dynamic', got {policy!r}")
    if policy == "dynamic" or _applied == "bounded":
        _applied = _applied or policy
        return heap_policy()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, BOUNDED_THRESHOLD) == 1
    except (OSError, AttributeError):  # no mallopt: not glibc
        ok = False
    _applied = "bounded" if ok else "libc"
    return _applied


def release_freed_memory() -> None:
    """Hand the pages of the C heap's free chunks back to the OS (glibc ``malloc_trim``);
    a no-op where glibc is not the allocator."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def after_step() -> None:
    """End of a training step: under the bounded policy, the pages the step freed on the heap
    go back to the OS, so the next step's peak does not sit on them (glibc's dynamic policy
    is left as it is)."""
    if _applied == "bounded":
        release_freed_memory()


@contextlib.contextmanager
def training_kernels(dtype: str = "float32", device: torch.device | str = "cpu"
                     ) -> Iterator[None]:
    """Training steps in float32 on a CPU under the bounded policy run their matmuls without
    oneDNN (``torch.backends.mkldnn.enabled`` off inside the block, restored after).

    oneDNN keeps a compiled primitive per matmul shape it meets (up to 1024), and a round's
    routing hands each expert a different number of rows every step, so its cache, and the
    resident size, grow step after step: measured on the 32-expert model, LoRA, C = 96, batch
    8 x 64, the heap's live bytes rose 16 MB over ten steps with it and 7.8 MB without, and
    three processes' round peaks spread over 124-147 MB against predictions of 120-138 with
    it. The choice follows the requested policy (``HFEDMOE_HEAP``), not whether this process
    has applied it yet, so a worker process computes what the process that measured computes.
    float32 falls back to the BLAS's sgemm; bf16 and fp16 keep oneDNN (the fallback ran a
    bf16 linear 50x slower here), as do other devices and the dynamic policy.
    ``HFEDMOE_CPU_MATMUL=onednn`` keeps oneDNN for float32 too (:func:`cpu_matmul`;
    ``benchmarks/budget.py --cpu-matmul blas,onednn`` measures both side by side).
    """
    if (_requested_policy() == "dynamic" or dtype != "float32" or cpu_matmul() == "onednn"
            or torch.device(device).type != "cpu" or not torch.backends.mkldnn.enabled):
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


def cpu_matmul() -> str:
    """Where a float32 round's matmuls run on a CPU under the bounded policy: ``"blas"`` (the
    default) or ``"onednn"`` (``HFEDMOE_CPU_MATMUL``)."""
    choice = os.environ.get("HFEDMOE_CPU_MATMUL", "blas")
    if choice not in ("blas", "onednn"):
        raise ValueError(f"HFEDMOE_CPU_MATMUL must be 'blas' or 'onednn', got {choice!r}")
    return choice


def _requested_policy() -> str:
    return os.environ.get("HFEDMOE_HEAP", "bounded")
