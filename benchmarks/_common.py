"""Shared parts of the benchmarks: environment, JSON lines, isolated runs, plots, statistics.

Every JSON line a benchmark writes carries :func:`environment` (git sha, versions, CPU/GPU,
threads), the command that made it (:func:`command_line`) and the load average at the moment the
line was written: the machines these numbers come from are often shared, and the load says how
much to trust a timing. A benchmark that builds the kit's model also stores its
:func:`model_descriptor`, which ``benchmarks/tables.py`` compares with :func:`default_descriptor`
to tell a current figure from a stale one.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


def environment(**extra: Any) -> dict[str, Any]:
    """Versions, CPU/GPU and threads of this process (``extra`` is merged in)."""
    import torch

    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = ""
    cuda = torch.cuda.is_available()
    return {"git_sha": _git_sha(), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "transformers": tf_version,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None, **extra}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that runs this process, as a user would type it.

    ``python -m benchmarks.NAME args`` for a benchmark run as a module, ``hfedmoe bench NAME
    args`` through the CLI (which sets ``sys.argv[0]`` so); ``argv`` defaults to
    ``sys.argv[1:]``.
    """
    prog = sys.argv[0] if sys.argv else ""
    path = Path(prog)
    if path.suffix == ".py" and path.parent.name == "benchmarks":
        prog = f"python -m benchmarks.{path.stem}"
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(filter(None, [prog, shlex.join(args)]))


# descriptor keys: which model, and the training settings that define "the default"
MODEL_KEYS = ("name", "upcycle", "experts_per_layer", "top_k")
SHAPE_KEYS = ("batch_size", "seq_len")
RATE_KEYS = ("lr", "head_lr")


def model_descriptor(model: Any = None, train: Any = None, *, built: Any = None,
                     **settings: Any) -> dict[str, Any]:
    """What a row was measured on: ``model`` (a ModelConfig: name, upcycling, experts per
    layer, top_k, sequence length), ``train`` (a TrainConfig: batch size, learning rates),
    ``built`` (the MoEModel built from them: its parameter count and actual upcycling) and
    ``settings`` overriding any key (``seq_len=64``; ``lr=None`` drops a key)."""
    from hfedmoe.config import ModelConfig

    model = model or ModelConfig()
    out: dict[str, Any] = {"name": model.name, "upcycle": model.upcycle,
                           "experts_per_layer": model.num_experts, "top_k": model.top_k,
                           "seq_len": model.max_length}
    if train is not None:
        out.update(batch_size=train.batch_size, lr=train.lr, head_lr=train.head_lr)
    if built is not None:
        out["upcycle"] = built.info.get("upcycling")
        out["params"] = count_params(built)
    out.update(settings)
    return {k: v for k, v in out.items() if v is not None}


def default_descriptor() -> dict[str, Any]:
    """The kit's current default model and settings, from ``hfedmoe.config``'s dataclass
    defaults (``ModelConfig()``, ``TrainConfig()``); no parameter count (that needs the model)."""
    from hfedmoe.config import ModelConfig, TrainConfig

    return model_descriptor(ModelConfig(), TrainConfig())


def count_params(model: Any) -> int:
    """Parameters of a built kit model (an ``MoEModel``)."""
    return sum(p.numel() for p in model.module.parameters())


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def write_rows(path: str | Path | None, rows: Iterable[dict[str, Any]],
               env: dict[str, Any], descriptor: dict[str, Any] | None = None) -> None:
    """Append ``rows`` as JSON lines to ``path``, each with the environment, the command and the
    load average, and ``descriptor`` (:func:`model_descriptor`) unless the row has its own."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    command = env.get("command") or command_line()
    with open(path, "a") as fh:
        for r in rows:
            extra = {"descriptor": descriptor} if descriptor and "descriptor" not in r else {}
            fh.write(json.dumps({**r, **extra, "env": {**env, "command": command,
                                                        "loadavg": loadavg()}}) + "\n")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float], digits: int = 4) -> list[float]:
    return [round(min(xs), digits), round(max(xs), digits)] if xs else []


def run_isolated(module: str, func: str, kwargs: dict[str, Any], timeout: float = 1800,
                 threads: int = 0) -> dict[str, Any]:
    """``module.func(**kwargs)`` in a fresh interpreter; its JSON-able return value.

    A fresh process per configuration makes peak-memory figures independent of what ran
    before. ``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB so that glibc returns every freed
    tensor to the OS (mmap), which makes the resident set track live memory.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                     os.environ.get("PYTHONPATH")])),
           "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    code = ("import json, sys, importlib; m = importlib.import_module(sys.argv[1]); "
            "r = getattr(m, sys.argv[2])(**json.loads(sys.argv[3])); "
            "print('@@RESULT@@' + json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, module, func, json.dumps(kwargs)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise RuntimeError(f"{module}.{func}({kwargs}) failed (rc {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


class RssSampler:
    """Peak resident set size of this process while inside (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def __enter__(self) -> RssSampler:
        import threading

        self.start = self.peak = self.rss()
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self.rss())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def savefig(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure small (PNG, 90 dpi, optimised palette when Pillow has it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.convert("RGB").quantize(colors=64).save(path, optimize=True)
    except Exception:  # Pillow missing or failing: keep matplotlib's PNG
        pass
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_path(out: str | Path | None, name: str) -> Path:
    """Where a plot goes: ``out`` with ``.png`` for ``.jsonl`` if given, else ``name`` in
    ``benchmarks/results``."""
    return Path(out).with_suffix(".png") if out else RESULTS / name


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
