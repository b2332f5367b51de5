"""One expert timed as the device trains it (device_agent.timing) and the C heap's policy
(device_agent.heap)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from device_agent.timing import time_expert, training_device
from hfedmoe.experts import ExpertShape

SHAPE = ExpertShape(d_model=64, d_ff=64, gated=True, bias=False, activation="silu")


@pytest.mark.parametrize("base", ["fp32", "bf16", "int8", "int4"])
def test_expert_is_timed_over_each_base(base: str) -> None:
    t = time_expert(SHAPE, 32, base, repeats=2, device=torch.device("cpu"))
    assert (t["base"], t["device"]) == (base, "cpu")
    assert t["dtype"] == ("bfloat16" if base in ("bf16", "int4") else "float32")
    assert t["lora"] > 0 and 0 < t["frozen"] <= t["lora"]
    # a quantized base trains only through LoRA factors: no whole-expert time
    assert ("full" in t) == (base in ("fp32", "bf16"))


def test_training_device_is_the_gpu_when_there_is_one() -> None:
    assert training_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


_FRAGMENT = """
import sys, torch
from device_agent.costs import resident_bytes, release_freed_memory
from device_agent.heap import bound_heap
print(bound_heap(sys.argv[1]))
torch.set_num_threads(1)
w = torch.randn(256, 256, requires_grad=True)
release_freed_memory()
start = resident_bytes()
for step in range(12):  # a training loop's pattern: a large block, then many mid-size ones
    big = torch.empty(8 * 2**20, dtype=torch.uint8).fill_(1)
    del big
    acts = [torch.ones(256 + step, 512) @ torch.ones(512, 256) for _ in range(60)]
    keep = acts[::7]
    del acts
print((resident_bytes() - start) // 2**20)
"""


def _retained(policy: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, policy], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_bounded_heap_keeps_the_resident_size_to_what_is_held() -> None:
    applied, bounded = _retained("bounded")
    assert applied == "bounded"
    dynamic = _retained("dynamic")[1]
    # what the loop still holds at the end: 9 blocks of about 0.27 MiB
    assert bounded <= 10
    assert dynamic > bounded + 15  # glibc's dynamic threshold keeps freed heap pages


_STEPS_IN_HOLES = """
import sys, torch
from device_agent.costs import resident_bytes, release_freed_memory
from device_agent.heap import after_step, bound_heap
print(bound_heap(sys.argv[1]))
holes = [torch.empty(16 * 1024) for _ in range(2000)]  # 64 KiB blocks: on the heap, 128 MiB
pin = holes[::50]  # a few stay held: the heap cannot shrink from its top
del holes
release_freed_memory()  # as the round's baseline is read: the free chunks' pages are gone
start = resident_bytes()
for step in range(3):  # a step's small blocks land in the free chunks, then are freed
    acts = [torch.ones(16 * 1024) for _ in range(1000)]
    del acts
    after_step()
print((resident_bytes() - start) // 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_after_step_hands_back_the_heap_pages_a_step_freed() -> None:
    def retained(policy: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _STEPS_IN_HOLES, policy],
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])

    applied, bounded = retained("bounded")
    assert applied == "bounded"
    assert bounded <= 8  # what the steps held live: nothing
    assert retained("dynamic")[1] >= 32  # glibc's own policy keeps the 62.5 MiB they touched
