"""Scale: ``hfedmoe swarm`` against a real ``hfedmoe server`` on a Mosquitto of its own.

Two questions, one run:

1. **Control plane** for N = 100, 1,000, 10,000 devices: registration (swarm start to each
   device's ``registered`` ack) and the round announcement's fan-out (the server's ``opened_at``
   to each device's receipt), with RSS and CPU of server, broker and swarm.
2. **Data plane**: one round of LoRA-sized updates from ``--ingest-devices`` devices (all of
   them participants, uploading at once) with 1, 2 and 4 ingest workers
   (``ingest.workers``; 1 means the coordinator ingests itself, with no workers): updates/s,
   MB/s and CPU seconds per process (coordinator, each worker, broker, swarm), so the
   saturated process shows.

The data plane runs once per store (``--stores sqlite,postgres``: ``run.db`` in the run
directory, or a fresh schema of the PostgreSQL at ``--postgres-url``), and with
``--separate-dirs W`` once more on PostgreSQL with W workers that the benchmark starts itself
(``ingest.spawn = false``), each in a directory of its own, sharing only the database, the
broker and a spool directory (``store.spool_dir``) with the coordinator.

Every point starts a fresh broker (persistence off) and server in a temporary run directory.
The swarm is one process of paho clients on one selectors loop (``--swarm-processes`` to split).

    python -m benchmarks.scale --out benchmarks/results/scale.jsonl
    python -m benchmarks.scale --devices "" --stores sqlite,postgres --separate-dirs 2
    python -m benchmarks.scale --quick                  # N = 50, 100 devices ingest, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, environment, loadavg, write_rows

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _server_config(run_dir: Path, url: str, devices: int, fraction: float, workers: int,
                   model: dict[str, Any], store: dict[str, Any] | None = None,
                   spawn: bool = True) -> dict[str, Any]:
    return {"run_id": "scale", "run_dir": str(run_dir), "max_eval_examples": 16,
            "eval_batch_size": 16, "model": model,
            "train": {"adapter": "lora", "lora_rank": 8, "threads": 1},
            "transport": {"url": url, "protocol": "5", "keepalive": 60},
            "ingest": {"workers": workers, "spawn": spawn}, "store": store or {},
            "rounds": {"rounds": 1, "min_devices": devices, "fraction": fraction,
                       "deadline_s": 300.0, "registration_timeout_s": 600.0}}


def _spawn_workers(n: int, cfg_path: Path, tmp: Path, env: dict[str, str]
                   ) -> list[subprocess.Popen]:
    """``hfedmoe ingest`` x n, each in a directory of its own (as on other hosts)."""
    procs = []
    for i in range(n):
        work = tmp / f"host{i}"
        work.mkdir()
        with open(work / "ingest.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "hfedmoe.cli", "ingest", "--config", str(cfg_path),
                 "--worker", f"w{i}", "--work-dir", str(work)], cwd=work, stdout=log,
                stderr=subprocess.STDOUT, env=env))
    return procs


@contextmanager
def _postgres_schema(url: str) -> Iterator[str]:
    """A fresh schema of the database at ``url``, dropped afterwards."""
    import psycopg

    schema = "scale_" + secrets.token_hex(4)
    try:
        yield schema
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def run_point(devices: int, fraction: float, workers: int, train_s: tuple[float, float],
              swarm_processes: int, model: dict[str, Any], timeout: float,
              store: dict[str, Any] | None = None, separate: bool = False) -> dict[str, Any]:
    """One broker + server (+ workers) + swarm; the swarm's report with process figures.
    ``separate``: the benchmark starts the workers, each in a directory of its own."""
    import psutil
    import tomli_w

    from lab.swarm import SwarmConfig, run_swarm

    tmp = Path(tempfile.mkdtemp(prefix="hfedmoe-scale-"))
    if separate:
        store = {**(store or {}), "spool_dir": str(tmp / "shared-spool")}
    port = _free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 1000000\nmax_inflight_messages 1000\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    server, external = None, []
    try:
        _wait_port(port)
        url = f"mqtt://127.0.0.1:{port}"
        cfg_path = tmp / "server.toml"
        cfg_path.write_text(tomli_w.dumps(_server_config(tmp / "run", url, devices, fraction,
                                                         workers, model, store,
                                                         spawn=not separate)))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1"}
        with open(tmp / "server.log", "w") as log:
            server = subprocess.Popen([sys.executable, "-m", "hfedmoe.cli", "server", "--config",
                                       str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                      env=env)
        if separate:
            external = _spawn_workers(workers, cfg_path, tmp, env)
        # ready: the coordinator subscribed ("ready:") and every worker is online
        end = time.monotonic() + 180
        while time.monotonic() < end:
            text = (tmp / "server.log").read_text()
            if "ready: run" in text and text.count(" online (") >= workers:
                break
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {text[-2000:]}")
            time.sleep(0.2)
        procs = [p for p in psutil.Process(server.pid).children(recursive=True)
                 if "ingest" in " ".join(p.cmdline())] + [psutil.Process(p.pid)
                                                          for p in external]
        watch = {"coordinator": server.pid, "broker": broker.pid,
                 **{f"worker{i}": p.pid for i, p in enumerate(procs)}}
        report = run_swarm(SwarmConfig(url=url, run_id="scale", devices=devices,
                                       processes=swarm_processes, rounds=1, budgets=(2, 8),
                                       train_s=train_s, timeout_s=timeout,
                                       config=str(cfg_path)), watch=watch)
        server.wait(timeout)  # a loaded machine: partial aggregates, evaluation, retention
        metrics = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text()
                   .splitlines() if x.strip()]
        row = [m for m in metrics if m.get("phase") == "round"][-1]
        report["server_round"] = {k: row[k] for k in ("participants", "accepted", "rejected",
                                                      "late", "bytes_in", "round_s")}
        return report
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            server.wait(30)
        for proc in external:
            proc.terminate()
            proc.wait(30)
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _bottleneck(resources: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The busiest process and whether the machine's cores were saturated."""
    busiest = max(resources, key=lambda n: resources[n]["cpu_pct"])
    total = sum(r["cpu_pct"] for r in resources.values())
    return {"busiest": busiest, "busiest_cpu_pct": resources[busiest]["cpu_pct"],
            "total_cpu_pct": round(total, 1), "cores": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--devices", default="100,1000,10000", help="control-plane sizes")
    p.add_argument("--ingest-devices", type=int, default=1000)
    p.add_argument("--workers", default="1,2,4", help="ingest workers to compare (1: none)")
    p.add_argument("--swarm-processes", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--stores", default="sqlite", help="data-plane stores: sqlite,postgres")
    p.add_argument("--postgres-url", default=os.environ.get("HFEDMOE_TEST_POSTGRES_URL")
                   or "postgresql://hfedmoe@127.0.0.1:5432/hfedmoe_test")
    p.add_argument("--separate-dirs", type=int, default=0, metavar="W",
                   help="also W workers in directories of their own (PostgreSQL; 0: no)")
    p.add_argument("--out", default=str(RESULTS / "scale.jsonl"))
    args = p.parse_args(argv)
    sizes = [50] if args.quick else [int(x) for x in args.devices.split(",") if x]
    ingest_n = 100 if args.quick else args.ingest_devices
    workers = [int(x) for x in args.workers.split(",") if x]
    model = {"num_experts": 4, "top_k": 1, "max_length": 32}
    env = environment(model=model, swarm_processes=args.swarm_processes,
                      command="python -m benchmarks.scale " + " ".join(argv or sys.argv[1:]))
    rows = []
    for n in sizes:  # control plane: 10% participants, spread uploads
        t0 = time.time()
        rep = run_point(n, 0.1, 0, (0.5, 2.0), args.swarm_processes, model, args.timeout)
        ann = rep["announce"].get("0", {})
        row = {"bench": "scale", "question": "control-plane", "devices": n,
               "registered": rep["registered"], "all_registered_s": rep["all_registered_s"],
               "register_s": rep["register_s"], "connect_s": rep["connect_s"],
               "announce_received_by": ann.get("received_by"),
               "announce_all_received_since_start_s": ann.get("all_received_since_start_s"),
               "fanout_s": ann.get("fanout_s"), "ingest": rep["ingest"],
               "resources": rep["resources"], "bottleneck": _bottleneck(rep["resources"]),
               "timed_out": rep["timed_out"], "errors": rep["error_count"],
               "server_round": rep["server_round"], "wall_s": round(time.time() - t0, 1),
               "loadavg_before": loadavg()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    points = [(st, w, False) for st in args.stores.split(",") if st for w in workers]
    if args.separate_dirs:
        points.append(("postgres", args.separate_dirs, True))
    for store, w, separate in points:  # data plane: every device a participant, uploads at once
        load = loadavg()
        pg = _postgres_schema(args.postgres_url) if store == "postgres" else nullcontext()
        with pg as schema:
            section = {"url": args.postgres_url, "schema": schema} if schema else None
            rep = run_point(ingest_n, 1.0, 0 if w == 1 and not separate else w, (0.0, 0.0),
                            args.swarm_processes, model, args.timeout, section, separate)
        row = {"bench": "scale", "question": "ingest", "devices": ingest_n, "store": store,
               "worker_dirs": "separate" if separate else "shared",
               "ingest_workers": w, "ingest": rep["ingest"], "resources": rep["resources"],
               "bottleneck": _bottleneck(rep["resources"]), "timed_out": rep["timed_out"],
               "server_round": rep["server_round"], "errors": rep["error_count"],
               "loadavg_before": load}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for r in rows:
        base = next((b for b in rows if b.get("ingest_workers") == 1
                     and b.get("store") == r.get("store")), None)
        if r.get("question") == "ingest" and base and base["ingest"].get("updates_per_s"):
            r["speedup_vs_1"] = round(r["ingest"].get("updates_per_s", 0)
                                      / base["ingest"]["updates_per_s"], 2)
    write_rows(args.out, rows, env)
    _print(rows)
    _plot(rows, Path(args.out).with_suffix(".png"))
    return 0


def _print(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r["question"] == "control-plane":
            f = r["fanout_s"] or {}
            print(f"N={r['devices']:>6}: registered {r['registered']} in "
                  f"{r['all_registered_s']} s, announcement at all by "
                  f"{r['announce_all_received_since_start_s']} s (fan-out p50 {f.get('p50')} "
                  f"p99 {f.get('p99')} max {f.get('max')}), busiest {r['bottleneck']}")
        else:
            i = r["ingest"]
            print(f"ingest {r['store']} x{r['ingest_workers']} ({r['worker_dirs']} dirs): "
                  f"{i.get('updates_per_s')} updates/s, "
                  f"{i.get('mb_per_s')} MB/s ({r.get('speedup_vs_1')}x), cpu "
                  + ", ".join(f"{n} {v['cpu_s']}s" for n, v in r["resources"].items()))


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cp = [r for r in rows if r["question"] == "control-plane"]
    ing = [r for r in rows if r["question"] == "ingest"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if cp:
        n = [r["devices"] for r in cp]
        axes[0].plot(n, [r["all_registered_s"] or float("nan") for r in cp], "o-",
                     label="all registered")
        axes[0].plot(n, [r["announce_all_received_since_start_s"] or float("nan") for r in cp],
                     "s-", label="announcement at all")
        axes[0].plot(n, [(r["fanout_s"] or {}).get("p99", float("nan")) for r in cp], "^-",
                     label="fan-out p99")
        axes[0].set_xscale("log")
        axes[0].set_xlabel("devices")
        axes[0].set_ylabel("seconds since swarm start / since opened")
        axes[0].legend()
    if ing:
        w = [f"{r.get('store', 'sqlite')}\nx{r['ingest_workers']}"
             + (" sep." if r.get("worker_dirs") == "separate" else "") for r in ing]
        axes[1].bar(w, [r["ingest"].get("updates_per_s", 0) for r in ing])
        axes[1].set_xlabel("store, ingest workers (x1 = the coordinator alone)")
        axes[1].set_ylabel("updates/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
