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
every device path (the agent, the simulator, ``hfedmoe profile``) trains under it. Set
``HFEDMOE_HEAP=dynamic`` to keep glibc's default. Elsewhere (Android's bionic, macOS) this is a
no-op and the C library's own policy holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

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
