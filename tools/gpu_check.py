"""The prepared GPU check: does the plan hold on a CUDA device? Run it on any machine with a GPU.

    python tools/gpu_check.py [--out gpu-check.jsonl] [--mid-layers 4] [--skip-mid]

The machine needs the kit's dependencies with a CUDA build of torch (``pip install -e .``).
It runs, on the GPU, with the queue synchronised before every clock read:

1. the device's report (``probe_device``): the GPU, its free memory, the matmul rate per dtype;
2. the cost measurement: ONE expert timed over each base (fp32, bf16, int8, int4) at OLMoE's
   and at the tiny model's expert shape (``device_agent.timing.time_expert``);
3. a real training step of a tiny MoE (OLMoE's tiny config, every layer) and of a mid-size one
   (OLMoE-1B-7B at its real widths, the first ``--mid-layers`` decoder layers, fp32 base,
   LoRA on C experts; ``benchmarks.realsize``), printing predicted against measured memory
   (the CUDA allocator's peak, and the process's RSS beside it) and step time.

Each part prints its table and writes JSON lines to ``--out``; a part that fails prints its
error and the next one runs. Exit status: 0 when every part ran, 1 when one failed, 2 when there
is no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OLMOE = ROOT / "examples" / "models" / "olmoe-1b-7b-0924"


def _write(out: Path | None, rows: list[dict[str, Any]]) -> None:
    if out is None:
        return
    with out.open("a") as fh:
        for r in rows:
            fh.write(json.dumps(r, default=str) + "\n")


def report_part() -> list[dict[str, Any]]:
    from device_agent.resources import probe_device

    report = probe_device(matmul_seconds=0.5)
    rates = {k: v.gflops for k, v in report.matmul.items()}
    print(f"GPU {report.gpu_name}: {report.gpu_memory_free_bytes / 2**30:.1f} GiB free of "
          f"{report.gpu_memory_total_bytes / 2**30:.1f}; matmul GFLOP/s {rates}")
    return [{"part": "report", "gpu": report.gpu_name, "gflops": rates,
             "gpu_free_bytes": report.gpu_memory_free_bytes,
             "gpu_total_bytes": report.gpu_memory_total_bytes}]


def expert_part() -> list[dict[str, Any]]:
    import torch

    from device_agent.timing import time_expert
    from hfedmoe.models.plan import build_meta_model

    rows = []
    shape = build_meta_model(OLMOE).layers[0].bank.shape
    for tokens in (16, 256):
        for base in ("fp32", "bf16", "int8", "int4"):
            t = time_expert(shape, tokens, base, repeats=10, device=torch.device("cuda"))
            print(f"OLMoE expert, {tokens} tokens, {base}: " + ", ".join(
                f"{k} {t[k] * 1e3:.3f} ms" for k in ("full", "lora", "frozen") if k in t))
            rows.append({"part": "expert", "tokens": tokens, **t})
    return rows


def _tiny_dir() -> str:
    from hfedmoe.models.hf import FAMILIES, build_config

    d = Path(tempfile.mkdtemp(prefix="gpu-check-tiny-"))
    build_config(FAMILIES["olmoe"], hidden_size=64, intermediate_size=64,
                 head_dim=16).save_pretrained(d)
    return str(d)


def step_part(model: str, layers: int, budgets: str, batch: int, seq: int) -> list[dict]:
    from benchmarks import realsize

    ns = argparse.Namespace(model=model, quantize="none", device="cuda", layers=layers,
                            budgets=[int(c) for c in budgets.split(",")], batch=batch,
                            seq=seq, steps=4, rank=8, threads=0, seed=0)
    rows = realsize.run(ns)
    realsize.print_rows(rows)
    return [{"part": "step", **{k: v for k, v in r.items() if k != "env"}} for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--mid-layers", type=int, default=4,
                   help="decoder layers of the mid-size OLMoE (16: the whole model, 28 GB fp32)")
    p.add_argument("--skip-mid", action="store_true", help="only the tiny model's step")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    parts = [("report", report_part), ("expert", expert_part),
             ("tiny step", lambda: step_part(_tiny_dir(), 0, "1,8,32", 4, 64))]
    if not args.skip_mid:
        parts.append(("mid-size step", lambda: step_part(str(OLMOE), args.mid_layers,
                                                         "8,64,256", 2, 256)))
    failed = 0
    for name, part in parts:
        print(f"== {name}", flush=True)
        try:
            _write(out, part())
        except Exception:  # noqa: BLE001 - one part's failure is reported; the next still runs
            traceback.print_exc()
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
