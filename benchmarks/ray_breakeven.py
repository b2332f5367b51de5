"""Ray against sequential: from how many devices per round does ``simulate --backend ray`` win?

Question: on this machine, from how many devices per round does the Ray backend
(:mod:`lab.ray_backend`) finish a round, and a whole run with its start-up, before the
sequential backend?

How it is measured. For each N in ``--devices``, N emulated devices (the device profiles in
turn), every one a participant of every round (``rounds.fraction = 1``), run the same seeded
simulation (:func:`lab.simulate.simulate`) twice: with backend ``"sequential"`` and with backend
``"ray"`` (a local Ray that the run starts and shuts down, ``--ray-workers`` actors, default
this machine's CPU count, at most N). Both train with ``train.threads = 1`` (each Ray actor one
torch thread, the sequential backend one as well), so both give the same bits, and every run
shares one calibration (:func:`lab.devices.calibrate`, measured once at the start), so both
decide the same budgets. Per N and backend a row records the whole run's wall time (setup,
initial evaluation, the backend's start, the rounds, its close), the backend's start
(``start_s``: for Ray, starting it and every actor ready; ``simulate(..., timings=)``) and
close, the wall time of each round and their mean after the first (``round_s_after_first``,
null with one round), and whether the two backends' metrics rows are equal timings aside
(:func:`lab.ray_backend.row_differences`). The last row (``kind = "summary"``) gives the
smallest N at which Ray's mean round and Ray's whole run (its start included) beat
sequential's, null when none in the range. The model is the default MiniLM MoEfied with few
experts and a few local steps (``--experts``, ``--top-k``, ``--max-length``, ``--steps``), the
kit's default strategy. Every row carries the load average: run it on an idle machine.

    python -m benchmarks.ray_breakeven --out benchmarks/results/ray-breakeven.jsonl
    python -m benchmarks.ray_breakeven --quick       # N = 1, 2 on a 2-expert model, 2 rounds
    python -m benchmarks.ray_breakeven --quick --devices 2     # one point: one Ray start
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import environment, loadavg, model_descriptor, table, write_rows

BENCH = "ray-breakeven"
BACKENDS = ("sequential", "ray")


def sim_config(run_dir: Path, args: argparse.Namespace) -> Any:
    """The simulation every point runs: every device a participant, one torch thread."""
    from hfedmoe.config import from_dict
    from server.config import ServerConfig

    return from_dict(ServerConfig, {
        "run_dir": str(run_dir), "max_eval_examples": args.eval_examples,
        "model": {"num_experts": args.experts, "top_k": args.top_k,
                  "max_length": args.max_length},
        "train": {"batch_size": args.batch_size, "max_steps": args.steps, "threads": 1},
        "rounds": {"rounds": args.rounds, "fraction": 1.0}})


def profiles(n: int) -> list[str]:
    from device_agent.profiles import list_profiles

    names = list_profiles()
    return [names[i % len(names)] for i in range(n)]


def run_backend(cfg: Any, n: int, calibration: Any, backend: str,
                workers: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One whole run: its metrics rows and its timings."""
    from lab.simulate import simulate

    times: dict[str, float] = {}
    load = loadavg()
    t0 = time.perf_counter()
    rows = simulate(cfg, n, profiles(n), calibration=calibration, backend=backend,
                    ray_workers=workers if backend == "ray" else 0, timings=times)
    wall = time.perf_counter() - t0
    rounds = [r["wall_s"] for r in rows if r.get("phase") == "round"]
    after = rounds[1:]
    return rows, {
        "backend": backend, "wall_s": round(wall, 3),
        **{k: round(v, 3) for k, v in sorted(times.items())},
        "round_wall_s": [round(x, 3) for x in rounds],
        "round_s_after_first": round(statistics.mean(after), 3) if after else None,
        "ray_workers": min(workers, n) if backend == "ray" else None, "loadavg_before": load}


