"""Timed measurements: sustained matmul throughput and the cost of one training step's parts.

Two measurements feed the budget (METHOD.md section 4):

- :func:`measure_matmul` times as many ``n x n`` matmuls as fit in a time window after warm-up
  and reports GFLOP/s (``2 n^3`` FLOP per matmul). :func:`measure_throughput` runs it for fp32
  and for every low-precision dtype the device runs natively.
- :func:`measure_step_costs` times caller-provided closures (one expert's forward+backward, the
  non-expert part, optionally one frozen expert's forward) and their peak memory. The closures
  come from the model code; this module knows nothing of the model.

Peak memory on CPU is the largest resident-set size seen by a background sampler thread minus
the resident size before the first (warm-up) call: ``ru_maxrss`` cannot be reset between calls, and the CPU
allocator has no peak counter. Memory that is allocated and freed between two samples is missed,
and memory the C allocator keeps after a free is counted by later calls only if it grows, so the
CPU figure is an estimate. On CUDA the allocator's own peak counter is exact.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hfedmoe.errors import DeviceError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class MatmulResult:
    """Sustained matmul throughput for one dtype.

    ``n``, ``iterations`` and ``seconds`` are 0 for figures taken from a device profile
    rather than measured.
    """

    dtype: str
    device: str
    n: int
    iterations: int
    seconds: float
    gflops: float


@dataclass(frozen=True)
class StepCosts:
    """Median time and peak memory of the parts of one training step.

    Attributes:
        device: ``"cpu"`` or a CUDA device string.
        repeats: timed calls per closure (after warm-up).
        expert_seconds: one trained expert's forward+backward, median.
        rest_seconds: the non-expert part's forward+backward, median.
        expert_frozen_seconds: one frozen expert's forward (no autograd), median; None when
            no closure was given.
        expert_peak_bytes: peak memory above the starting level during the expert closure.
        rest_peak_bytes: the same for the non-expert closure.
        memory_method: ``"rss-sampler"`` (CPU estimate) or ``"cuda-max-allocated"``.
        expert_samples: every timed expert call, in seconds.
        rest_samples: every timed non-expert call, in seconds.
        routing_seconds: the routing pre-pass (a forward without autograd), median; None
            when no closure was given.
    """

    device: str
    repeats: int
    expert_seconds: float
    rest_seconds: float
    expert_frozen_seconds: float | None
    expert_peak_bytes: int
    rest_peak_bytes: int
    memory_method: str
    expert_samples: tuple[float, ...]
    rest_samples: tuple[float, ...]
    routing_seconds: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_supported_dtypes() -> list[str]:
    """Low-precision dtypes this CPU runs natively in oneDNN (AVX-512 BF16/FP16, AMX)."""
    out: list[str] = []
    if not torch.backends.mkldnn.is_available():
        return out
    for name, check in (("bfloat16", "_is_mkldnn_bf16_supported"),
                        ("float16", "_is_mkldnn_fp16_supported")):
        try:
            if getattr(torch.ops.mkldnn, check)():
                out.append(name)
        except (AttributeError, RuntimeError):
            continue
    return out


def supported_dtypes(device: str | torch.device = "cpu") -> list[str]:
    """The dtypes worth measuring on ``device``: fp32 first, then native low-precision ones."""
    dev = torch.device(device)
    if dev.type == "cuda":
        extra = ["float16"]
        if torch.cuda.is_bf16_supported():
            extra.append("bfloat16")
        return ["float32", *extra]
    return ["float32", *cpu_supported_dtypes()]


def measure_matmul(dtype: str = "float32", device: str | torch.device = "cpu", n: int = 1024,
                   seconds: float = 1.0, warmup: int = 3) -> MatmulResult:
    """Time as many ``n x n`` matmuls as fit in ``seconds`` after ``warmup`` calls.

    Args:
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: where to run (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        n: matrix size; larger sizes approach the sustained peak.
        seconds: length of the timed window; at least one matmul is always timed.
        warmup: untimed calls first (oneDNN/cuBLAS pick kernels on the first call).

    Returns:
        The throughput in GFLOP/s with the size, iteration count and time behind it.

    Raises:
        DeviceError: on an unknown dtype or bad size/duration.
    """
    if dtype not in _DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r}; known: {sorted(_DTYPES)}")
    if n < 1 or seconds <= 0 or warmup < 0:
        raise DeviceError("matmul needs n >= 1, seconds > 0 and warmup >= 0")
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=dev, dtype=_DTYPES[dtype])
    b = torch.randn(n, n, generator=gen).to(device=dev, dtype=_DTYPES[dtype])
    c = torch.empty_like(a)
    with torch.inference_mode():
        for _ in range(warmup):
            torch.matmul(a, b, out=c)
        _sync(dev)
        iterations = 0
        start = time.perf_counter()
        elapsed = 0.0
        while iterations == 0 or elapsed < seconds:
            torch.matmul(a, b, out=c)
            _sync(dev)
            iterations += 1
            elapsed = time.perf_counter() - start
    gflops = 2.0 * n**3 * iterations / elapsed / 1e9
    return MatmulResult(dtype=dtype, device=str(dev), n=n, iterations=iterations,
                        seconds=elapsed, gflops=gflops)


def measure_throughput(device: str | torch.device = "cpu", seconds: float = 1.0,
                       n: int | None = None,
                       dtypes: list[str] | None = None) -> dict[str, MatmulResult]:
    """Measure :func:`measure_matmul` for each dtype (default: :func:`supported_dtypes`).

    ``n`` defaults to 1024 on CPU and 4096 on CUDA.
    """
    dev = torch.device(device)
    size = n if n is not None else (4096 if dev.type == "cuda" else 1024)
    names = dtypes if dtypes is not None else supported_dtypes(dev)
    return {name: measure_matmul(name, dev, size, seconds) for name in names}


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_high_water_mark() -> bool:
    """Reset the kernel's record of this process's peak RSS (Linux: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    """The kernel's peak RSS of this process since the last reset (``VmHWM``), 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class PeakRSSSampler:
    """This process's peak resident set size while the context is open.

    Use as a context manager; ``peak_bytes`` is then the largest RSS minus the RSS at entry
    (never negative). On Linux the peak is the kernel's own high-water mark (reset on entry,
    read on exit), so a short spike between two samples is not missed; a background thread
    also samples RSS every ``interval`` seconds, the figure elsewhere (and the larger of the
    two where both exist). Samplers should not nest: an inner one resets the mark.
    """

    def __init__(self, interval: float = 0.001, read_rss: Callable[[], int] = _rss_bytes,
                 kernel_peak: bool = True) -> None:
        self.interval = interval
        self._kernel = kernel_peak and read_rss is _rss_bytes  # the same process's figure
        self._read = read_rss
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_bytes = 0
        self.max_bytes = 0

    def _loop(self) -> None:
        while True:
            self.max_bytes = max(self.max_bytes, self._read())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRSSSampler:
        self._kernel = self._kernel and _reset_high_water_mark()
        self.start_bytes = self.max_bytes = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.max_bytes = max(self.max_bytes, self._read(),
                             _high_water_mark() if self._kernel else 0)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_bytes(self) -> int:
        return max(0, self.max_bytes - self.start_bytes)


def _time_calls(fn: Callable[[], None], dev: torch.device, repeats: int,
                warmup: int) -> tuple[list[float], int]:
    """Run ``fn`` ``warmup`` + ``repeats`` times; return the timed durations and peak bytes.

    On CPU the RSS sampler covers the warm-up calls only (or the first timed call when there is
    no warm-up): memory the C allocator keeps after the first call is reused by later ones
    without raising RSS, so only the first call shows the peak (one-time initialisation is
    counted too, which errs on the safe side). The timed calls run without the sampler, whose
    thread polls every millisecond and slowed short closures by up to ~30 % on a busy CPU.
    """
    samples: list[float] = []
    if dev.type == "cuda":
        for _ in range(warmup):
            fn()
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _sync(dev)
            samples.append(time.perf_counter() - start)
        return samples, max(0, torch.cuda.max_memory_allocated(dev) - base)
    with PeakRSSSampler() as sampler:
        for _ in range(warmup):
            fn()
        if not warmup:  # nothing sampled yet: the first timed call shows the peak
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    for _ in range(repeats - len(samples)):  # timed without the sampler thread competing
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples, sampler.peak_bytes


def measure_step_costs(run_expert: Callable[[], None], run_rest: Callable[[], None],
                       device: str | torch.device = "cpu", repeats: int = 5, *,
                       warmup: int = 1,
                       run_expert_frozen: Callable[[], None] | None = None,
                       run_routing: Callable[[], None] | None = None) -> StepCosts:
    """Time the parts of a training step and measure their peak memory.

    Args:
        run_expert: runs forward+backward of one trained expert at the configured batch size
            and sequence length (its share of the routed tokens).
        run_rest: runs forward+backward of everything that is not an expert.
        device: where the closures run; CUDA is synchronised around each call.
        repeats: timed calls per closure; the median is reported.
        warmup: untimed calls per closure first.
        run_expert_frozen: optionally, one frozen expert's forward without autograd.
        run_routing: optionally, the routing pre-pass (whole-model forward without autograd).

    Returns:
        The medians, every sample, and the peak memory of each closure.

    Raises:
        DeviceError: if ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1 or warmup < 0:
        raise DeviceError("measure_step_costs needs repeats >= 1 and warmup >= 0")
    dev = torch.device(device)
    expert_samples, expert_peak = _time_calls(run_expert, dev, repeats, warmup)
    rest_samples, rest_peak = _time_calls(run_rest, dev, repeats, warmup)
    frozen: float | None = None
    if run_expert_frozen is not None:
        frozen_samples, _ = _time_calls(run_expert_frozen, dev, repeats, warmup)
        frozen = statistics.median(frozen_samples)
    routing: float | None = None
    if run_routing is not None:
        routing_samples, _ = _time_calls(run_routing, dev, repeats, warmup)
        routing = statistics.median(routing_samples)
    return StepCosts(
        device=str(dev), repeats=repeats,
        expert_seconds=statistics.median(expert_samples),
        rest_seconds=statistics.median(rest_samples),
        expert_frozen_seconds=frozen,
        expert_peak_bytes=int(expert_peak), rest_peak_bytes=int(rest_peak),
        memory_method="cuda-max-allocated" if dev.type == "cuda" else "rss-sampler",
        expert_samples=tuple(expert_samples), rest_samples=tuple(rest_samples),
        routing_seconds=routing,
    )