def run_point(n: int, calibration: Any, args: argparse.Namespace,
              tmp: Path) -> list[dict[str, Any]]:
    """Both backends at N devices per round; a row each, with whether their rows agree."""
    from lab.ray_backend import row_differences

    metrics, out = {}, []
    for backend in BACKENDS:
        cfg = sim_config(tmp / f"n{n}-{backend}", args)
        metrics[backend], timing = run_backend(cfg, n, calibration, backend, args.ray_workers)
        out.append({"bench": BENCH, "kind": "run", "devices": n, **timing})
    diffs = row_differences(metrics["sequential"], metrics["ray"])
    for r in out:
        r.update(rows_equal=not diffs, differences=diffs[:5])
    return out


def first_win(runs: list[dict[str, Any]], key: str) -> int | None:
    """The smallest N at which Ray's ``key`` is below sequential's (None: at no N)."""
    by = {(r["devices"], r["backend"]): r.get(key) for r in runs}
    for n in sorted({r["devices"] for r in runs}):
        seq, ray = by.get((n, "sequential")), by.get((n, "ray"))
        if seq is not None and ray is not None and ray < seq:
            return n
    return None


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"bench": BENCH, "kind": "summary",
            "devices": sorted({r["devices"] for r in runs}),
            "ray_wins_per_round_from": first_win(runs, "round_s_after_first"),
            "ray_wins_whole_run_from": first_win(runs, "wall_s"),
            "rows_equal": all(r["rows_equal"] for r in runs)}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="N = 1, 2; 2 experts, top-1, 32 tokens, 2 steps, 2 rounds")
    p.add_argument("--devices", default=None,
                   help="devices per round (comma list; default 1,2,4,8,16, quick: 1,2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--experts", type=int, default=4, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64, help="tokens per example")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="local steps per device and round")
    p.add_argument("--eval-examples", type=int, default=64, help="held-out examples evaluated")
    p.add_argument("--ray-workers", type=int, default=0, help="Ray actors (0: the CPU count)")
    p.add_argument("--measure-repeats", type=int, default=2, help="of the calibration")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    if args.quick:
        args.devices, args.rounds, args.experts, args.top_k = args.devices or "1,2", 2, 2, 1
        args.max_length, args.steps, args.eval_examples, args.measure_repeats = 32, 2, 16, 1
    args.devices = args.devices or "1,2,4,8,16"
    args.ray_workers = args.ray_workers or os.cpu_count() or 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    import torch

    from lab.devices import calibrate

    torch.set_num_threads(1)  # as the devices train: the costs budgets come from
    tmp = Path(tempfile.mkdtemp(prefix="hfedmoe-raybench-"))
    cfg = sim_config(tmp / "calibration", args)
    calibration = calibrate(cfg, args.measure_repeats)
    settings = {"rounds": args.rounds, "threads": 1, "steps": args.steps,
                "eval_examples": args.eval_examples, "started_at": int(time.time())}
    runs: list[dict[str, Any]] = []
    try:
        for n in (int(x) for x in args.devices.split(",")):
            point = run_point(n, calibration, args, tmp)
            runs += [{**r, **settings} for r in point]
            for r in point:
                print(f"N={n} {r['backend']}: whole run {r['wall_s']} s (start "
                      f"{r['start_s']} s), round after the first {r['round_s_after_first']} s, "
                      f"rows equal {r['rows_equal']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [*runs, {**summary(runs), **settings}]
    descriptor = model_descriptor(cfg.model, cfg.train)
    write_rows(args.out, rows, environment(benchmark=BENCH, device="cpu"), descriptor)
    print(table([[r["devices"], r["backend"], r["wall_s"], r["start_s"], r.get("close_s"),
                  r["round_s_after_first"], r["rows_equal"]] for r in runs],
                ["N", "backend", "whole run s", "start s", "close s", "round s (after 1st)",
                 "rows equal"]))
    s = rows[-1]
    print(f"Ray wins per round from N = {s['ray_wins_per_round_from']}, over the whole run "
          f"from N = {s['ray_wins_whole_run_from']}; rows equal: {s['rows_equal']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
